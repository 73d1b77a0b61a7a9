//! Probes the east-west gateways of other networks and tells proxies which
//! answer. A gateway whose cluster was destroyed keeps its last known
//! Service, since nothing is left to delete it: without a probe it would
//! look healthy forever. Each gateway is probed every `period` by a TCP
//! connect to its load balancer (a hostname is resolved again each time),
//! and taken out after `failures` failures in a row; one success brings it
//! back. Proxies also step around a gateway they fail to reach at once, so
//! the probe bounds how long a dead one is tried, not how long requests
//! fail.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_xds_proto::mesh::GatewayHealth;

use crate::hub::Hub;
use crate::metrics::GatewayLabels;
use crate::model::GatewayView;

#[derive(Clone, Copy, Debug)]
pub struct ProbeConfig {
    pub period: Duration,
    pub timeout: Duration,
    /// Failures in a row that take a gateway out.
    pub failures: u32,
}

impl Default for ProbeConfig {
    /// Linkerd's gateway probe period (3 s); three failures in a row.
    fn default() -> Self {
        ProbeConfig {
            period: Duration::from_secs(3),
            timeout: Duration::from_secs(1),
            failures: 3,
        }
    }
}

impl ProbeConfig {
    /// The longest a dead gateway stays in: it died just after a probe
    /// passed, so the threshold's probes come a period apart from the next
    /// one on, the last of them failing by timing out.
    pub fn detection_time(&self) -> Duration {
        self.period * self.failures.max(1) + self.timeout
    }
}

/// Failures in a row, per gateway.
#[derive(Default)]
struct Streaks(BTreeMap<String, u32>);

impl Streaks {
    /// The verdict after one probe.
    fn record(&mut self, name: &str, ok: bool, threshold: u32) -> GatewayHealth {
        let streak = self.0.entry(name.to_string()).or_default();
        if ok {
            *streak = 0;
            return GatewayHealth::GatewayHealthy;
        }
        *streak += 1;
        if *streak >= threshold.max(1) {
            GatewayHealth::GatewayUnhealthy
        } else {
            // Not yet: what it was stays (unknown or healthy).
            GatewayHealth::GatewayUnknown
        }
    }
}

/// Runs until the task is dropped.
pub async fn run(hub: Arc<Hub>, config: ProbeConfig) {
    let mut streaks = Streaks::default();
    let mut tick = tokio::time::interval(config.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let gateways: Vec<GatewayView> = hub
            .model()
            .gateways()
            .into_iter()
            .filter(|g| g.published)
            .collect();
        streaks
            .0
            .retain(|name, _| gateways.iter().any(|g| g.name == *name));
        let results =
            futures::future::join_all(gateways.iter().map(|g| probe(g, config.timeout))).await;
        let mut changed = false;
        for (gateway, result) in gateways.iter().zip(results) {
            let labels = GatewayLabels {
                gateway: gateway.name.clone(),
                network: gateway.network.clone(),
            };
            let verdict = streaks.record(&gateway.name, result.is_ok(), config.failures);
            let seen = match &result {
                Ok(took) => format!("answered in {:.1} ms", took.as_secs_f64() * 1000.0),
                Err(why) => {
                    hub.metrics
                        .gateway_probe_failures
                        .get_or_create(&labels)
                        .inc();
                    let streak = streaks.0.get(&gateway.name).copied().unwrap_or(0);
                    format!("{streak} failed in a row: {why}")
                }
            };
            let mut model = hub.model();
            let before = model.gateway_health(&gateway.name);
            // A failure below the threshold keeps the last verdict.
            let health = match verdict {
                GatewayHealth::GatewayUnknown => before,
                other => other,
            };
            model.set_gateway_health(&gateway.name, health, seen.clone());
            drop(model);
            if before != health {
                changed = true;
                let after = crate::model::health_name(health);
                match health {
                    GatewayHealth::GatewayUnhealthy => tracing::warn!(
                        gateway = %gateway.name, network = %gateway.network, %seen,
                        "east-west gateway taken out: traffic to its network fails over"
                    ),
                    _ => {
                        tracing::info!(gateway = %gateway.name, network = %gateway.network, %seen, health = after, "east-west gateway probed")
                    }
                }
            }
            hub.metrics
                .gateway_up
                .get_or_create(&labels)
                .set(i64::from(health != GatewayHealth::GatewayUnhealthy));
        }
        if changed {
            hub.nudge();
        }
    }
}

