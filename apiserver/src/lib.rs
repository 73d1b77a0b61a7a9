//! `weft-apiserver`: an in-memory, Kubernetes-API-compatible server for the
//! lab, the tests and the benchmarks. It sits below the control plane in
//! the crate graph, so the control plane's own tests run against it, and
//! `testing` holds the support every crate's tests share.
//!
//! Real clients (the `kube` crate, kubectl) talk to it over HTTPS with bearer
//! tokens, exactly as to kube-apiserver, for everything weft uses: CRUD with
//! resourceVersion preconditions, list paging, label and field selectors,
//! watches with bookmarks and 410 Expired, streaming lists, the status
//! subresource, ServiceAccount tokens and TokenReview, CRDs, and discovery.
//!
//! It calls mutating admission webhooks on CREATE. What it does not do, on
//! purpose: authorization (every authenticated caller may do anything),
//! validating webhooks, garbage collection by owner, and
//! field-level ownership for server-side apply (apply merges, it never
//! removes a field by omission). It is never part of a production install.

mod admission;
mod auth;
mod decode;
mod http;
mod patch;
mod present;
mod resources;
mod selector;
mod semantics;
mod status;
mod store;
pub mod testing;
mod verbs;
mod watch;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use weft_certs::accept;
use weft_certs::{CaParams, CertificateAuthority, PluginFiles};

pub use status::ApiError;

use auth::Authenticator;
use semantics::{Ctx, IpAllocator, State};
use store::Store;

/// How a lab API server is started.
#[derive(Clone, Debug)]
pub struct ApiServerConfig {
    /// Where to listen; port 0 picks a free one.
    pub addr: SocketAddr,
    /// Keeps objects, the CA, the tokens and the kubeconfig here, so that a
    /// restarted server on the same directory is the same cluster.
    pub dir: Option<PathBuf>,
    /// The name of the cluster in the kubeconfig.
    pub cluster_name: String,
    /// Service ClusterIPs are allocated from this IPv4 range.
    pub service_cidr: String,
    /// How many change events watches can resume from.
    pub history_limit: usize,
    /// Where admission webhooks named by Service ("namespace/name") are
    /// reached, since the lab has no service network.
    pub webhook_services: std::collections::BTreeMap<String, SocketAddr>,
}

