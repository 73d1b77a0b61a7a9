//! The mesh CA service: a proxy sends a CSR with its service-account token;
//! the token is checked by TokenReview against the local API server, and the
//! CSR may ask only for the identity of that service account.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, PostParams};
use tonic::{Request, Response, Status};
use weft_certs::{CaParams, CertError, CertificateAuthority, Identity, PluginFiles};
use weft_xds_proto::ca::certificate_service_server::CertificateService;
use weft_xds_proto::ca::{CreateCertificateRequest, CreateCertificateResponse};

use crate::hub::Hub;

/// The audience proxies' tokens must carry for the CA.
pub const CA_AUDIENCE: &str = "weft-ca";

/// Loads the CA from the `cacerts` Secret in the control plane's namespace,
/// or, when there is none, makes a self-signed root and says loudly that
/// clusters will not trust each other with it.
pub async fn load(
    client: &kube::Client,
    namespace: &str,
    trust_domain: &str,
) -> anyhow::Result<CertificateAuthority> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    match secrets.get_opt("cacerts").await {
        Ok(Some(secret)) => {
            let text = texts_of(secret);
            let files = PluginFiles {
                ca_cert: text(PluginFiles::CA_CERT),
                ca_key: text(PluginFiles::CA_KEY),
                root_cert: text(PluginFiles::ROOT_CERT),
                cert_chain: text(PluginFiles::CERT_CHAIN),
            };
            let ca = CertificateAuthority::from_plugin(&files, trust_domain).map_err(|e| {
                anyhow::anyhow!("the cacerts Secret in {namespace} is not usable: {e}")
            })?;
            tracing::info!(
                namespace,
                "signing with the plug-in CA from the cacerts Secret"
            );
            Ok(ca)
        }
        Ok(None) => {
            tracing::warn!(
                namespace,
                "NO cacerts SECRET: signing with a self-signed root kept in the {SELF_SIGNED_SECRET} \
                 Secret. Workloads in other clusters will NOT trust this cluster's certificates. \
                 Create cacerts from a shared root (weftctl certs intermediate) for a multi-cluster mesh."
            );
            self_signed(&secrets, trust_domain).await
        }
        Err(err) => Err(anyhow::anyhow!(
            "reading the cacerts Secret in {namespace}: {err}"
        )),
    }
}

/// A Secret's data as text, by key (empty when a key is missing).
fn texts_of(secret: Secret) -> impl Fn(&str) -> String {
    let data = secret.data.unwrap_or_default();
    move |key| {
        data.get(key)
            .map(|b| String::from_utf8_lossy(&b.0).into_owned())
            .unwrap_or_default()
    }
}

/// Where the self-signed root lives when there is no `cacerts` (Istio's
/// `istio-ca-secret`): made once, so that a restarted control plane, or a
/// second replica, signs with the same root and every certificate already
/// issued stays trusted.
pub const SELF_SIGNED_SECRET: &str = "weft-ca-secret";

async fn self_signed(
    secrets: &Api<Secret>,
    trust_domain: &str,
) -> anyhow::Result<CertificateAuthority> {
    let from_secret = |secret: Secret| {
        let text = texts_of(secret);
        let files = PluginFiles {
            ca_cert: text(PluginFiles::CA_CERT),
            ca_key: text(PluginFiles::CA_KEY),
            root_cert: text(PluginFiles::CA_CERT),
            cert_chain: String::new(),
        };
        CertificateAuthority::from_plugin(&files, trust_domain).map_err(|e| {
            anyhow::anyhow!(
                "the {SELF_SIGNED_SECRET} Secret is not usable: {e}; delete it to make a new root"
            )
        })
    };
    if let Some(secret) = secrets.get_opt(SELF_SIGNED_SECRET).await? {
        tracing::info!("signing with the self-signed root from {SELF_SIGNED_SECRET}");
        return from_secret(secret);
    }
    let ca = CertificateAuthority::generate_root(
        trust_domain,
        &CaParams::valid_for(
            "weft self-signed root",
            Duration::from_secs(10 * 365 * 86400),
        ),
    )?;
    let files = ca.plugin_files();
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": SELF_SIGNED_SECRET, "labels": {"weft.io/managed-by": "weft-control"}},
        "type": "Opaque",
        "stringData": {PluginFiles::CA_CERT: files.ca_cert, PluginFiles::CA_KEY: files.ca_key},
    }))?;
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => {
            tracing::info!("made a self-signed root and stored it in {SELF_SIGNED_SECRET}");
            Ok(ca)
        }
        // Another replica stored its root first: use that one, so that both
        // sign under one root.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let secret = secrets.get(SELF_SIGNED_SECRET).await?;
            from_secret(secret)
        }
        Err(err) => Err(anyhow::anyhow!("storing {SELF_SIGNED_SECRET}: {err}")),
    }
}

