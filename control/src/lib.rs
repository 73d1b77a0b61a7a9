//! `weft-control`, the per-cluster control plane.
//!
//! One instance runs in every cluster of a multi-primary mesh. It owns the
//! Kubernetes watchers on the local API server and on every remote API server
//! registered through a kubeconfig Secret (`cluster`, `remotes`,
//! `kubeconfig`), the merged mesh model built from them (`model`, `hub`), the
//! delta xDS server that pushes `Service` and `Workload` resources to proxies
//! (`xds`), the probe of other networks' east-west gateways
//! (`gateway_probe`), the CA service that signs workload certificates (`ca`), and the
//! monitoring endpoints (`admin`, `metrics`). It never depends on the proxy
//! crate; the two meet only on the wire protocols of `weft-xds-proto`.

pub mod admin;
pub mod ca;
pub mod cluster;
pub mod drain;
pub mod gateway_probe;
pub mod hub;
pub mod inject;
pub mod kubeconfig;
pub mod mcs;
pub mod metrics;
pub mod model;
pub mod policy_status;
pub mod proxy_status;
pub mod publish;
pub mod remote_secret;
pub mod remotes;
pub mod security;
pub mod serve;
pub mod service_import;
pub mod serving;
pub mod tls;
pub mod traffic;
pub mod xds;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use weft_certs::tls::TrustBundle;
use weft_certs::{CertificateAuthority, Identity};
use weft_xds_proto::ca::certificate_service_server::CertificateServiceServer;
use weft_xds_proto::encoded::ads::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;

use crate::hub::{Debounce, Hub};
use crate::model::{Model, ModelConfig};

/// The largest message a proxy may send: a reconnecting proxy's request
/// lists the version of everything it holds (about 60 bytes a workload), so
/// 4 MiB is room for ~60,000 workloads; anything larger is refused before
/// it is buffered.
pub const XDS_MAX_MESSAGE: usize = 4 * 1024 * 1024;

/// Everything a control plane is started with.
#[derive(Clone, Debug)]
pub struct Config {
    pub cluster_id: String,
    pub network: String,
    pub namespace: String,
    pub trust_domain: String,
    pub domain_suffix: String,
    /// Plain-text xDS, for tests and benchmarks only.
    pub xds_plain_addr: Option<SocketAddr>,
    /// mTLS xDS and the CA service.
    pub xds_tls_addr: Option<SocketAddr>,
    pub monitoring_addr: Option<SocketAddr>,
    /// The sidecar injection webhook (15017).
    pub webhook_addr: Option<SocketAddr>,
    /// What injected sidecars are rendered with.
    pub injection: inject::Values,
    pub debounce: Debounce,
    /// How long an unreachable remote may hold readiness back.
    pub remote_timeout: Duration,
    /// "ns/name" or "ns/*" services that are never merged across clusters.
    pub cluster_local: Vec<String>,
    /// Whether Services without a scope annotation are merged across
    /// clusters (`--default-scope global`) or kept local.
    pub default_global: bool,
    /// `cluster.local` names stay in their own cluster; only
    /// `clusterset.local` names of exported services cross clusters
    /// (`--mcs-cluster-local`, Istio's `ENABLE_MCS_CLUSTER_LOCAL`).
    pub mcs_cluster_local: bool,
    /// Where security policy without a selector is mesh-wide (Istio's
    /// `rootNamespace`); the control plane's namespace by default.
    pub root_namespace: String,
    /// Lifetime of the control plane's own serving certificates (xDS,
    /// webhook); they are renewed at half of it.
    pub serving_cert_lifetime: Duration,
    /// xDS streams end after about this long (give or take 10%), so that
    /// proxies spread over replicas again; Istio uses 30 minutes.
    pub xds_max_stream_age: Duration,
    /// Bounds on the xDS/CA port's connections.
    pub xds_limits: tls::Limits,
    /// How the east-west gateways of other networks are probed.
    pub gateway_probe: gateway_probe::ProbeConfig,
}

