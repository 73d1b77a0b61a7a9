//! The sidecar assembled: identity, xDS, the inbound mesh port, the
//! outbound listener and readiness, from one configuration read at start.
//! In gateway mode the same parts run, but the mesh port forwards to other
//! sidecars (`gateway`) and nothing is captured or sent out.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use weft_certs::Identity;
use weft_certs::tls::{CertStore, TrustBundle};
use weft_xds_proto::envoy::config::core::v3::Node;

use crate::admin::{Admin, Routes, SetLogLevel};
use crate::balance::Here;
use crate::drain::Drain;
use crate::identity::{self, IdentityConfig};
use crate::local_app::{self, LocalApp};
use crate::metrics::Metrics;
use crate::outbound::{self, Outbound};
use crate::pool::{HBONE_PORT, Pool};
use crate::xds::{self, Backoff, XdsState};

#[derive(Clone, Debug)]
pub struct SidecarConfig {
    /// host:port of the control plane's TLS port.
    pub control_plane: String,
    pub cluster_id: String,
    /// This pod's network, until its workload in the mesh says
    /// (`WEFT_NETWORK`).
    pub network: String,
    /// A sidecar, or an east-west gateway (`proxy gateway`).
    pub mode: Mode,
    pub trust_domain: String,
    pub control_plane_namespace: String,
    pub token_path: PathBuf,
    pub root_cert_path: PathBuf,
    /// How often the root certificate file is re-read (root rotation).
    pub root_cert_poll: Duration,
    pub pod_name: String,
    pub pod_namespace: String,
    pub pod_ip: IpAddr,
    /// Every address of the pod (`POD_IPS`, dual-stack); `pod_ip` included.
    pub pod_ips: Vec<IpAddr>,
    pub service_account: String,
    /// The outbound listener: redirected connections are handled
    /// transparently, direct ones as an explicit (CONNECT) proxy.
    pub outbound_addr: SocketAddr,
    /// Redirected inbound plaintext (15006).
    pub inbound_capture_addr: SocketAddr,
    pub inbound_mode: crate::inbound_passthrough::Mode,
    /// Readiness (`/healthz/ready`).
    pub health_addr: SocketAddr,
    /// The app's probes, asked by the kubelet (`/app-health/...`).
    pub app_health_addr: SocketAddr,
    /// The app's original probes by path (`WEFT_APP_PROBES`, JSON).
    pub app_probes: String,
    /// The admin port: loopback by default, it shows the whole mesh view.
    pub admin_addr: SocketAddr,
    /// Prometheus scraping (`/stats/prometheus`).
    pub prometheus_addr: SocketAddr,
    pub passthrough: bool,
    /// How long to wait for a client's first bytes on ports that do not
    /// declare a protocol.
    pub sniff_timeout: Duration,
    /// How long an application may take to send a request head.
    pub head_timeout: Duration,
    pub outliers: crate::outlier::Policy,
    /// How long SIGTERM waits for open connections before exiting.
    pub drain_timeout: Duration,
    /// How long a connect to an endpoint may take before another is tried.
    pub connect_timeout: Duration,
    /// HTTP/1.1 upgrades relayed (`WEFT_ALLOWED_UPGRADES`, default
    /// `websocket`; never h2c).
    pub upgrades: crate::upgrade::Upgrades,
    /// The DNS proxy (UDP and TCP, `WEFT_DNS_ADDR`; `off`: none).
    pub dns_addr: Option<SocketAddr>,
    /// Where names outside the mesh are resolved (`WEFT_DNS_UPSTREAM`,
    /// else the first nameserver of /etc/resolv.conf).
    pub dns_upstream: Option<SocketAddr>,
    /// The cluster's DNS suffix (`WEFT_DOMAIN_SUFFIX`).
    pub domain_suffix: String,
    /// JSON access logs on standard output (`WEFT_ACCESS_LOG`: `json`
    /// or `off`, the default).
    pub access_log: bool,
}