pub struct CaService {
    ca: Arc<CertificateAuthority>,
    client: kube::Client,
    hub: Arc<Hub>,
    reviewed: Mutex<HashMap<[u8; 32], (Identity, SystemTime)>>,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

/// Tokens remembered after a successful review, at most; past that, expired
/// ones are dropped and, if none were, nothing more is remembered.
const REVIEW_CACHE: usize = 10_000;
/// Failed requests one address may make per window before it is refused
/// for the rest of the window, without a TokenReview being sent.
pub const FAILURES_PER_WINDOW: u32 = 10;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

impl CaService {
    pub fn new(ca: Arc<CertificateAuthority>, client: kube::Client, hub: Arc<Hub>) -> Self {
        CaService {
            ca,
            client,
            hub,
            reviewed: Mutex::new(HashMap::new()),
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// Who the token belongs to: from the cache while the token is valid,
    /// else from a TokenReview (each proxy renews every 12 hours, so a
    /// thousand pods restarting together would otherwise be a thousand
    /// reviews on the API server).
    async fn authenticate(&self, token: &str) -> Result<Identity, Status> {
        let key = token_hash(token);
        let now = SystemTime::now();
        if let Some((identity, expires)) = lock(&self.reviewed).get(&key)
            && *expires > now
        {
            return Ok(identity.clone());
        }
        let identity = self.review(token).await?;
        // A token without a readable expiry is reviewed every time.
        if let Some(expires) = token_expiry(token).filter(|e| *e > now) {
            let mut cache = lock(&self.reviewed);
            if cache.len() >= REVIEW_CACHE {
                cache.retain(|_, (_, e)| *e > now);
            }
            if cache.len() < REVIEW_CACHE {
                cache.insert(key, (identity.clone(), expires));
            }
        }
        Ok(identity)
    }

    async fn review(&self, token: &str) -> Result<Identity, Status> {
        let reviews: Api<TokenReview> = Api::all(self.client.clone());
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![CA_AUDIENCE.to_string()]),
            },
            ..Default::default()
        };
        let answer = reviews
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| {
                // The API server's words stay in the log: they can name
                // internal hosts and accounts.
                tracing::warn!(%e, "TokenReview failed");
                Status::unavailable("the token could not be reviewed; retry later")
            })?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            tracing::debug!(error = ?status.error, "token rejected by TokenReview");
            return Err(Status::unauthenticated("token rejected"));
        }
        // An API server that ignores spec.audiences would accept a token
        // minted for something else; the answer must name ours.
        if !status
            .audiences
            .as_ref()
            .is_some_and(|a| a.iter().any(|a| a == CA_AUDIENCE))
        {
            return Err(Status::unauthenticated(format!(
                "the token is not for the {CA_AUDIENCE} audience"
            )));
        }
        let username = status.user.and_then(|u| u.username).unwrap_or_default();
        let mut parts = username.split(':');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("system"), Some("serviceaccount"), Some(ns), Some(sa), None) => {
                Identity::new(self.ca.trust_domain(), ns, sa)
                    .map_err(|e| Status::permission_denied(e.to_string()))
            }
            _ => Err(Status::permission_denied(format!(
                "{username} is not a service account"
            ))),
        }
    }

    /// Whether `source` has failed too often lately to be heard.
    fn throttled(&self, source: Option<IpAddr>) -> bool {
        let Some(ip) = source else { return false };
        lock(&self.failures).get(&ip).is_some_and(|(since, count)| {
            since.elapsed() < FAILURE_WINDOW && *count >= FAILURES_PER_WINDOW
        })
    }

    fn count_failure(&self, source: Option<IpAddr>) {
        let Some(ip) = source else { return };
        let mut failures = lock(&self.failures);
        if failures.len() >= REVIEW_CACHE {
            failures.retain(|_, (since, _)| since.elapsed() < FAILURE_WINDOW);
        }
        let entry = failures.entry(ip).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= FAILURE_WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn token_hash(token: &str) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    let mut key = [0; 32];
    key.copy_from_slice(digest.as_ref());
    key
}

