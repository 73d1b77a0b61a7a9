//! The sidecar's Prometheus metrics, in one registry, served on
//! `/stats/prometheus` (15000 and 15090). Label names follow Istio's
//! standard metrics where they mean the same thing, so dashboards carry
//! over: `reporter` is `source` for the client sidecar's view and
//! `destination` for the server sidecar's.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::resources::{Name, Workload};

/// Who is at one end of a request or connection. Cloning one is cheap:
/// its parts are shared strings from the snapshot.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Peer {
    pub workload: Name,
    pub namespace: Name,
    pub cluster: Name,
    /// The SPIFFE ID, when proven by mTLS.
    pub principal: Name,
}

impl Default for Peer {
    fn default() -> Self {
        let empty = Name::from("");
        Peer {
            workload: empty.clone(),
            namespace: empty.clone(),
            cluster: empty.clone(),
            principal: empty,
        }
    }
}

impl Peer {
    /// A caller as metrics name it: all its certificate proves.
    pub fn caller(identity: Option<&weft_certs::Identity>) -> Peer {
        identity
            .map(|id| Peer {
                namespace: id.namespace.as_str().into(),
                principal: id.to_string().into(),
                ..Default::default()
            })
            .unwrap_or_default()
    }

    pub fn of(workload: &Workload) -> Peer {
        Peer {
            workload: workload.display_name(),
            namespace: workload.profile.namespace.clone(),
            cluster: workload.profile.cluster_id.clone(),
            principal: workload.profile.principal.clone(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub reporter: &'static str,
    pub source_workload: Name,
    pub source_namespace: Name,
    pub source_cluster: Name,
    pub source_principal: Name,
    pub destination_service: Name,
    pub destination_workload: Name,
    pub destination_namespace: Name,
    pub destination_cluster: Name,
    pub destination_principal: Name,
}

impl TrafficLabels {
    pub fn new(reporter: &'static str, source: &Peer, service: &Name, destination: &Peer) -> Self {
        TrafficLabels {
            reporter,
            source_workload: source.workload.clone(),
            source_namespace: source.namespace.clone(),
            source_cluster: source.cluster.clone(),
            source_principal: source.principal.clone(),
            destination_service: service.clone(),
            destination_workload: destination.workload.clone(),
            destination_namespace: destination.namespace.clone(),
            destination_cluster: destination.cluster.clone(),
            destination_principal: destination.principal.clone(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub traffic: TrafficLabels,
    pub response_code: u16,
}

/// One authorization decision: the policy that made it (empty when none
/// of the workload's policies decided, `-` when no ALLOW matched) and
/// what it was: allowed, denied, audited, dry_run_denied, dry_run_matched.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthorizationLabels {
    #[prometheus(flatten)]
    pub traffic: TrafficLabels,
    pub policy: Name,
    pub decision: &'static str,
}

/// A route that decided a request: the object it came from
/// (`<kind>/<ns>/<name>`) and what it did: forwarded, redirected,
/// fault_aborted, fault_delayed, mirrored, mirror_skipped (a body too
/// large to copy), timed_out, overflowed (connection-pool limit).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: Name,
    pub action: &'static str,
}

fn duration_histogram() -> Histogram {
    // 0.1 ms to ~13 s, doubling.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
        0.0001, 2.0, 18,
    ))
}

/// How many label sets of requests `Metrics` keeps resolved.
const RECENT_REQUESTS: usize = 8;

/// A label set of requests with its two series, resolved.
type RequestSeries = (RequestLabels, Counter, Histogram);

pub struct Metrics {
    registry: Registry,
    /// The label sets requests were counted under most recently, with
    /// their series, newest first. Finding a request's series in a family
    /// hashes its ten labels, twice a request; a sidecar's requests mostly
    /// go to a few destinations, whose labels compare equal at once (their
    /// names are the snapshot's, shared). Families never drop a series,
    /// so a kept one is never stale.
    recent_requests: std::sync::Mutex<Vec<RequestSeries>>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub tcp_opened: Family<TrafficLabels, Counter>,
    pub tcp_closed: Family<TrafficLabels, Counter>,
    pub tcp_sent_bytes: Family<TrafficLabels, Counter>,
    pub tcp_received_bytes: Family<TrafficLabels, Counter>,
    pub authorization: Family<AuthorizationLabels, Counter>,
    pub retries: Counter,
    pub upstream_connect_failures: Counter,
    /// Access-log lines dropped because the writer fell behind.
    pub access_log_dropped: Counter,
    /// East-west gateways this proxy failed to reach (each then left out
    /// for a while).
    pub gateway_failures: Counter,
    /// Gateway mode: tunnels from other networks, by outcome.
    pub gateway_tunnels: Family<OutcomeLabels, Counter>,
    /// The DNS proxy's queries: answered here (`mesh`), `forwarded`,
    /// `failed` upstream, or `dropped`.
    pub dns_queries: Family<OutcomeLabels, Counter>,
    pub routed: Family<RouteLabels, Counter>,
    pub overflows: Counter,
    /// Set from the other parts' own counters when scraped.
    pub outlier_ejections: Counter,
    pub inbound_plaintext_refused: Counter,
    pub inbound_not_local_refused: Counter,
    pub inbound_link_refused: Counter,
    pub xds_connected: Gauge,
    pub xds_acks: Counter,
    pub xds_nacks: Counter,
    pub xds_reconnects: Counter,
    pub certificate_expiry: Gauge,
    pub draining: Gauge,
    pub services: Gauge,
    pub workloads: Gauge,
    pub authorization_policies: Gauge,
    pub route_sets: Gauge,
    pub destination_policies: Gauge,
    pub resident_memory: Gauge,
    pub heap_in_use: Gauge,
    pub heap_free: Gauge,
    pub cpu_seconds: Counter<f64, std::sync::atomic::AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("weft_proxy");
        let m = Metrics {
            registry: Registry::default(),
            recent_requests: std::sync::Mutex::new(Vec::with_capacity(RECENT_REQUESTS)),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            tcp_opened: Family::default(),
            tcp_closed: Family::default(),
            tcp_sent_bytes: Family::default(),
            tcp_received_bytes: Family::default(),
            authorization: Family::default(),
            retries: Counter::default(),
            upstream_connect_failures: Counter::default(),
            access_log_dropped: Counter::default(),
            gateway_failures: Counter::default(),
            gateway_tunnels: Family::default(),
            dns_queries: Family::default(),
            routed: Family::default(),
            overflows: Counter::default(),
            outlier_ejections: Counter::default(),
            inbound_plaintext_refused: Counter::default(),
            inbound_not_local_refused: Counter::default(),
            inbound_link_refused: Counter::default(),
            xds_connected: Gauge::default(),
            xds_acks: Counter::default(),
            xds_nacks: Counter::default(),
            xds_reconnects: Counter::default(),
            certificate_expiry: Gauge::default(),
            draining: Gauge::default(),
            services: Gauge::default(),
            workloads: Gauge::default(),
            authorization_policies: Gauge::default(),
            route_sets: Gauge::default(),
            destination_policies: Gauge::default(),
            resident_memory: Gauge::default(),
            heap_in_use: Gauge::default(),
            heap_free: Gauge::default(),
            cpu_seconds: Counter::default(),
        };
        let r = &mut registry;
        r.register(
            "requests",
            "HTTP requests, by peers and response code",
            m.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "HTTP request duration to the response headers",
            m.request_duration.clone(),
        );
        r.register(
            "tcp_connections_opened",
            "TCP connections opened",
            m.tcp_opened.clone(),
        );
        r.register(
            "tcp_connections_closed",
            "TCP connections closed",
            m.tcp_closed.clone(),
        );
        r.register(
            "tcp_sent_bytes",
            "Bytes sent towards the destination on TCP connections",
            m.tcp_sent_bytes.clone(),
        );
        r.register(
            "tcp_received_bytes",
            "Bytes received from the destination on TCP connections",
            m.tcp_received_bytes.clone(),
        );
        r.register(
            "authorization_decisions",
            "Connections and requests checked against authorization policy, by policy and decision",
            m.authorization.clone(),
        );
        r.register(
            "retries",
            "Requests and connects retried on another endpoint",
            m.retries.clone(),
        );
        r.register(
            "upstream_connect_failures",
            "Connections to an endpoint or its sidecar that failed",
            m.upstream_connect_failures.clone(),
        );
        r.register(
            "access_log_dropped",
            "Access-log lines dropped because standard output fell behind",
            m.access_log_dropped.clone(),
        );
        r.register(
            "gateway_failures",
            "East-west gateways into other networks this proxy failed to reach",
            m.gateway_failures.clone(),
        );
        r.register(
            "gateway_tunnels",
            "Gateway mode: tunnels from other networks, by outcome (forwarded, or why refused)",
            m.gateway_tunnels.clone(),
        );
        r.register(
            "dns_queries",
            "Queries to the sidecar's DNS proxy, by outcome (mesh, forwarded, failed, dropped)",
            m.dns_queries.clone(),
        );
        r.register(
            "routed",
            "Requests a route (VirtualService, HTTPRoute, GRPCRoute) decided, by route and action",
            m.routed.clone(),
        );
        r.register(
            "overflows",
            "Requests and connections refused because a DestinationRule's connection pool was full",
            m.overflows.clone(),
        );
        r.register(
            "route_sets",
            "Route objects (VirtualService, HTTPRoute, GRPCRoute) held",
            m.route_sets.clone(),
        );
        r.register(
            "destination_policies",
            "DestinationRules held",
            m.destination_policies.clone(),
        );
        r.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection",
            m.outlier_ejections.clone(),
        );
        r.register(
            "inbound_plaintext_refused",
            "Plaintext inbound connections refused in STRICT mode",
            m.inbound_plaintext_refused.clone(),
        );
        r.register(
            "inbound_link_refused",
            "Requests on HTTP/1.1 links from peer sidecars refused as unframeable or too slow (the link is closed)",
            m.inbound_link_refused.clone(),
        );
        r.register(
            "inbound_not_local_refused",
            "Redirected connections refused on 15006 because they were not for this pod's addresses",
            m.inbound_not_local_refused.clone(),
        );
        r.register(
            "xds_connected",
            "1 when the xDS stream to the control plane is up",
            m.xds_connected.clone(),
        );
        r.register("xds_acks", "xDS responses accepted", m.xds_acks.clone());
        r.register("xds_nacks", "xDS responses refused", m.xds_nacks.clone());
        r.register(
            "xds_reconnects",
            "xDS streams re-established",
            m.xds_reconnects.clone(),
        );
        r.register(
            "certificate_expiry_timestamp_seconds",
            "When the workload certificate expires (Unix time)",
            m.certificate_expiry.clone(),
        );
        r.register(
            "draining",
            "1 while the sidecar drains before exiting",
            m.draining.clone(),
        );
        r.register(
            "services",
            "Services in the configuration snapshot",
            m.services.clone(),
        );
        r.register(
            "workloads",
            "Workloads in the configuration snapshot",
            m.workloads.clone(),
        );
        r.register(
            "authorization_policies",
            "Authorization policies in the configuration snapshot",
            m.authorization_policies.clone(),
        );
        r.register(
            "process_resident_memory_bytes",
            "The sidecar's resident memory",
            m.resident_memory.clone(),
        );
        r.register(
            "heap_in_use_bytes",
            "Bytes in live heap allocations",
            m.heap_in_use.clone(),
        );
        r.register(
            "heap_free_bytes",
            "Heap bytes in free chunks the allocator keeps (pages of them may be back with the system)",
            m.heap_free.clone(),
        );
        r.register(
            "process_cpu_seconds",
            "CPU time the sidecar has used, user and system",
            m.cpu_seconds.clone(),
        );
        Metrics { registry, ..m }
    }
}