impl SidecarConfig {
    /// Reads the environment the injection template sets.
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| std::env::var(name).with_context(|| format!("{name} is not set"));
        let or =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
        let number = |name: &str, default: u64| -> Result<u64> {
            match std::env::var(name) {
                Ok(text) => text
                    .parse()
                    .with_context(|| format!("{name}={text:?} is not a whole number")),
                Err(_) => Ok(default),
            }
        };
        let address = |name: &str, default: &str| -> Result<SocketAddr> {
            let text = or(name, default);
            text.parse()
                .with_context(|| format!("{name}={text:?} is not an address:port"))
        };
        let pod_ip: IpAddr = var("POD_IP")?
            .parse()
            .context("POD_IP is not an IP address")?;
        let mut pod_ips = vec![pod_ip];
        for ip in or("POD_IPS", "")
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            let ip: IpAddr = ip
                .parse()
                .with_context(|| format!("POD_IPS: {ip:?} is not an IP address"))?;
            if !pod_ips.contains(&ip) {
                pod_ips.push(ip);
            }
        }
        Ok(SidecarConfig {
            pod_ips,
            control_plane: var("WEFT_CONTROL_PLANE")?,
            cluster_id: var("WEFT_CLUSTER_ID")?,
            network: or("WEFT_NETWORK", ""),
            mode: Mode::Sidecar,
            trust_domain: or("WEFT_TRUST_DOMAIN", "cluster.local"),
            control_plane_namespace: or("WEFT_CONTROL_PLANE_NAMESPACE", "weft-system"),
            token_path: or("WEFT_TOKEN_PATH", "/var/run/secrets/weft/tokens/token").into(),
            root_cert_path: or("WEFT_ROOT_CERT", "/var/run/secrets/weft/ca/root-cert.pem").into(),
            root_cert_poll: Duration::from_millis(
                number("WEFT_ROOT_CERT_POLL_MS", 10_000)?.max(10),
            ),
            pod_name: var("POD_NAME")?,
            pod_namespace: var("POD_NAMESPACE")?,
            pod_ip,
            service_account: or("SERVICE_ACCOUNT", "default"),
            outbound_addr: address("WEFT_OUTBOUND_ADDR", "127.0.0.1:15001")?,
            inbound_capture_addr: address("WEFT_INBOUND_CAPTURE_ADDR", "0.0.0.0:15006")?,
            inbound_mode: or("WEFT_INBOUND_MODE", "PERMISSIVE")
                .parse()
                .map_err(anyhow::Error::msg)
                .context("WEFT_INBOUND_MODE")?,
            health_addr: address("WEFT_HEALTH_ADDR", "0.0.0.0:15021")?,
            app_health_addr: address("WEFT_APP_HEALTH_ADDR", "0.0.0.0:15020")?,
            app_probes: or("WEFT_APP_PROBES", ""),
            admin_addr: address("WEFT_ADMIN_ADDR", "127.0.0.1:15000")?,
            prometheus_addr: address("WEFT_PROMETHEUS_ADDR", "0.0.0.0:15090")?,
            passthrough: or("WEFT_PASSTHROUGH", "true") != "false",
            sniff_timeout: Duration::from_millis(number("WEFT_SNIFF_TIMEOUT_MS", 100)?),
            head_timeout: Duration::from_millis(number("WEFT_HEADER_TIMEOUT_MS", 10_000)?),
            outliers: crate::outlier::Policy {
                consecutive_failures: number("WEFT_OUTLIER_CONSECUTIVE_FAILURES", 5)?.max(1) as u32,
                base_ejection: Duration::from_millis(number(
                    "WEFT_OUTLIER_BASE_EJECTION_MS",
                    30_000,
                )?),
                max_ejection: Duration::from_millis(number(
                    "WEFT_OUTLIER_MAX_EJECTION_MS",
                    300_000,
                )?),
                max_ejected_share: number("WEFT_OUTLIER_MAX_EJECTED_PERCENT", 50)?.min(100) as f64
                    / 100.0,
            },
            drain_timeout: Duration::from_secs(number("WEFT_DRAIN_SECONDS", 5)?),
            connect_timeout: Duration::from_millis(number("WEFT_CONNECT_TIMEOUT_MS", 1000)?.max(1)),
            upgrades: crate::upgrade::Upgrades::from_list(&or(
                "WEFT_ALLOWED_UPGRADES",
                "websocket",
            )),
            dns_addr: match or("WEFT_DNS_ADDR", "127.0.0.1:15053").as_str() {
                "off" => None,
                _ => Some(address("WEFT_DNS_ADDR", "127.0.0.1:15053")?),
            },
            dns_upstream: match std::env::var("WEFT_DNS_UPSTREAM") {
                Ok(text) => Some(
                    text.parse::<SocketAddr>()
                        .or_else(|_| text.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                        .with_context(|| format!("WEFT_DNS_UPSTREAM={text:?} is not an address"))?,
                ),
                Err(_) => std::fs::read_to_string("/etc/resolv.conf")
                    .ok()
                    .and_then(|text| crate::dns::upstream_of(&text)),
            },
            domain_suffix: or("WEFT_DOMAIN_SUFFIX", "cluster.local"),
            access_log: match or("WEFT_ACCESS_LOG", "off").as_str() {
                "json" | "on" | "true" => true,
                "off" | "false" | "" => false,
                other => bail!("WEFT_ACCESS_LOG={other:?} is neither json nor off"),
            },
        })
    }
}