impl Config {
    pub fn new(cluster_id: impl Into<String>) -> Self {
        let cluster_id = cluster_id.into();
        Config {
            injection: inject::Values::new(&cluster_id, "weft-system"),
            webhook_addr: None,
            cluster_id,
            network: "default".into(),
            namespace: "weft-system".into(),
            trust_domain: "cluster.local".into(),
            domain_suffix: "cluster.local".into(),
            xds_plain_addr: None,
            xds_tls_addr: None,
            monitoring_addr: None,
            debounce: Debounce::default(),
            remote_timeout: Duration::from_secs(30),
            cluster_local: Vec::new(),
            default_global: true,
            mcs_cluster_local: false,
            root_namespace: "weft-system".into(),
            serving_cert_lifetime: Duration::from_secs(24 * 3600),
            xds_max_stream_age: Duration::from_secs(30 * 60),
            xds_limits: tls::Limits::default(),
            gateway_probe: gateway_probe::ProbeConfig::default(),
        }
    }
}

/// A running control plane.
pub struct ControlPlane {
    pub webhook_addr: Option<SocketAddr>,
    pub xds_plain_addr: Option<SocketAddr>,
    pub xds_tls_addr: Option<SocketAddr>,
    pub monitoring_addr: Option<SocketAddr>,
    pub hub: Arc<Hub>,
    pub ca: Arc<CertificateAuthority>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn bind(addr: Option<SocketAddr>, what: &str) -> anyhow::Result<Option<TcpListener>> {
    match addr {
        Some(addr) => {
            Ok(Some(TcpListener::bind(addr).await.with_context(|| {
                format!("binding the {what} port {addr}")
            })?))
        }
        None => Ok(None),
    }
}

impl ControlPlane {
    /// Starts everything against the local API server's client. Returns once
    /// the ports are bound; syncing goes on in the background (see `/ready`).
    pub async fn start(config: Config, local: kube::Client) -> anyhow::Result<Self> {
        let model = Model::new(ModelConfig {
            local_cluster: config.cluster_id.clone(),
            network: config.network.clone(),
            trust_domain: config.trust_domain.clone(),
            domain_suffix: config.domain_suffix.clone(),
            system_namespace: config.namespace.clone(),
            root_namespace: config.root_namespace.clone(),
            cluster_local: config.cluster_local.clone(),
            default_global: config.default_global,
            mcs_cluster_local: config.mcs_cluster_local,
        });
        let (hub, nudges) = Hub::new(model);
        let (updates_tx, updates) = mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        tasks.push(tokio::spawn(hub.clone().run(
            updates,
            nudges,
            config.debounce,
        )));

        hub.model().add_cluster(&config.cluster_id, 0);
        let local_watchers = cluster::spawn_watchers(
            local.clone(),
            config.cluster_id.clone(),
            0,
            updates_tx.clone(),
        );
        tasks.extend(local_watchers);
        tasks.extend(cluster::spawn_policy_watchers(
            local.clone(),
            config.cluster_id.clone(),
            config.domain_suffix.clone(),
            updates_tx.clone(),
        ));
        tasks.push(tokio::spawn(policy_status::run(hub.clone(), local.clone())));
        tasks.push(tokio::spawn(service_import::run(
            hub.clone(),
            local.clone(),
        )));
        tasks.push(tokio::spawn(gateway_probe::run(
            hub.clone(),
            config.gateway_probe,
        )));

        let remotes =
            remotes::RemoteClusters::new(hub.clone(), updates_tx, config.cluster_id.clone());
        tasks.push(tokio::spawn(remotes::run(
            remotes,
            local.clone(),
            config.namespace.clone(),
        )));

        let ca = Arc::new(ca::load(&local, &config.namespace, &config.trust_domain).await?);

        let plain = bind(config.xds_plain_addr, "plain xDS").await?;
        let secure = bind(config.xds_tls_addr, "xDS TLS").await?;
        let monitoring = bind(config.monitoring_addr, "monitoring").await?;
        let webhook = bind(config.webhook_addr, "webhook").await?;
        let webhook_addr = webhook.as_ref().and_then(|l| l.local_addr().ok());
        tasks.push(tokio::spawn(publish::run(local.clone(), ca.roots_pem())));
        let identity = Identity::new(&config.trust_domain, &config.namespace, "weft-control")?;
        let serving = serving::ServingCerts::issue(
            &ca,
            identity,
            &config.namespace,
            &config.domain_suffix,
            config.serving_cert_lifetime,
        )?;
        tasks.push(tokio::spawn(
            serving.clone().rotate(ca.clone(), hub.clone()),
        ));
        if let Some(listener) = webhook {
            let tls = serving.webhook.server_config(&[b"h2", b"http/1.1"])?;
            let mut values = config.injection.clone();
            values.cluster_id = config.cluster_id.clone();
            values.network = config.network.clone();
            values.trust_domain = config.trust_domain.clone();
            tasks.push(tokio::spawn(inject::webhook::serve(
                listener,
                tls,
                Arc::new(values),
            )));
        }
        let xds_plain_addr = plain.as_ref().and_then(|l| l.local_addr().ok());
        let xds_tls_addr = secure.as_ref().and_then(|l| l.local_addr().ok());
        let monitoring_addr = monitoring.as_ref().and_then(|l| l.local_addr().ok());

        if let Some(listener) = plain {
            let ads = AggregatedDiscoveryServiceServer::new(xds::AdsServer::new(
                hub.clone(),
                xds::Gate::new(config.remote_timeout, &config.debounce),
            ))
            .max_decoding_message_size(XDS_MAX_MESSAGE);
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            tasks.push(tokio::spawn(async move {
                if let Err(err) = tonic::transport::Server::builder()
                    .add_service(ads)
                    .serve_with_incoming(incoming)
                    .await
                {
                    tracing::error!(%err, "plain xDS server stopped");
                }
            }));
        }
        if let Some(listener) = secure {
            let bundle = TrustBundle::from_pem(&ca.roots_pem())?;
            let tls = weft_certs::tls::server_config_optional_client(&serving.xds, &bundle)?;
            let ads = AggregatedDiscoveryServiceServer::new(xds::AdsServer::for_mesh(
                hub.clone(),
                xds::Gate::new(config.remote_timeout, &config.debounce),
                config.xds_max_stream_age,
            ))
            .max_decoding_message_size(XDS_MAX_MESSAGE);
            let ca_service = CertificateServiceServer::new(ca::CaService::new(
                ca.clone(),
                local.clone(),
                hub.clone(),
            ))
            .max_decoding_message_size(XDS_MAX_MESSAGE);
            let limits = config.xds_limits;
            let incoming = tls::incoming(
                listener,
                tls,
                limits,
                hub.metrics.connections_refused.clone(),
            );
            // Keepalive notices a dead peer (a node gone, a NAT entry
            // dropped) within a minute on both ends; the age bound sends
            // GOAWAY to any client the stream age did not already move.
            let age_bound = config.xds_max_stream_age.mul_f64(1.2);
            tasks.push(tokio::spawn(async move {
                if let Err(err) = tonic::transport::Server::builder()
                    .max_concurrent_streams(Some(limits.streams_per_connection))
                    .http2_keepalive_interval(Some(limits.keepalive_interval))
                    .http2_keepalive_timeout(Some(limits.keepalive_timeout))
                    .max_connection_age(age_bound)
                    .max_connection_age_grace(Duration::from_secs(10))
                    .http2_max_header_list_size(Some(16 * 1024))
                    .add_service(ads)
                    .add_service(ca_service)
                    .serve_with_incoming(incoming)
                    .await
                {
                    tracing::error!(%err, "xDS TLS server stopped");
                }
            }));
        }
        if let Some(listener) = monitoring {
            tasks.push(tokio::spawn(admin::serve(
                listener,
                hub.clone(),
                config.remote_timeout,
            )));
        }
        tracing::info!(cluster = %config.cluster_id, ?xds_plain_addr, ?xds_tls_addr, ?monitoring_addr, "control plane started");
        Ok(ControlPlane {
            webhook_addr,
            xds_plain_addr,
            xds_tls_addr,
            monitoring_addr,
            hub,
            ca,
            tasks,
        })
    }

    pub fn ready(&self, remote_timeout: Duration) -> bool {
        self.hub.model().ready(remote_timeout)
    }

    /// Stops every task (watchers, servers, the model loop).
    pub fn stop(self) {
        drop(self);
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.hub.shut_down();
        for task in &self.tasks {
            task.abort();
        }
    }
}