/// One probe: a TCP connect to any of the gateway's addresses (its
/// hostname resolved now), within `timeout`.
async fn probe(gateway: &GatewayView, timeout: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let port = u16::try_from(gateway.port).map_err(|_| "no valid port".to_string())?;
    let attempt = async {
        let mut targets: Vec<SocketAddr> = gateway
            .addresses
            .iter()
            .map(|ip| SocketAddr::new(*ip, port))
            .collect();
        if !gateway.hostname.is_empty() {
            let resolved = tokio::net::lookup_host((gateway.hostname.as_str(), port))
                .await
                .map_err(|e| format!("resolving {}: {e}", gateway.hostname))?;
            targets.extend(resolved);
        }
        if targets.is_empty() {
            return Err("no address yet: its load balancer has no ingress".to_string());
        }
        let mut last = String::new();
        for target in targets {
            match tokio::net::TcpStream::connect(target).await {
                Ok(_) => return Ok(()),
                Err(err) => last = format!("{target}: {err}"),
            }
        }
        Err(last)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(())) => Ok(start.elapsed()),
        Ok(Err(why)) => Err(why),
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gateway_is_taken_out_after_the_threshold_and_back_after_one_success() {
        let mut streaks = Streaks::default();
        let record = |s: &mut Streaks, ok| s.record("c2/weft-system/gw", ok, 3);
        assert_eq!(record(&mut streaks, true), GatewayHealth::GatewayHealthy);
        assert_eq!(record(&mut streaks, false), GatewayHealth::GatewayUnknown);
        assert_eq!(record(&mut streaks, false), GatewayHealth::GatewayUnknown);
        assert_eq!(record(&mut streaks, false), GatewayHealth::GatewayUnhealthy);
        assert_eq!(record(&mut streaks, false), GatewayHealth::GatewayUnhealthy);
        assert_eq!(record(&mut streaks, true), GatewayHealth::GatewayHealthy);
        let config = ProbeConfig {
            period: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            failures: 2,
        };
        assert_eq!(config.detection_time(), Duration::from_millis(2500));
    }

    #[tokio::test]
    async fn probes_tell_a_listening_gateway_from_a_gone_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = listener.local_addr().unwrap();
        let gone = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let view = |address: SocketAddr, hostname: &str| GatewayView {
            name: "c2/weft-system/gw".into(),
            cluster: "c2".into(),
            network: "n2".into(),
            addresses: if hostname.is_empty() {
                vec![address.ip()]
            } else {
                Vec::new()
            },
            hostname: hostname.into(),
            port: u32::from(address.port()),
            identity: String::new(),
            health: "unknown",
            published: true,
            problem: None,
            probe: String::new(),
        };
        let timeout = Duration::from_secs(1);
        assert!(probe(&view(up, ""), timeout).await.is_ok());
        // A load balancer known by name: resolved at each probe.
        assert!(probe(&view(up, "localhost"), timeout).await.is_ok());
        let err = probe(&view(gone, ""), timeout).await.unwrap_err();
        assert!(err.contains("refused"), "{err}");
        let err = probe(&view(up, "nowhere.invalid"), timeout)
            .await
            .unwrap_err();
        assert!(err.contains("resolving nowhere.invalid"), "{err}");
        let mut none = view(up, "");
        none.addresses.clear();
        assert!(
            probe(&none, timeout)
                .await
                .unwrap_err()
                .contains("no address yet")
        );
    }
}