impl Default for ApiServerConfig {
    fn default() -> Self {
        ApiServerConfig {
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            dir: None,
            cluster_name: "weft-lab".into(),
            service_cidr: "10.96.0.0/16".into(),
            history_limit: 10_000,
            webhook_services: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("certificates: {0}")]
    Certs(#[from] weft_certs::CertError),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("configuration: {0}")]
    Config(String),
    #[error("a client for the API server: {0}")]
    Client(String),
}

/// A kube client from a kubeconfig (YAML) such as a lab API server writes.
pub async fn client_for(kubeconfig: &str) -> Result<kube::Client, LabError> {
    let client = |err: String| LabError::Client(err);
    let kubeconfig =
        kube::config::Kubeconfig::from_yaml(kubeconfig).map_err(|e| client(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .map_err(|e| client(e.to_string()))?;
    kube::Client::try_from(config).map_err(|e| client(e.to_string()))
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

/// State shared by every connection.
pub(crate) struct Shared {
    state: Mutex<State>,
    auth: Authenticator,
    ca_pem: String,
    server_address: String,
    watch_pause: tokio::sync::watch::Sender<bool>,
    watch_close: tokio::sync::watch::Sender<u64>,
    webhook_services: std::collections::BTreeMap<String, SocketAddr>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock must not take the server down with
        // it; the state itself is always left consistent between statements.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            auth: &self.auth,
            ca_pem: &self.ca_pem,
        }
    }
}

/// A running lab API server.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    kubeconfig: String,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Identity material that must survive a restart: clients trust this CA and
/// hold these tokens.
struct Identity {
    ca: CertificateAuthority,
    admin_token: String,
    signing_secret: Vec<u8>,
}

impl Identity {
    fn load_or_create(dir: Option<&Path>) -> Result<Self, LabError> {
        if let Some(dir) = dir
            && dir.join("ca").join(PluginFiles::CA_CERT).exists()
        {
            let files = PluginFiles::read_dir(&dir.join("ca"))?;
            let ca = CertificateAuthority::from_plugin(&files, "cluster.local")?;
            let admin_token = std::fs::read_to_string(dir.join("admin-token"))
                .map_err(io("reading admin-token"))?
                .trim()
                .to_string();
            let signing_secret = STANDARD
                .decode(
                    std::fs::read_to_string(dir.join("sa-signing-key"))
                        .map_err(io("reading sa-signing-key"))?
                        .trim(),
                )
                .map_err(|_| LabError::Config("sa-signing-key is not base64".into()))?;
            return Ok(Identity {
                ca,
                admin_token,
                signing_secret,
            });
        }
        let ca = CertificateAuthority::generate_root(
            "cluster.local",
            &CaParams::valid_for(
                "weft-lab apiserver CA",
                Duration::from_secs(10 * 365 * 86400),
            ),
        )?;
        let admin_token = hex(&rand::random::<[u8; 24]>());
        let signing_secret = rand::random::<[u8; 32]>().to_vec();
        if let Some(dir) = dir {
            ca.plugin_files().write_dir(&dir.join("ca"))?;
            weft_certs::write_file(&dir.join("admin-token"), &admin_token, true)?;
            weft_certs::write_file(
                &dir.join("sa-signing-key"),
                &STANDARD.encode(&signing_secret),
                true,
            )?;
        }
        Ok(Identity {
            ca,
            admin_token,
            signing_secret,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl ApiServer {
    pub async fn start(config: ApiServerConfig) -> Result<Self, LabError> {
        if let Some(dir) = &config.dir {
            std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        }
        let identity = Identity::load_or_create(config.dir.as_deref())?;
        let mut store = match &config.dir {
            Some(dir) => Store::open(&dir.join("state"), config.history_limit)
                .map_err(io(format!("opening the object log in {}", dir.display())))?,
            None => Store::new(config.history_limit),
        };
        let mut cluster_ips = IpAllocator::new(&config.service_cidr).map_err(LabError::Config)?;
        let services = resources::ResourceKey {
            group: String::new(),
            resource: "services".into(),
        };
        for (_, service) in store.list(&services, None, None) {
            if let Some(ip) = service.value()["spec"]["clusterIP"]
                .as_str()
                .and_then(|s| s.parse().ok())
            {
                // A persisted IP outside a changed range simply stays as is.
                let _ = cluster_ips.reserve(ip);
            }
        }
        let mut registry = resources::Registry::default();
        let crds = resources::ResourceKey {
            group: "apiextensions.k8s.io".into(),
            resource: "customresourcedefinitions".into(),
        };
        let stored_crds: Vec<_> = store
            .list(&crds, None, None)
            .map(|(_, c)| c.value())
            .collect();
        for crd in stored_crds {
            if let Err(why) = registry.register_crd(&crd) {
                tracing::warn!(%why, "stored CRD could not be served");
            }
        }
        bootstrap(&mut store)?;

        let listener = TcpListener::bind(config.addr)
            .await
            .map_err(io(format!("binding {}", config.addr)))?;
        let addr = listener
            .local_addr()
            .map_err(io("reading the bound address"))?;

        let mut ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
        if !addr.ip().is_unspecified() && addr.ip() != ips[0] {
            ips.push(addr.ip());
        }
        let (chain, key) = identity.ca.issue_serving(
            &[
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                "kubernetes.default.svc.cluster.local",
            ],
            &ips,
            Duration::from_secs(365 * 86400),
        )?;
        let tls = tls_config(&chain, &key)?;
        let ca_pem = identity.ca.roots_pem();
        let server_host = if addr.ip().is_unspecified() {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        } else {
            addr
        };
        let kubeconfig = kubeconfig(
            &config.cluster_name,
            &format!("https://{server_host}"),
            &ca_pem,
            &identity.admin_token,
        );
        if let Some(dir) = &config.dir {
            weft_certs::write_file(&dir.join("kubeconfig"), &kubeconfig, true)?;
        }

        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                store,
                registry,
                cluster_ips,
            }),
            auth: Authenticator::new(identity.admin_token, &identity.signing_secret),
            ca_pem,
            server_address: server_host.to_string(),
            watch_pause: tokio::sync::watch::Sender::new(false),
            watch_close: tokio::sync::watch::Sender::new(0),
            webhook_services: config.webhook_services.clone(),
        });
        let (shutdown, shutdown_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(serve(listener, tls, shared.clone(), shutdown_rx));
        tracing::info!(%addr, cluster = %config.cluster_name, "lab API server listening");
        Ok(ApiServer {
            addr,
            shared,
            kubeconfig,
            shutdown,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig (YAML) for the admin user.
    pub fn kubeconfig(&self) -> &str {
        &self.kubeconfig
    }

    /// A kube client for the admin user.
    pub async fn client(&self) -> Result<kube::Client, LabError> {
        client_for(&self.kubeconfig).await
    }

    pub fn admin_token(&self) -> &str {
        self.shared.auth.admin_token()
    }

    /// The CA that signed the serving certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.shared.ca_pem
    }

    pub fn current_resource_version(&self) -> u64 {
        self.shared.lock().store.current_rv()
    }

    /// Drops all change history, as etcd compaction does.
    pub fn compact(&self) {
        self.shared.lock().store.compact();
    }

    /// Ends every open watch stream (clients re-watch from their last
    /// version).
    pub fn close_watches(&self) {
        self.shared
            .watch_close
            .send_modify(|generation| *generation += 1);
    }

    /// Holds new watch requests until `resume_watches`, and ends the open
    /// ones. With `compact` in between this reproduces a client that was away
    /// while history was compacted, which must then get 410 and relist.
    pub fn pause_watches(&self) {
        self.shared.watch_pause.send_replace(true);
        self.close_watches();
    }

    pub fn resume_watches(&self) {
        self.shared.watch_pause.send_replace(false);
    }

    /// Stops listening and drops every connection.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        self.close_watches();
        let _ = self.task.await;
    }
}

/// What every cluster has from the start.
fn bootstrap(store: &mut Store) -> Result<(), LabError> {
    let namespaces = resources::ResourceKey {
        group: String::new(),
        resource: "namespaces".into(),
    };
    let service_accounts = resources::ResourceKey {
        group: String::new(),
        resource: "serviceaccounts".into(),
    };
    for ns in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        if store.get(&namespaces, "", ns).is_some() {
            continue;
        }
        let now = semantics::now_rfc3339();
        let object = json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": ns, "uid": format!("ns-{ns}"), "creationTimestamp": now, "labels": {"kubernetes.io/metadata.name": ns}},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        });
        store
            .put(&namespaces, "", ns, object)
            .map_err(|e| LabError::Config(e.to_string()))?;
        let sa = json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "default", "namespace": ns, "uid": format!("sa-{ns}-default"), "creationTimestamp": now},
        });
        store
            .put(&service_accounts, ns, "default", sa)
            .map_err(|e| LabError::Config(e.to_string()))?;
    }
    Ok(())
}

fn tls_config(chain_pem: &str, key_pem: &str) -> Result<Arc<rustls::ServerConfig>, LabError> {
    let chain = weft_certs::pem::certificates("serving certificate", chain_pem)?;
    let key = weft_certs::pem::private_key("serving key", key_pem)?;
    let mut config = rustls::ServerConfig::builder_with_provider(weft_certs::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn kubeconfig(cluster: &str, server: &str, ca_pem: &str, token: &str) -> String {
    let ca = STANDARD.encode(ca_pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {cluster}\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: {cluster}-admin\n  user:\n    token: {token}\ncontexts:\n- name: {cluster}\n  context:\n    cluster: {cluster}\n    user: {cluster}-admin\ncurrent-context: {cluster}\n"
    )
}

async fn serve(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    shared: Arc<Shared>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut connections = JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = accept::next(&listener) => accepted,
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        connections.spawn(async move {
            let tls = match accept::handshake(&acceptor, tcp, accept::HANDSHAKE_TIMEOUT).await {
                Ok(tls) => tls,
                Err(err) => {
                    tracing::debug!(%peer, %err, "TLS handshake refused");
                    return;
                }
            };
            let service =
                hyper::service::service_fn(move |request| http::handle(shared.clone(), request));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(err) = builder.serve_connection(TokioIo::new(tls), service).await {
                tracing::debug!(%peer, %err, "connection ended with an error");
            }
        });
    }
    connections.abort_all();
    while connections.join_next().await.is_some() {}
}
