//! `weft-control`: the per-cluster control plane binary.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use weft_control::hub::Debounce;
use weft_control::{Config, ControlPlane};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Scope {
    Global,
    Local,
}

#[derive(Parser)]
#[command(
    name = "weft-control",
    version,
    about = "weft's per-cluster control plane"
)]
struct Args {
    /// This cluster's id, as other clusters' remote secrets name it.
    #[arg(long, env = "WEFT_CLUSTER_ID")]
    cluster_id: String,
    /// The network this cluster's pods are on (pods on one network reach
    /// each other directly), when the label topology.weft.io/network on
    /// --namespace does not say.
    #[arg(long, env = "WEFT_NETWORK", default_value = "default")]
    network: String,
    /// Kubeconfig of the local cluster; in-cluster configuration when absent.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Namespace of the control plane, its cacerts and the remote secrets.
    #[arg(long, env = "WEFT_NAMESPACE", default_value = "weft-system")]
    namespace: String,
    #[arg(long, env = "WEFT_TRUST_DOMAIN", default_value = "cluster.local")]
    trust_domain: String,
    /// Plain-text xDS; for tests only, never expose it.
    #[arg(long, env = "WEFT_XDS_PLAIN_ADDR")]
    xds_plain_addr: Option<SocketAddr>,
    /// mTLS xDS and the CA service.
    #[arg(long, env = "WEFT_XDS_ADDR", default_value = "0.0.0.0:15012")]
    xds_addr: SocketAddr,
    /// The sidecar injection webhook.
    #[arg(long, env = "WEFT_WEBHOOK_ADDR", default_value = "0.0.0.0:15017")]
    webhook_addr: SocketAddr,
    /// The control plane address injected sidecars dial (default: this
    /// Service's DNS name, weft-control.<namespace>.svc:15012).
    #[arg(long, env = "WEFT_PROXY_CONTROL_PLANE")]
    proxy_control_plane: Option<String>,
    /// Image of the injected sidecar and init container.
    #[arg(long, env = "WEFT_PROXY_IMAGE")]
    proxy_image: Option<String>,
    /// Injected sidecars write JSON access logs to standard output, unless
    /// their pod says otherwise (annotation sidecar.weft.io/accessLog).
    #[arg(long, env = "WEFT_INJECT_ACCESS_LOG")]
    access_log: bool,
    /// Injected sidecar resources, as Kubernetes quantities.
    #[arg(long, env = "WEFT_PROXY_CPU_REQUEST", default_value = "10m")]
    proxy_cpu_request: String,
    #[arg(long, env = "WEFT_PROXY_MEMORY_REQUEST", default_value = "16Mi")]
    proxy_memory_request: String,
    #[arg(long, env = "WEFT_PROXY_CPU_LIMIT", default_value = "1")]
    proxy_cpu_limit: String,
    #[arg(long, env = "WEFT_PROXY_MEMORY_LIMIT", default_value = "128Mi")]
    proxy_memory_limit: String,
    /// /metrics, /ready and /debug.
    #[arg(long, env = "WEFT_MONITORING_ADDR", default_value = "0.0.0.0:15014")]
    monitoring_addr: SocketAddr,
    /// Quiet period before a push, in milliseconds.
    #[arg(long, env = "WEFT_DEBOUNCE_MS", default_value_t = 100)]
    debounce_ms: u64,
    /// Longest a change waits for a push, in milliseconds.
    #[arg(long, env = "WEFT_DEBOUNCE_MAX_MS", default_value_t = 10_000)]
    debounce_max_ms: u64,
    /// Seconds an unreachable remote cluster may hold back readiness.
    #[arg(long, env = "WEFT_REMOTE_SYNC_TIMEOUT", default_value_t = 30)]
    remote_sync_timeout: u64,
    /// Services never merged across clusters: "ns/name" or "ns/*"; repeatable.
    #[arg(
        long = "cluster-local",
        env = "WEFT_CLUSTER_LOCAL",
        value_delimiter = ','
    )]
    cluster_local: Vec<String>,
    /// Services without a weft.io/global annotation: merged across
    /// clusters (global) or kept in their own (local).
    #[arg(long, env = "WEFT_DEFAULT_SCOPE", value_enum, default_value = "global")]
    default_scope: Scope,
    /// `cluster.local` names stay in their own cluster; only the
    /// `clusterset.local` names of exported services (MCS ServiceExport)
    /// cross clusters. Istio's ENABLE_MCS_CLUSTER_LOCAL.
    #[arg(long, env = "WEFT_MCS_CLUSTER_LOCAL")]
    mcs_cluster_local: bool,
    /// Where security policy without a selector is mesh-wide (Istio's
    /// meshConfig rootNamespace); default: --namespace. Set istio-system to
    /// take mesh-wide policy written for Istio as it is.
    #[arg(long, env = "WEFT_ROOT_NAMESPACE")]
    root_namespace: Option<String>,
    /// Lifetime of the control plane's own xDS and webhook certificates,
    /// in seconds; they are renewed at half of it.
    #[arg(long, env = "WEFT_SERVING_CERT_LIFETIME", default_value_t = 86_400)]
    serving_cert_lifetime: u64,
    /// xDS streams end after about this many seconds (give or take 10%),
    /// so that proxies spread over the replicas there are now.
    #[arg(long, env = "WEFT_XDS_MAX_STREAM_AGE", default_value_t = 1_800)]
    xds_max_stream_age: u64,
    /// Open connections one IP address may hold on the xDS/CA port.
    #[arg(long, env = "WEFT_XDS_CONNECTIONS_PER_PEER", default_value_t = 64)]
    xds_connections_per_peer: usize,
    /// Seconds between probes of another network's east-west gateway.
    #[arg(long, env = "WEFT_GATEWAY_PROBE_PERIOD", default_value_t = 3.0)]
    gateway_probe_period: f64,
    /// Seconds a gateway probe may take.
    #[arg(long, env = "WEFT_GATEWAY_PROBE_TIMEOUT", default_value_t = 1.0)]
    gateway_probe_timeout: f64,
    /// Failed probes in a row that take a gateway out.
    #[arg(long, env = "WEFT_GATEWAY_PROBE_FAILURES", default_value_t = 3)]
    gateway_probe_failures: u32,
}