/// Moves a counter up to `value`, for counts kept elsewhere as atomics.
pub fn catch_up(counter: &Counter, value: u64) {
    let current = counter.get();
    if value > current {
        counter.inc_by(value - current);
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// How many connections and requests this sidecar served for the
    /// caller that proved `principal`, read from the metrics text (for
    /// tests and debugging; nothing on the request path keeps it).
    pub fn calls_from(&self, principal: &str) -> u64 {
        let wanted = format!("source_principal=\"{principal}\"");
        self.encode()
            .lines()
            .filter(|line| {
                (line.starts_with("weft_proxy_requests_total{")
                    || line.starts_with("weft_proxy_tcp_connections_opened_total{"))
                    && line.contains("reporter=\"destination\"")
                    && line.contains(&wanted)
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    pub fn request(&self, labels: RequestLabels, seconds: f64) {
        // A poisoned lock only means a panic elsewhere: the list is whole.
        let mut recent = self
            .recent_requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(at) = recent.iter().position(|(kept, ..)| *kept == labels) {
            let (_, count, duration) = &recent[at];
            count.inc();
            duration.observe(seconds);
            // Moved to the front, so the busiest stay.
            recent[..=at].rotate_right(1);
            return;
        }
        let count = self.requests.get_or_create(&labels).clone();
        let duration = self.request_duration.get_or_create(&labels).clone();
        count.inc();
        duration.observe(seconds);
        recent.truncate(RECENT_REQUESTS - 1);
        recent.insert(0, (labels, count, duration));
    }

    pub fn tcp(&self, labels: &TrafficLabels, sent: u64, received: u64) {
        self.tcp_closed.get_or_create(labels).inc();
        self.tcp_sent_bytes.get_or_create(labels).inc_by(sent);
        self.tcp_received_bytes
            .get_or_create(labels)
            .inc_by(received);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(workload: &str, code: u16) -> RequestLabels {
        let peer = Peer {
            workload: workload.into(),
            ..Default::default()
        };
        RequestLabels {
            traffic: TrafficLabels::new("source", &Peer::default(), &"svc".into(), &peer),
            response_code: code,
        }
    }

    /// What the scraped text says for `workload` and `code`: the request
    /// count, and the duration histogram's count.
    fn counted(text: &str, workload: &str, code: u16) -> (u64, u64) {
        let series = |metric: &str| -> u64 {
            let of = format!("destination_workload=\"{workload}\"");
            let code = format!("response_code=\"{code}\"");
            let lines: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with(metric) && l.contains(&of) && l.contains(&code))
                .collect();
            assert_eq!(lines.len(), 1, "{metric} {workload} {code}: {lines:?}");
            lines[0]
                .rsplit(' ')
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or(0)
        };
        (
            series("weft_proxy_requests_total{"),
            series("weft_proxy_request_duration_seconds_count{"),
        )
    }

    #[test]
    fn requests_are_counted_under_their_own_labels_kept_or_not() {
        let metrics = Metrics::default();
        // More label sets than are kept resolved, in an order that evicts
        // some and finds others kept: each count lands in its own series.
        let mut expected = std::collections::HashMap::new();
        for round in 0..3u16 {
            for n in 0..(RECENT_REQUESTS as u16 + 3) {
                for code in [200, 503] {
                    let times = 1 + (n + round) % 3;
                    for _ in 0..times {
                        metrics.request(labels(&format!("w{n}"), code), 0.001);
                    }
                    *expected.entry((n, code)).or_insert(0u64) += u64::from(times);
                }
            }
        }
        let text = metrics.encode();
        for ((n, code), times) in expected {
            assert_eq!(counted(&text, &format!("w{n}"), code), (times, times));
        }
    }
}
