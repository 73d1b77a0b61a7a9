//! A mesh of lab clusters on one machine, built from weft's real binaries:
//! per cluster a lab API server (in this process), an intermediate CA under
//! one shared root (the `cacerts` Secret, as in production), a
//! `weft-control` process, and remote-cluster Secrets in every other
//! cluster; sidecars are `weft-proxy` processes configured exactly as the
//! injector configures them. The demo, the end-to-end tests and the
//! benchmarks all stand on this.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, Secret, ServiceAccount};
use kube::Api;
use kube::api::{DeleteParams, PostParams};
use serde_json::json;
use tokio::process::{Child, Command};
use weft_certs::{CaParams, CertificateAuthority};

use crate::apiserver::{ApiServer, ApiServerConfig};

/// The binaries a lab runs, found next to the running executable.
#[derive(Clone, Debug)]
pub struct Binaries {
    pub control: PathBuf,
    pub proxy: PathBuf,
    pub echo: PathBuf,
}

impl Binaries {
    /// Looks in the running executable's directory and its parent (test
    /// executables live in `target/<profile>/deps`).
    pub fn locate() -> Result<Binaries> {
        let exe = std::env::current_exe().context("locating the running executable")?;
        let dirs: Vec<PathBuf> = exe
            .ancestors()
            .skip(1)
            .take(2)
            .map(Path::to_path_buf)
            .collect();
        let find = |name: &str| -> Result<PathBuf> {
            dirs.iter()
                .map(|d| d.join(name))
                .find(|p| p.is_file())
                .with_context(|| {
                    format!(
                        "{name} is not built next to {}: run `cargo build --release -p weft-control -p weft-proxy -p weft-echo` (or without --release for debug builds)",
                        exe.display()
                    )
                })
        };
        Ok(Binaries {
            control: find("weft-control")?,
            proxy: find("weft-proxy")?,
            echo: find("weft-echo")?,
        })
    }
}

/// The shared root every cluster's intermediate CA chains to.
pub struct MeshRoot {
    pub trust_domain: String,
    root: CertificateAuthority,
}

impl MeshRoot {
    pub fn generate(trust_domain: &str) -> Result<MeshRoot> {
        let root = CertificateAuthority::generate_root(
            trust_domain,
            &CaParams::valid_for("weft lab root", Duration::from_secs(30 * 86400)),
        )?;
        Ok(MeshRoot {
            trust_domain: trust_domain.into(),
            root,
        })
    }

    pub fn root_pem(&self) -> String {
        self.root.roots_pem()
    }

    /// A workload certificate straight from the root, for benchmarks that
    /// drive the proxy's connection pool themselves.
    pub fn issue_workload(
        &self,
        identity: &weft_certs::Identity,
    ) -> Result<weft_certs::WorkloadCert> {
        Ok(weft_certs::issue_workload(&self.root, identity, None)?)
    }

    /// The `cacerts` Secret's data for one cluster's intermediate.
    pub fn cacerts(&self, cluster: &str) -> Result<BTreeMap<String, String>> {
        let intermediate = self.root.generate_intermediate(
            cluster,
            &CaParams::valid_for(
                format!("weft lab {cluster} intermediate"),
                Duration::from_secs(7 * 86400),
            ),
        )?;
        let files = intermediate.plugin_files();
        Ok(BTreeMap::from([
            ("ca-cert.pem".into(), files.ca_cert),
            ("ca-key.pem".into(), files.ca_key),
            ("root-cert.pem".into(), files.root_cert),
            ("cert-chain.pem".into(), files.cert_chain),
        ]))
    }
}

#[derive(Clone, Debug)]
pub struct ClusterOptions {
    pub name: String,
    pub network: String,
    pub region: String,
    pub zone: String,
    /// Logs and kubeconfigs go here.
    pub dir: PathBuf,
    /// Address the cluster's processes listen on.
    pub host: IpAddr,
    pub service_cidr: String,
    /// `RUST_LOG` for the control plane.
    pub log: String,
}

impl ClusterOptions {
    pub fn new(name: &str, dir: &Path) -> Self {
        ClusterOptions {
            name: name.into(),
            network: "lab".into(),
            region: "lab".into(),
            zone: format!("{name}-a"),
            dir: dir.to_path_buf(),
            host: IpAddr::from([127, 0, 0, 1]),
            service_cidr: "10.96.0.0/16".into(),
            log: "info,kube=warn,tower=warn,hyper=warn".into(),
        }
    }
}

