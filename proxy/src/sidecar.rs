//! The sidecar assembled: identity, xDS, the inbound mesh port, the
//! outbound listener and readiness, from one configuration read at start.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use weft_certs::Identity;
use weft_certs::tls::{CertStore, TrustBundle};
use weft_xds_proto::envoy::config::core::v3::Node;

use crate::balance::{Here, Load};
use crate::hbone::{HBONE_PORT, Inbound, Pool};
use crate::identity::{self, IdentityConfig};
use crate::outbound::Outbound;
use crate::xds::{self, Backoff, XdsState};

#[derive(Clone, Debug)]
pub struct SidecarConfig {
    /// host:port of the control plane's TLS port.
    pub control_plane: String,
    pub cluster_id: String,
    pub trust_domain: String,
    pub control_plane_namespace: String,
    pub token_path: PathBuf,
    pub root_cert_path: PathBuf,
    pub pod_name: String,
    pub pod_namespace: String,
    pub pod_ip: IpAddr,
    pub service_account: String,
    /// The outbound listener: redirected connections are handled
    /// transparently, direct ones as an explicit (CONNECT) proxy.
    pub outbound_addr: SocketAddr,
    /// Redirected inbound plaintext (15006).
    pub inbound_capture_addr: SocketAddr,
    pub inbound_mode: crate::inbound::Mode,
    /// Readiness (`/healthz/ready`).
    pub health_addr: SocketAddr,
    pub passthrough: bool,
}

impl SidecarConfig {
    /// Reads the environment the injection template sets.
    pub fn from_env() -> Result<Self> {
        let var = |name: &str| std::env::var(name).with_context(|| format!("{name} is not set"));
        let or =
            |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.to_string());
        let pod_ip: IpAddr = var("POD_IP")?
            .parse()
            .context("POD_IP is not an IP address")?;
        Ok(SidecarConfig {
            control_plane: var("WEFT_CONTROL_PLANE")?,
            cluster_id: var("WEFT_CLUSTER_ID")?,
            trust_domain: or("WEFT_TRUST_DOMAIN", "cluster.local"),
            control_plane_namespace: or("WEFT_CONTROL_PLANE_NAMESPACE", "weft-system"),
            token_path: or("WEFT_TOKEN_PATH", "/var/run/secrets/weft/tokens/token").into(),
            root_cert_path: or("WEFT_ROOT_CERT", "/var/run/secrets/weft/ca/root-cert.pem").into(),
            pod_name: var("POD_NAME")?,
            pod_namespace: var("POD_NAMESPACE")?,
            pod_ip,
            service_account: or("SERVICE_ACCOUNT", "default"),
            outbound_addr: or("WEFT_OUTBOUND_ADDR", "127.0.0.1:15001")
                .parse()
                .context("WEFT_OUTBOUND_ADDR")?,
            inbound_capture_addr: or("WEFT_INBOUND_CAPTURE_ADDR", "0.0.0.0:15006")
                .parse()
                .context("WEFT_INBOUND_CAPTURE_ADDR")?,
            inbound_mode: or("WEFT_INBOUND_MODE", "PERMISSIVE")
                .parse()
                .map_err(anyhow::Error::msg)
                .context("WEFT_INBOUND_MODE")?,
            health_addr: or("WEFT_HEALTH_ADDR", "0.0.0.0:15021")
                .parse()
                .context("WEFT_HEALTH_ADDR")?,
            passthrough: or("WEFT_PASSTHROUGH", "true") != "false",
        })
    }
}

/// A running sidecar.
pub struct Sidecar {
    pub xds: Arc<XdsState>,
    pub inbound_capture: Arc<crate::inbound::Counters>,
    pub inbound: Arc<Inbound>,
    pub outbound: Arc<Outbound>,
    pub outbound_addr: SocketAddr,
    pub health_addr: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// Starts everything. Returns once the certificate is obtained and the
/// ports are bound; readiness follows the first xDS sync.
pub async fn start(config: SidecarConfig) -> Result<Sidecar> {
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
    let mut tasks = vec![tokio::spawn(identity::rotate(
        identity_config,
        certs.clone(),
    ))];

    let xds = Arc::new(XdsState::default());
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
    tasks.push(tokio::spawn(xds::run(
        move || {
            let (tls, address) = (xds_tls.clone(), control_plane.clone());
            async move { Ok(crate::channel::mesh(address, tls)) }
        },
        node,
        xds.clone(),
        Backoff::default(),
    )));

    let inbound = Arc::new(Inbound::new(vec![config.pod_ip]));
    let hbone = tokio::net::TcpListener::bind(SocketAddr::new(config.pod_ip, HBONE_PORT))
        .await
        .with_context(|| format!("binding {}:{HBONE_PORT}", config.pod_ip))?;
    tasks.push(tokio::spawn(crate::hbone::serve_inbound(
        hbone,
        certs.clone(),
        bundle.clone(),
        inbound.clone(),
    )));

    let outbound = Arc::new(Outbound {
        xds: xds.clone(),
        pool: Pool::new(certs.clone(), bundle),
        load: Load::default(),
        here: Here {
            cluster: config.cluster_id.clone(),
            ..Default::default()
        },
        pod_ip: Some(config.pod_ip),
        passthrough: config.passthrough,
    });
    let listener = tokio::net::TcpListener::bind(config.outbound_addr)
        .await
        .with_context(|| format!("binding the outbound listener {}", config.outbound_addr))?;
    let outbound_addr = listener.local_addr()?;
    tasks.push(tokio::spawn(crate::outbound::serve_explicit(
        listener,
        outbound.clone(),
    )));

    let inbound_capture = Arc::new(crate::inbound::Counters::default());
    let capture = tokio::net::TcpListener::bind(config.inbound_capture_addr)
        .await
        .with_context(|| {
            format!(
                "binding the inbound capture port {}",
                config.inbound_capture_addr
            )
        })?;
    tasks.push(tokio::spawn(crate::inbound::serve(
        capture,
        config.inbound_mode,
        inbound_capture.clone(),
    )));

    let health = tokio::net::TcpListener::bind(config.health_addr)
        .await
        .with_context(|| format!("binding the health port {}", config.health_addr))?;
    let health_addr = health.local_addr()?;
    tasks.push(tokio::spawn(serve_health(health, xds.clone())));
    tracing::info!(identity = %cert.identity(), %outbound_addr, %health_addr, "sidecar started");
    Ok(Sidecar {
        xds,
        inbound_capture,
        inbound,
        outbound,
        outbound_addr,
        health_addr,
        tasks,
    })
}

/// `/healthz/ready`: 200 once the first xDS sync is in (the certificate
/// came before anything was bound), 503 before.
async fn serve_health(listener: tokio::net::TcpListener, xds: Arc<XdsState>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    loop {
        let Ok((mut conn, _)) = listener.accept().await else {
            continue;
        };
        let xds = xds.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf)).await
            else {
                return;
            };
            let request = String::from_utf8_lossy(&buf[..n]);
            let path = request.split_whitespace().nth(1).unwrap_or("");
            let ready = xds.synced.load(Ordering::Relaxed);
            let (code, body) = match path {
                "/healthz/ready" if ready => ("200 OK", "ready\n"),
                "/healthz/ready" => (
                    "503 Service Unavailable",
                    "waiting for the first configuration from the control plane\n",
                ),
                _ => ("404 Not Found", "try /healthz/ready\n"),
            };
            let _ = conn
                .write_all(
                    format!(
                        "HTTP/1.1 {code}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                )
                .await;
        });
    }
}