/// What the proxy is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Next to an app: its mesh port delivers to the app.
    Sidecar,
    /// An east-west gateway: its mesh port forwards tunnels from other
    /// networks to the sidecars of its own (`gateway`).
    Gateway,
}

/// A running sidecar.
pub struct Sidecar {
    pub xds: Arc<XdsState>,
    pub inbound_capture: Arc<crate::inbound_passthrough::Counters>,
    /// The app behind the sidecar, as both inbound listeners deliver to it.
    pub app: Arc<LocalApp>,
    pub outbound: Arc<Outbound>,
    pub admin: Arc<Admin>,
    pub outbound_addr: SocketAddr,
    pub inbound_capture_addr: SocketAddr,
    pub health_addr: SocketAddr,
    pub app_health_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub prometheus_addr: SocketAddr,
    pub drain: Drain,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Sidecar {
    /// Stops accepting, lets open connections and in-flight requests
    /// finish, up to `deadline`. Returns the connections still open then.
    pub async fn drain(&self, deadline: Duration) -> usize {
        self.drain.start();
        tracing::info!(open = self.drain.active(), "draining");
        if !self.drain.idle(deadline).await {
            tracing::warn!(
                open = self.drain.active(),
                "drain deadline reached; closing what is left"
            );
        }
        self.drain.active()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Binds `addr`; for 0.0.0.0, the IPv6 wildcard first, which on Linux
/// takes IPv4 too, so that a dual-stack pod's IPv6 is served like its
/// IPv4 (a pod without IPv6 falls back to IPv4 alone).
async fn bind_dual_stack(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    if addr.ip() == IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        && let Ok(listener) = tokio::net::TcpListener::bind(SocketAddr::new(
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
            addr.port(),
        ))
        .await
    {
        return Ok(listener);
    }
    tokio::net::TcpListener::bind(addr).await
}

/// For a listener on 127.0.0.1, the same port on ::1 when the pod has
/// IPv6 loopback; `None` otherwise.
async fn ipv6_twin(addr: SocketAddr) -> Option<tokio::net::TcpListener> {
    if addr.ip() != IpAddr::V4(std::net::Ipv4Addr::LOCALHOST) {
        return None;
    }
    tokio::net::TcpListener::bind(SocketAddr::new(
        IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        addr.port(),
    ))
    .await
    .ok()
}

/// Starts everything. Returns once the certificate is obtained and the
/// ports are bound; readiness follows the first xDS sync.
pub async fn start(config: SidecarConfig) -> Result<Sidecar> {
    start_with(config, None).await
}

/// [`start`], with a way for `/logging` to change the log filter.
pub async fn start_with(
    config: SidecarConfig,
    set_log_level: Option<SetLogLevel>,
) -> Result<Sidecar> {
    // A bad probe list is the injector's or the operator's mistake: say so
    // before anything starts.
    let app_probes = Arc::new(crate::app_probe::AppProbes::from_json(
        &config.app_probes,
        config.pod_ip,
    )?);
    let root = std::fs::read_to_string(&config.root_cert_path).with_context(|| {
        format!(
            "reading the root certificate {}",
            config.root_cert_path.display()
        )
    })?;
    let bundle = TrustBundle::from_pem(&root)?;
    let control_identity = Identity::new(
        &config.trust_domain,
        &config.control_plane_namespace,
        "weft-control",
    )?;
    let identity_config = Arc::new(IdentityConfig {
        control_plane: config.control_plane.clone(),
        control_plane_identity: control_identity.clone(),
        identity: Identity::new(
            &config.trust_domain,
            &config.pod_namespace,
            &config.service_account,
        )?,
        token_path: config.token_path.clone(),
        bundle: bundle.clone(),
        ttl: Duration::from_secs(24 * 3600),
    });
    // Without a certificate nothing can work: retry until the CA answers.
    let backoff = Backoff::default();
    let mut attempt = 0;
    let cert = loop {
        match identity::fetch(&identity_config).await {
            Ok(cert) => break cert,
            Err(err) => {
                tracing::warn!("no certificate yet: {err:#}");
                attempt += 1;
                tokio::time::sleep(backoff.delay(attempt)).await;
            }
        }
    };
    let certs = CertStore::new(&cert)?;
    let mut tasks = vec![
        crate::task::spawn(identity::rotate(identity_config, certs.clone())),
        crate::task::spawn(crate::trust::follow(
            config.root_cert_path.clone(),
            bundle.clone(),
            config.root_cert_poll,
        )),
    ];

    let xds = Arc::new(XdsState::for_pod(crate::state::Local {
        addresses: config.pod_ips.clone(),
        namespace: config.pod_namespace.clone(),
        network: config.network.clone(),
    }));
    let node = Node {
        id: format!(
            "sidecar~{}~{}.{}~{}.svc.cluster.local",
            config.pod_ip, config.pod_name, config.pod_namespace, config.pod_namespace
        ),
        cluster: config.cluster_id.clone(),
        ..Default::default()
    };
    let xds_tls = weft_certs::tls::client_config(&certs, &bundle, vec![control_identity])?;
    let control_plane = config.control_plane.clone();
    tasks.push(crate::task::spawn(xds::run(
        move || {
            let (tls, address) = (xds_tls.clone(), control_plane.clone());
            async move { Ok(crate::channel::mesh(address, tls)) }
        },
        node,
        xds.clone(),
        Backoff::default(),
    )));

    let metrics = Arc::new(Metrics::default());
    let drain = Drain::default();
    let access_log = config
        .access_log
        .then(|| crate::access_log::AccessLog::to_stdout(metrics.access_log_dropped.clone()));
    let app = Arc::new(LocalApp::new(
        local_app::Config {
            addresses: config.pod_ips.clone(),
            head_timeout: config.head_timeout,
            connect_timeout: config.connect_timeout,
            upgrades: config.upgrades.clone(),
            access_log: access_log.clone(),
        },
        Some(xds.clone()),
        metrics.clone(),
        drain.clone(),
    ));
    let hbone = tokio::net::TcpListener::bind(SocketAddr::new(config.pod_ip, HBONE_PORT))
        .await
        .with_context(|| format!("binding {}:{HBONE_PORT}", config.pod_ip))?;
    let gateway = config.mode == Mode::Gateway;
    if gateway {
        let forwarder = Arc::new(crate::gateway::Forwarder {
            xds: xds.clone(),
            metrics: metrics.clone(),
            drain: drain.clone(),
            connect_timeout: config.connect_timeout,
            handshakes: Arc::new(tokio::sync::Semaphore::new(crate::gateway::MAX_HANDSHAKES)),
        });
        tasks.push(crate::task::spawn(crate::gateway::serve(
            hbone,
            certs.clone(),
            bundle.clone(),
            forwarder,
        )));
    } else {
        tasks.push(crate::task::spawn(crate::inbound::serve(
            hbone,
            certs.clone(),
            bundle.clone(),
            app.clone(),
        )));
    }

    let outbound = Arc::new(Outbound::new(
        outbound::Config {
            here: Here::new(&config.cluster_id, "", ""),
            pod_ip: Some(config.pod_ip),
            passthrough: config.passthrough,
            sniff_timeout: config.sniff_timeout,
            head_timeout: config.head_timeout,
            connect_timeout: config.connect_timeout,
            upgrades: config.upgrades.clone(),
            outliers: config.outliers.clone(),
            access_log,
        },
        xds.clone(),
        Pool::new(certs.clone(), bundle, config.connect_timeout),
        metrics.clone(),
        drain.clone(),
    ));
    let inbound_capture = Arc::new(crate::inbound_passthrough::Counters::default());
    tasks.push(crate::task::spawn(crate::memory::release_after_bursts(
        drain.clone(),
    )));
    // A gateway has no app: nothing to capture, nothing to send out.
    let (outbound_addr, inbound_capture_addr) = if gateway {
        (config.outbound_addr, config.inbound_capture_addr)
    } else {
        let listener = tokio::net::TcpListener::bind(config.outbound_addr)
            .await
            .with_context(|| format!("binding the outbound listener {}", config.outbound_addr))?;
        let outbound_addr = listener.local_addr()?;
        tasks.push(crate::task::spawn(crate::outbound::serve(
            listener,
            outbound.clone(),
        )));
        // ip6tables redirects the app's IPv6 connections to [::1]:15001.
        if let Some(listener) = ipv6_twin(outbound_addr).await {
            tasks.push(crate::task::spawn(crate::outbound::serve(
                listener,
                outbound.clone(),
            )));
        }
        let capture = bind_dual_stack(config.inbound_capture_addr)
            .await
            .with_context(|| {
                format!(
                    "binding the inbound capture port {}",
                    config.inbound_capture_addr
                )
            })?;
        let inbound_capture_addr = capture.local_addr()?;
        tasks.push(crate::task::spawn(crate::inbound_passthrough::serve(
            capture,
            config.inbound_mode,
            inbound_capture.clone(),
            app.clone(),
        )));
        if let Some(addr) = config.dns_addr {
            let dns = Arc::new(crate::dns::Dns::new(
                xds.clone(),
                &config.cluster_id,
                &config.domain_suffix,
                config.dns_upstream,
                metrics.clone(),
            ));
            let udp = tokio::net::UdpSocket::bind(addr)
                .await
                .with_context(|| format!("binding the DNS proxy {addr} (UDP)"))?;
            let tcp = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding the DNS proxy {addr} (TCP)"))?;
            tasks.push(crate::task::spawn(crate::dns::serve_udp(udp, dns.clone())));
            tasks.push(crate::task::spawn(crate::dns::serve_tcp(tcp, dns)));
        }
        (outbound_addr, inbound_capture_addr)
    };

    let admin = Arc::new(Admin {
        xds: xds.clone(),
        outbound: outbound.clone(),
        capture: inbound_capture.clone(),
        certs: Some(certs.clone()),
        metrics,
        drain: drain.clone(),
        set_log_level,
    });
    let mut bound = Vec::new();
    for (addr, routes, what) in [
        (config.health_addr, Routes::Health, "health"),
        (config.admin_addr, Routes::Admin, "admin"),
        (config.prometheus_addr, Routes::Prometheus, "Prometheus"),
    ] {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the {what} port {addr}"))?;
        bound.push(listener.local_addr()?);
        tasks.push(crate::task::spawn(crate::admin::serve(
            listener,
            admin.clone(),
            routes,
        )));
    }
    let (health_addr, admin_addr, prometheus_addr) = (bound[0], bound[1], bound[2]);
    let app_health = tokio::net::TcpListener::bind(config.app_health_addr)
        .await
        .with_context(|| format!("binding the app health port {}", config.app_health_addr))?;
    let app_health_addr = app_health.local_addr()?;
    tasks.push(crate::task::spawn(crate::app_probe::serve(
        app_health, app_probes,
    )));
    tracing::info!(identity = %cert.identity(), mode = ?config.mode, %outbound_addr, %health_addr, %admin_addr, "proxy started");
    Ok(Sidecar {
        xds,
        inbound_capture,
        app,
        outbound,
        admin,
        outbound_addr,
        inbound_capture_addr,
        health_addr,
        app_health_addr,
        admin_addr,
        prometheus_addr,
        drain,
        tasks,
    })
}