/// One lab cluster: its API server, its control plane process, and where
/// they listen.
pub struct Cluster {
    pub options: ClusterOptions,
    pub api: ApiServer,
    pub client: kube::Client,
    pub kubeconfig: PathBuf,
    pub xds_addr: SocketAddr,
    pub monitoring_addr: SocketAddr,
    pub webhook_addr: SocketAddr,
    control: Option<Child>,
    binaries: Binaries,
}

fn free_port(host: IpAddr) -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind(SocketAddr::new(host, 0))?;
    Ok(listener.local_addr()?)
}

pub async fn client_for(api: &ApiServer) -> Result<kube::Client> {
    Ok(api.client().await?)
}

/// Creates an object; one that already exists is left as it is.
pub async fn create<K>(api: &Api<K>, value: serde_json::Value) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(value)?;
    match api.create(&PostParams::default(), &object).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(err) => Err(err.into()),
    }
}

impl Cluster {
    /// Starts the API server, creates what the install manifests would
    /// (namespace, service account, `cacerts`, a node with its locality),
    /// and starts `weft-control`. Returns once the control plane is ready.
    pub async fn start(
        options: ClusterOptions,
        root: &MeshRoot,
        binaries: &Binaries,
    ) -> Result<Cluster> {
        std::fs::create_dir_all(&options.dir)?;
        let webhook_addr = free_port(options.host)?;
        let api = ApiServer::start(ApiServerConfig {
            addr: SocketAddr::new(options.host, 0),
            cluster_name: options.name.clone(),
            service_cidr: options.service_cidr.clone(),
            webhook_services: BTreeMap::from([(
                "weft-system/weft-control".to_string(),
                webhook_addr,
            )]),
            ..Default::default()
        })
        .await?;
        let client = client_for(&api).await?;
        let kubeconfig = options.dir.join(format!("{}.kubeconfig", options.name));
        std::fs::write(&kubeconfig, api.kubeconfig())?;
        // The cluster's network is the label on its system namespace.
        create(
            &Api::<Namespace>::all(client.clone()),
            json!({"metadata": {"name": "weft-system", "labels": {"topology.weft.io/network": options.network}}}),
        )
        .await?;
        create(
            &Api::<ServiceAccount>::namespaced(client.clone(), "weft-system"),
            json!({"metadata": {"name": "weft-control"}}),
        )
        .await?;
        create(
            &Api::<Secret>::namespaced(client.clone(), "weft-system"),
            json!({"metadata": {"name": "cacerts"}, "stringData": root.cacerts(&options.name)?}),
        )
        .await?;
        create(
            &Api::<Node>::all(client.clone()),
            json!({"metadata": {"name": format!("{}-node", options.name), "labels": {
                "topology.kubernetes.io/region": options.region,
                "topology.kubernetes.io/zone": options.zone,
            }}}),
        )
        .await?;
        // The injector's webhook configuration from the install manifests;
        // the control plane fills in its caBundle when it starts.
        let webhook: serde_json::Value =
            serde_saphyr::from_str(include_str!("../../examples/install/30-injector.yaml"))
                .context("reading examples/install/30-injector.yaml")?;
        create(
            &Api::<k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration>::all(
                client.clone(),
            ),
            webhook,
        )
        .await?;
        // Istio's security kinds, which weft enforces.
        crate::apply::apply_all(
            &client,
            include_str!("../../examples/install/05-security-crds.yaml"),
        )
        .await
        .context("installing examples/install/05-security-crds.yaml")?;
        // The traffic and MCS kinds weft reads; upstream projects ship
        // their CRDs, which a lab has no way to fetch.
        crate::apply::apply_all(&client, include_str!("../crds/traffic.yaml"))
            .await
            .context("installing lab/crds/traffic.yaml")?;
        crate::apply::apply_all(&client, include_str!("../crds/mcs.yaml"))
            .await
            .context("installing lab/crds/mcs.yaml")?;
        let mut cluster = Cluster {
            xds_addr: free_port(options.host)?,
            monitoring_addr: free_port(options.host)?,
            webhook_addr,
            options,
            api,
            client,
            kubeconfig,
            control: None,
            binaries: binaries.clone(),
        };
        cluster.start_control().await?;
        Ok(cluster)
    }

