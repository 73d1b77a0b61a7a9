//! The control plane's Prometheus metrics, in one registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GatewayLabels {
    pub gateway: String,
    pub network: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub reason: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub managed_clusters: Gauge,
    pub cluster_synced: Family<ClusterLabels, Gauge>,
    pub cluster_stale: Family<ClusterLabels, Gauge>,
    pub connected_proxies: Gauge,
    pub pushes: Counter,
    pub pushed_resources: Counter,
    pub pushed_bytes: Counter,
    pub nacks: Counter,
    pub rejected_secrets: Family<RejectLabels, Counter>,
    pub push_latency: Histogram,
    pub convergence_latency: Histogram,
    pub certificates_issued: Counter,
    pub certificates_refused: Counter,
    /// xDS streams refused for want of a mesh client certificate.
    pub xds_refused: Counter,
    /// Connections to 15012 closed before the handshake, by reason.
    pub connections_refused: Family<RejectLabels, Counter>,
    /// When the control plane's own serving certificates were last issued.
    pub serving_cert_rotations: Counter,
    /// 1 while an east-west gateway passes its probe, 0 once it failed
    /// as often in a row as the threshold.
    pub gateway_up: Family<GatewayLabels, Gauge>,
    pub gateway_probe_failures: Family<GatewayLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("weft_control");
        let m = Metrics {
            managed_clusters: Gauge::default(),
            cluster_synced: Family::default(),
            cluster_stale: Family::default(),
            connected_proxies: Gauge::default(),
            pushes: Counter::default(),
            pushed_resources: Counter::default(),
            pushed_bytes: Counter::default(),
            nacks: Counter::default(),
            rejected_secrets: Family::default(),
            // 1 ms to ~16 s.
            push_latency: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            convergence_latency: Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            certificates_issued: Counter::default(),
            certificates_refused: Counter::default(),
            xds_refused: Counter::default(),
            connections_refused: Family::default(),
            serving_cert_rotations: Counter::default(),
            gateway_up: Family::default(),
            gateway_probe_failures: Family::default(),
            registry: Registry::default(),
        };
        registry.register(
            "managed_clusters",
            "Clusters the control plane watches, the local one included",
            m.managed_clusters.clone(),
        );
        registry.register(
            "cluster_synced",
            "1 when a cluster's watchers have listed everything",
            m.cluster_synced.clone(),
        );
        registry.register(
            "cluster_stale",
            "1 when a cluster is unreachable and its last known workloads are served",
            m.cluster_stale.clone(),
        );
        registry.register(
            "connected_proxies",
            "Open delta xDS streams",
            m.connected_proxies.clone(),
        );
        registry.register("xds_pushes", "Delta xDS responses sent", m.pushes.clone());
        registry.register(
            "xds_pushed_resources",
            "Resources and removals sent in delta xDS responses",
            m.pushed_resources.clone(),
        );
        registry.register(
            "xds_pushed_bytes",
            "Encoded resource bytes sent in delta xDS responses",
            m.pushed_bytes.clone(),
        );
        registry.register("xds_nacks", "Pushes a proxy rejected", m.nacks.clone());
        registry.register(
            "rejected_remote_secrets",
            "Remote cluster entries refused, by reason",
            m.rejected_secrets.clone(),
        );
        registry.register(
            "xds_push_latency_seconds",
            "From a model version to a response carrying it",
            m.push_latency.clone(),
        );
        registry.register(
            "convergence_latency_seconds",
            "From the first change of a batch to its model version",
            m.convergence_latency.clone(),
        );
        registry.register(
            "certificates_issued",
            "Workload certificates signed",
            m.certificates_issued.clone(),
        );
        registry.register(
            "certificates_refused",
            "Certificate requests refused",
            m.certificates_refused.clone(),
        );
        registry.register(
            "xds_refused",
            "xDS streams refused: no client certificate from the mesh CA",
            m.xds_refused.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections to the xDS/CA port closed unserved, by reason",
            m.connections_refused.clone(),
        );
        registry.register(
            "serving_cert_rotations",
            "Serving certificates (xDS, webhook) issued to the control plane itself",
            m.serving_cert_rotations.clone(),
        );
        registry.register(
            "gateway_up",
            "Whether an east-west gateway of another network passes its probe (1) or is taken out (0)",
            m.gateway_up.clone(),
        );
        registry.register(
            "gateway_probe_failures",
            "Probes of an east-west gateway that failed",
            m.gateway_probe_failures.clone(),
        );
        Metrics { registry, ..m }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