/// The `exp` claim of a JWT, read without checking the signature: only
/// used after the API server accepted the token, to bound how long that
/// answer is remembered.
fn token_expiry(token: &str) -> Option<SystemTime> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(claims["exp"].as_u64()?))
}

#[tonic::async_trait]
impl CertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let source = request
            .extensions()
            .get::<crate::tls::PeerIdentity>()
            .map(|p| p.addr.ip());
        if self.throttled(source) {
            self.hub.metrics.certificates_refused.inc();
            return Err(Status::resource_exhausted(
                "too many failed certificate requests from this address; retry in a minute",
            ));
        }
        let token = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated("missing bearer token in the authorization metadata")
            })?
            .to_string();
        let result: Result<CreateCertificateResponse, Status> = async {
            let identity = self.authenticate(&token).await?;
            let body = request.into_inner();
            let ttl = u64::try_from(body.validity_seconds)
                .ok()
                .filter(|s| *s > 0)
                .map(Duration::from_secs);
            let chain = self
                .ca
                .sign_csr(&body.csr, &identity, ttl)
                .map_err(|e| match e {
                    CertError::IdentityMismatch { .. } | CertError::ForeignTrustDomain { .. } => {
                        Status::permission_denied(e.to_string())
                    }
                    other => Status::invalid_argument(other.to_string()),
                })?;
            tracing::debug!(%identity, "issued a workload certificate");
            Ok(CreateCertificateResponse { cert_chain: chain })
        }
        .await;
        match result {
            Ok(response) => {
                self.hub.metrics.certificates_issued.inc();
                Ok(Response::new(response))
            }
            Err(status) => {
                self.hub.metrics.certificates_refused.inc();
                if status.code() != tonic::Code::Unavailable {
                    self.count_failure(source);
                }
                tracing::info!(code = ?status.code(), message = status.message(), "certificate request refused");
                Err(status)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;
    use weft_certs::{CaParams, WorkloadKey};

    use super::*;
    use crate::model::{Model, ModelConfig};

    /// An API server that answers every request with `status` and `body`.
    async fn api_server(status: u16, body: serde_json::Value) -> kube::Client {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_| {
                        let body = body.to_string();
                        async move {
                            Ok::<_, Infallible>(
                                http::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(Full::new(Bytes::from(body)))
                                    .unwrap(),
                            )
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service)
                        .await;
                });
            }
        });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    fn service(client: kube::Client) -> CaService {
        let ca = CertificateAuthority::generate_root(
            "cluster.local",
            &CaParams::valid_for("test", Duration::from_secs(3600)),
        )
        .unwrap();
        let (hub, _) = Hub::new(Model::new(ModelConfig {
            local_cluster: "c1".into(),
            network: "default".into(),
            trust_domain: "cluster.local".into(),
            domain_suffix: "cluster.local".into(),
            system_namespace: "weft-system".into(),
            root_namespace: "weft-system".into(),
            cluster_local: Vec::new(),
            default_global: true,
            mcs_cluster_local: false,
        }));
        CaService::new(Arc::new(ca), client, hub)
    }

    fn ask() -> Request<CreateCertificateRequest> {
        let me = Identity::new("cluster.local", "demo", "echo").unwrap();
        let key = WorkloadKey::generate().unwrap();
        let mut request = Request::new(CreateCertificateRequest {
            csr: key.csr_pem(&me).unwrap(),
            validity_seconds: 3600,
        });
        request
            .metadata_mut()
            .insert("authorization", "Bearer some-token".parse().unwrap());
        request
    }

    #[tokio::test]
    async fn a_review_that_does_not_name_the_audience_is_refused() {
        // An API server that ignores spec.audiences: it accepts the token
        // (minted for something else) and names no audience.
        let client = api_server(
            201,
            serde_json::json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                "status": {"authenticated": true, "user": {"username": "system:serviceaccount:demo:echo"}, "audiences": ["https://kubernetes.default.svc"]},
            }),
        )
        .await;
        let err = service(client).create_certificate(ask()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
        assert!(err.message().contains("weft-ca"), "{err}");
    }

    #[tokio::test]
    async fn api_server_errors_are_not_echoed() {
        let client = api_server(
            500,
            serde_json::json!({
                "apiVersion": "v1", "kind": "Status", "status": "Failure", "code": 500,
                "message": "etcd at 10.0.0.7:2379 is down for secret-cluster-internal",
            }),
        )
        .await;
        let err = service(client).create_certificate(ask()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        assert!(
            !err.message().contains("etcd") && !err.message().contains("10.0.0.7"),
            "{err}"
        );
    }
}
