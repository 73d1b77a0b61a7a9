//! The lab's load balancers, standing in for a cloud's: every Service of
//! type LoadBalancer in cluster `c` gets an address from `10.100.c.0/24`,
//! written to `status.loadBalancer.ingress`, and DNAT rules in the router
//! namespace that send its ports to a ready endpoint. That range belongs
//! to no pod network, so in a multi-network lab (where the router drops
//! traffic between clusters' bridges) it is the one way across, as a
//! public load balancer is between VPCs. When the Service's endpoints go,
//! so do its rules, and its address stops answering.
//!
//! Each cluster's rules live in a chain of their own (`WEFT-LAB-LB-<c>`,
//! jumped to from PREROUTING for pods and OUTPUT for the lab's own
//! processes), rewritten whole when what it should hold changes. They go
//! with the router namespace when the lab is swept.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::json;

/// The load-balancer address number `n` (1-based) of cluster `c`.
pub fn address(c: u8, n: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 100, c, n)
}

fn chain(c: u8) -> String {
    format!("WEFT-LAB-LB-{c}")
}

fn iptables(args: &[&str]) -> Result<()> {
    let out = Command::new("iptables")
        .args(["-w", "5"])
        .args(args)
        .output()
        .context("running iptables")?;
    if !out.status.success() {
        bail!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// One DNAT: `address:port` to `target:target_port`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Forward {
    pub address: Ipv4Addr,
    pub port: u16,
    pub target: IpAddr,
    pub target_port: u16,
}

/// Creates cluster `c`'s chain (empty) and the jumps to it. Called in the
/// router namespace.
pub fn install(c: u8) -> Result<()> {
    let chain = chain(c);
    let _ = iptables(&["-t", "nat", "-N", &chain]);
    iptables(&["-t", "nat", "-F", &chain])?;
    for hook in ["PREROUTING", "OUTPUT"] {
        if iptables(&["-t", "nat", "-C", hook, "-j", &chain]).is_err() {
            iptables(&["-t", "nat", "-A", hook, "-j", &chain])?;
        }
    }
    Ok(())
}

fn apply(c: u8, forwards: &[Forward]) -> Result<()> {
    let chain = chain(c);
    iptables(&["-t", "nat", "-F", &chain])?;
    for f in forwards {
        iptables(&[
            "-t",
            "nat",
            "-A",
            &chain,
            "-d",
            &format!("{}/32", f.address),
            "-p",
            "tcp",
            "--dport",
            &f.port.to_string(),
            "-j",
            "DNAT",
            "--to-destination",
            &std::net::SocketAddr::new(f.target, f.target_port).to_string(),
        ])?;
    }
    Ok(())
}

/// Addresses handed out so far, by "namespace/name": stable while the lab
/// runs.
#[derive(Default)]
struct Allocations(BTreeMap<String, u8>);

impl Allocations {
    fn of(&mut self, c: u8, key: &str) -> Option<Ipv4Addr> {
        let next = self.0.values().max().copied().unwrap_or(0).checked_add(1)?;
        let n = *self.0.entry(key.to_string()).or_insert(next);
        (n < 255).then(|| address(c, n))
    }
}

/// One pass: addresses written to the Services that lack them, and the
/// DNAT rules their ready endpoints call for.
async fn reconcile(
    client: &kube::Client,
    c: u8,
    allocations: &mut Allocations,
) -> Result<Vec<Forward>> {
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let slices = Api::<EndpointSlice>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let mut forwards = Vec::new();
    for service in &services.items {
        let Some(spec) = &service.spec else { continue };
        if spec.type_.as_deref() != Some("LoadBalancer") {
            continue;
        }
        let (Some(namespace), Some(name)) = (&service.metadata.namespace, &service.metadata.name)
        else {
            continue;
        };
        let Some(lb) = allocations.of(c, &format!("{namespace}/{name}")) else {
            tracing::warn!(%namespace, %name, "the lab's load-balancer range is full");
            continue;
        };
        let shown = service
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref())
            .and_then(|i| i.first())
            .and_then(|i| i.ip.clone());
        if shown.as_deref() != Some(&lb.to_string()) {
            Api::<Service>::namespaced(client.clone(), namespace)
                .patch_status(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(
                        json!({"status": {"loadBalancer": {"ingress": [{"ip": lb.to_string()}]}}}),
                    ),
                )
                .await?;
        }
        // The first ready endpoint: a lab gateway has one replica.
        let endpoint = slices.items.iter().filter(|s| {
            s.metadata.namespace.as_ref() == Some(namespace)
                && s.metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get("kubernetes.io/service-name"))
                    == Some(name)
        });
        let mut target = None;
        for slice in endpoint {
            for e in &slice.endpoints {
                let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(false);
                if let (true, Some(ip)) = (
                    ready,
                    e.addresses.first().and_then(|a| a.parse::<IpAddr>().ok()),
                ) {
                    target = Some((ip, slice));
                    break;
                }
            }
            if target.is_some() {
                break;
            }
        }
        let Some((ip, slice)) = target else { continue };
        for port in spec.ports.iter().flatten() {
            // The slice names the port the pod serves it on.
            let target_port = slice
                .ports
                .iter()
                .flatten()
                .find(|p| p.name == port.name)
                .and_then(|p| p.port)
                .unwrap_or(port.port);
            let (Ok(port), Ok(target_port)) =
                (u16::try_from(port.port), u16::try_from(target_port))
            else {
                continue;
            };
            forwards.push(Forward {
                address: lb,
                port,
                target: ip,
                target_port,
            });
        }
    }
    forwards.sort();
    Ok(forwards)
}

/// Runs cluster `c`'s load balancers until the task is dropped. Polls: a
/// lab has a handful of Services, and a half-second lag is what a cloud's
/// load balancer takes too.
pub async fn run(client: kube::Client, c: u8) {
    if let Err(err) = install(c) {
        tracing::error!(cluster = c, "lab load balancers unavailable: {err:#}");
        return;
    }
    let mut allocations = Allocations::default();
    let mut applied: Option<Vec<Forward>> = None;
    loop {
        match reconcile(&client, c, &mut allocations).await {
            Ok(forwards) if applied.as_ref() != Some(&forwards) => match apply(c, &forwards) {
                Ok(()) => {
                    tracing::info!(cluster = c, ?forwards, "lab load balancers");
                    applied = Some(forwards);
                }
                Err(err) => tracing::warn!(cluster = c, "lab load balancers: {err:#}"),
            },
            Ok(_) => {}
            Err(err) => tracing::debug!(cluster = c, "lab load balancers: {err:#}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_outside_every_pod_network_and_stable() {
        let mut allocations = Allocations::default();
        assert_eq!(
            allocations.of(2, "weft-system/gw"),
            Some(Ipv4Addr::new(10, 100, 2, 1))
        );
        assert_eq!(
            allocations.of(2, "demo/other"),
            Some(Ipv4Addr::new(10, 100, 2, 2))
        );
        assert_eq!(
            allocations.of(2, "weft-system/gw"),
            Some(Ipv4Addr::new(10, 100, 2, 1))
        );
        // Pods are in 10.101.0.0/16 and up; routers at 10.10x.0.1.
        assert_ne!(
            address(1, 1).octets()[1],
            crate::netns::pod_address(1, 0).octets()[1]
        );
    }
}