/// Seconds from a flag, refused when not a positive finite number.
fn seconds(flag: &str, value: f64) -> anyhow::Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("--{flag} {value}: not a positive number of seconds"))
}

async fn local_client(kubeconfig: Option<&PathBuf>) -> anyhow::Result<kube::Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await?
        }
        None => {
            kube::Config::incluster().context("no --kubeconfig and not running in a cluster")?
        }
    };
    Ok(kube::Client::try_from(config)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kube=warn,tower=warn,hyper=warn".into()),
        )
        .init();
    let args = Args::parse();
    let client = local_client(args.kubeconfig.as_ref()).await?;
    let mut injection = weft_control::inject::Values::new(&args.cluster_id, &args.namespace);
    if let Some(image) = args.proxy_image {
        injection.proxy_image = image;
    }
    if let Some(address) = args.proxy_control_plane {
        injection.control_plane = address;
    }
    injection.network = args.network.clone();
    injection.access_log = args.access_log;
    injection.proxy_cpu_request = args.proxy_cpu_request;
    injection.proxy_memory_request = args.proxy_memory_request;
    injection.proxy_cpu_limit = args.proxy_cpu_limit;
    injection.proxy_memory_limit = args.proxy_memory_limit;
    let config = Config {
        webhook_addr: Some(args.webhook_addr),
        injection,
        network: args.network,
        root_namespace: args
            .root_namespace
            .unwrap_or_else(|| args.namespace.clone()),
        namespace: args.namespace,
        trust_domain: args.trust_domain,
        xds_plain_addr: args.xds_plain_addr,
        xds_tls_addr: Some(args.xds_addr),
        monitoring_addr: Some(args.monitoring_addr),
        debounce: Debounce {
            quiet: Duration::from_millis(args.debounce_ms),
            max_delay: Duration::from_millis(args.debounce_max_ms),
        },
        remote_timeout: Duration::from_secs(args.remote_sync_timeout),
        cluster_local: args.cluster_local,
        default_global: args.default_scope == Scope::Global,
        mcs_cluster_local: args.mcs_cluster_local,
        serving_cert_lifetime: Duration::from_secs(args.serving_cert_lifetime.max(2)),
        xds_max_stream_age: Duration::from_secs(args.xds_max_stream_age.max(1)),
        xds_limits: weft_control::tls::Limits {
            connections_per_peer: args.xds_connections_per_peer.max(1),
            ..Default::default()
        },
        gateway_probe: weft_control::gateway_probe::ProbeConfig {
            period: seconds("gateway-probe-period", args.gateway_probe_period)?,
            timeout: seconds("gateway-probe-timeout", args.gateway_probe_timeout)?,
            failures: args.gateway_probe_failures.max(1),
        },
        ..Config::new(args.cluster_id)
    };
    let control = ControlPlane::start(config, client).await?;
    // Kubernetes stops pods with SIGTERM; a terminal sends SIGINT.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = terminate.recv() => {}
        interrupted = tokio::signal::ctrl_c() => interrupted.context("waiting for a shutdown signal")?,
    }
    tracing::info!("shutting down");
    control.stop();
    Ok(())
}
