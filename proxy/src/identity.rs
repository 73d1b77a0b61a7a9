//! The proxy's workload certificate: a key made here, a CSR sent to the
//! control plane's CA with the pod's service-account token, and a new
//! certificate at half its lifetime. Rotation swaps the certificate for new
//! handshakes only; open connections keep theirs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use weft_certs::tls::{self, CertStore, TrustBundle};
use weft_certs::{Identity, WorkloadCert, WorkloadKey};
use weft_xds_proto::ca::CreateCertificateRequest;
use weft_xds_proto::ca::certificate_service_client::CertificateServiceClient;

use crate::channel;

#[derive(Clone, Debug)]
pub struct IdentityConfig {
    /// host:port of the control plane's TLS port.
    pub control_plane: String,
    /// Whom the control plane must prove to be.
    pub control_plane_identity: Identity,
    /// This workload's identity.
    pub identity: Identity,
    /// The projected service-account token (audience `weft-ca`); read at
    /// every request because the kubelet rotates it.
    pub token_path: PathBuf,
    pub bundle: TrustBundle,
    pub ttl: Duration,
}

/// Asks the CA for a certificate.
pub async fn fetch(config: &IdentityConfig) -> Result<WorkloadCert> {
    let token = std::fs::read_to_string(&config.token_path).with_context(|| {
        format!(
            "reading the service-account token {}",
            config.token_path.display()
        )
    })?;
    let key = WorkloadKey::generate()?;
    let csr = key.csr_pem(&config.identity)?;
    let tls = tls::client_config_without_certificate(
        &config.bundle,
        vec![config.control_plane_identity.clone()],
    )?;
    let mut client =
        CertificateServiceClient::new(channel::mesh(config.control_plane.clone(), tls));
    let mut request = tonic::Request::new(CreateCertificateRequest {
        csr,
        validity_seconds: i64::try_from(config.ttl.as_secs()).unwrap_or(i64::MAX),
    });
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {}", token.trim())
            .parse()
            .context("the token is not valid header text")?,
    );
    let response = client.create_certificate(request).await.map_err(|status| {
        anyhow::anyhow!("the CA refused: {:?}: {}", status.code(), status.message())
    })?;
    let cert = WorkloadCert::from_pem(&response.into_inner().cert_chain, &key)?;
    if cert.identity() != &config.identity {
        anyhow::bail!(
            "the CA issued {} instead of {}",
            cert.identity(),
            config.identity
        );
    }
    Ok(cert)
}

/// Keeps `store` current: a new certificate at each rotation point, retried
/// with backoff if the CA is unreachable, until the old one expires.
pub async fn rotate(config: Arc<IdentityConfig>, store: CertStore) {
    let backoff = crate::xds::Backoff::default();
    loop {
        let due = store.certificate().rotate_at();
        let wait = due.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::time::sleep(wait).await;
        let mut attempt = 0;
        loop {
            match fetch(&config).await {
                Ok(cert) => {
                    if let Err(err) = store.rotate(&cert) {
                        tracing::error!(%err, "the new certificate is unusable");
                    } else {
                        tracing::info!(identity = %cert.identity(), "certificate rotated");
                    }
                    break;
                }
                Err(err) => {
                    tracing::warn!(%err, attempt, "certificate rotation failed; retrying");
                    attempt += 1;
                    tokio::time::sleep(backoff.delay(attempt)).await;
                }
            }
        }
    }
}
