//! The mesh CA service: a proxy sends a CSR with its service-account token;
//! the token is checked by TokenReview against the local API server, and the
//! CSR may ask only for the identity of that service account.

use std::sync::Arc;
use std::time::Duration;

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
            let data = secret.data.unwrap_or_default();
            let text = |key: &str| {
                data.get(key)
                    .map(|b| String::from_utf8_lossy(&b.0).into_owned())
                    .unwrap_or_default()
            };
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
                "NO cacerts SECRET: using a self-signed root CA made just now. Workloads in other \
                 clusters will NOT trust this cluster's certificates. Create cacerts from a shared \
                 root (weftctl certs intermediate) for a multi-cluster mesh."
            );
            Ok(CertificateAuthority::generate_root(
                trust_domain,
                &CaParams::valid_for("weft self-signed root", Duration::from_secs(365 * 86400)),
            )?)
        }
        Err(err) => Err(anyhow::anyhow!(
            "reading the cacerts Secret in {namespace}: {err}"
        )),
    }
}

pub struct CaService {
    pub ca: Arc<CertificateAuthority>,
    pub client: kube::Client,
    pub hub: Arc<Hub>,
}

impl CaService {
    async fn authenticate(&self, token: &str) -> Result<Identity, Status> {
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
            .map_err(|e| Status::unavailable(format!("TokenReview failed: {e}")))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(Status::unauthenticated(format!(
                "token rejected: {}",
                status.error.unwrap_or_else(|| "not authenticated".into())
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
}

#[tonic::async_trait]
impl CertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
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
                tracing::info!(code = ?status.code(), message = status.message(), "certificate request refused");
                Err(status)
            }
        }
    }
}