    pub fn name(&self) -> &str {
        &self.options.name
    }

    pub fn node_name(&self) -> String {
        format!("{}-node", self.options.name)
    }

    /// Starts (or restarts) `weft-control` on the cluster's fixed addresses.
    pub async fn start_control(&mut self) -> Result<()> {
        self.stop_control().await;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(
            self.options
                .dir
                .join(format!("{}-control.log", self.options.name)),
        )?;
        let child = Command::new(&self.binaries.control)
            .args([
                "--cluster-id",
                &self.options.name,
                "--network",
                &self.options.network,
            ])
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["--xds-addr", &self.xds_addr.to_string()])
            .args(["--monitoring-addr", &self.monitoring_addr.to_string()])
            .args(["--webhook-addr", &self.webhook_addr.to_string()])
            .args(["--remote-sync-timeout", "5"])
            // Gateways of other networks: taken out at most 2.5 s after
            // they stop answering (two failed probes a second apart, the
            // last timing out after 0.5 s).
            .args([
                "--gateway-probe-period",
                "1",
                "--gateway-probe-timeout",
                "0.5",
            ])
            .args(["--gateway-probe-failures", "2"])
            // The lab has no cluster DNS: sidecars dial the address itself.
            .args(["--proxy-control-plane", &self.xds_addr.to_string()])
            .env("RUST_LOG", &self.options.log)
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.binaries.control.display()))?;
        self.control = Some(child);
        self.wait_ready(Duration::from_secs(30)).await
    }

    /// Stops the control plane (SIGTERM, then SIGKILL after 5 s).
    pub async fn stop_control(&mut self) {
        if let Some(child) = self.control.take() {
            stop(child, Duration::from_secs(5)).await;
        }
    }

    pub fn control_pid(&self) -> Option<u32> {
        self.control.as_ref().and_then(|c| c.id())
    }

    pub async fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Ok(body) = http_get(self.monitoring_addr, "/ready").await
                && body.0 == 200
            {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "weft-control of {} not ready after {timeout:?}; see {}",
                    self.options.name,
                    self.options
                        .dir
                        .join(format!("{}-control.log", self.options.name))
                        .display()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Registers `remote` in this cluster as an operator would: the remote
    /// secret `weftctl create-remote-secret` makes (a read-only account in
    /// the remote cluster and a kubeconfig with its token), applied here.
    pub async fn add_remote(&self, remote: &Cluster) -> Result<()> {
        let manifest = weft_control::remote_secret::create(
            remote.client.clone(),
            &format!("https://{}", remote.api.addr()),
            remote.name(),
            "weft-system",
        )
        .await
        .with_context(|| format!("the remote secret for {}", remote.name()))?;
        crate::apply::apply_all(&self.client, &manifest).await?;
        Ok(())
    }

    pub async fn remove_remote(&self, remote: &str) -> Result<()> {
        Api::<Secret>::namespaced(self.client.clone(), "weft-system")
            .delete(
                &format!("weft-remote-secret-{remote}"),
                &DeleteParams::default(),
            )
            .await?;
        Ok(())
    }

    /// A service-account token for the mesh CA (audience `weft-ca`), as the
    /// projected volume of an injected pod holds it.
    pub async fn token(&self, namespace: &str, service_account: &str) -> Result<String> {
        create(
            &Api::<ServiceAccount>::namespaced(self.client.clone(), namespace),
            json!({"metadata": {"name": service_account}}),
        )
        .await?;
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec!["weft-ca".into()],
                expiration_seconds: Some(24 * 3600),
                ..Default::default()
            },
            ..Default::default()
        };
        let created = Api::<ServiceAccount>::namespaced(self.client.clone(), namespace)
            .create_token_request(service_account, &PostParams::default(), &request)
            .await?;
        Ok(created
            .status
            .context("a token request without status")?
            .token)
    }

    /// Stops the control plane and the API server.
    pub async fn stop(mut self) {
        self.stop_control().await;
        self.api.stop().await;
    }
}

/// Stops a child: SIGTERM, then SIGKILL after `grace`.
pub async fn stop(mut child: Child, grace: Duration) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) with a pid we spawned and still own.
        unsafe {
            libc::kill(pid as i32, libc::SIGTERM);
        }
        if tokio::time::timeout(grace, child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}

/// A sidecar to run: the pod it belongs to and where it listens.
#[derive(Clone, Debug)]
pub struct SidecarSpec {
    pub pod_name: String,
    pub namespace: String,
    pub service_account: String,
    pub pod_ip: IpAddr,
    /// Every listener on the pod's address (loopback labs share one
    /// network namespace, so 127.0.0.1:15001 would collide).
    pub listen_on_pod_ip: bool,
    pub env: Vec<(String, String)>,
    /// `weft-proxy proxy gateway` instead of a sidecar.
    pub gateway: bool,
}

/// The sidecar's listeners and their ports: bound on the pod's own address
/// when pods share loopback instead of having network namespaces.
pub const SIDECAR_LISTENERS: [(&str, u16); 7] = [
    ("WEFT_DNS_ADDR", 15053),
    ("WEFT_OUTBOUND_ADDR", 15001),
    ("WEFT_INBOUND_CAPTURE_ADDR", 15006),
    ("WEFT_APP_HEALTH_ADDR", 15020),
    ("WEFT_HEALTH_ADDR", 15021),
    ("WEFT_ADMIN_ADDR", 15000),
    ("WEFT_PROMETHEUS_ADDR", 15090),
];

/// [`spawn_sidecar`] for a proxy listening on its pod's address, returned
/// once it reports ready.
pub async fn spawn_ready_sidecar(
    cluster: &Cluster,
    root_pem: &str,
    spec: &SidecarSpec,
) -> Result<Child> {
    let child = spawn_sidecar(cluster, root_pem, spec).await?;
    wait_http_ok(
        SocketAddr::new(spec.pod_ip, 15021),
        "/healthz/ready",
        Duration::from_secs(30),
    )
    .await
    .with_context(|| format!("the proxy of {}", spec.pod_name))?;
    Ok(child)
}

/// Starts `weft-proxy proxy sidecar` for a pod of `cluster`, configured as
/// the injector configures it: token file, root certificate, Downward API
/// variables.
pub async fn spawn_sidecar(cluster: &Cluster, root_pem: &str, spec: &SidecarSpec) -> Result<Child> {
    let dir = cluster
        .options
        .dir
        .join(format!("{}-{}", cluster.name(), spec.pod_name));
    std::fs::create_dir_all(&dir)?;
    let token = cluster
        .token(&spec.namespace, &spec.service_account)
        .await?;
    std::fs::write(dir.join("token"), token)?;
    std::fs::write(dir.join("root-cert.pem"), root_pem)?;
    let log = std::fs::File::create(dir.join("proxy.log"))?;
    let mut command = Command::new(&cluster.binaries.proxy);
    command
        .args(["proxy", if spec.gateway { "gateway" } else { "sidecar" }])
        .env("WEFT_CONTROL_PLANE", cluster.xds_addr.to_string())
        .env("WEFT_CLUSTER_ID", cluster.name())
        .env("WEFT_TOKEN_PATH", dir.join("token"))
        .env("WEFT_ROOT_CERT", dir.join("root-cert.pem"))
        .env("POD_NAME", &spec.pod_name)
        .env("POD_NAMESPACE", &spec.namespace)
        .env("POD_IP", spec.pod_ip.to_string())
        .env("SERVICE_ACCOUNT", &spec.service_account)
        .env("RUST_LOG", "warn");
    if spec.listen_on_pod_ip {
        for (var, port) in SIDECAR_LISTENERS {
            command.env(var, SocketAddr::new(spec.pod_ip, port).to_string());
        }
    }
    for (name, value) in &spec.env {
        command.env(name, value);
    }
    command
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", cluster.binaries.proxy.display()))
}

/// A minimal HTTP/1.1 GET: status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp =
        tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
            .await
            .context("connect timed out")??;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: lab\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_string(&mut out))
        .await
        .context("read timed out")??;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// Waits until `addr` answers `path` with 200.
pub async fn wait_http_ok(addr: SocketAddr, path: &str, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok((200, _)) = http_get(addr, path).await {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("{addr}{path} did not answer 200 within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
