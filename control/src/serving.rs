//! The control plane's own certificates: the SPIFFE one that 15012 shows
//! proxies, and the DNS one that the webhook shows the API server. Both are
//! issued at start and issued again at half their lifetime. A rotation
//! changes what the next handshake presents; open connections, and the xDS
//! streams on them, carry on untouched.

use std::sync::Arc;
use std::time::Duration;

use weft_certs::tls::{CertStore, ServingCert};
use weft_certs::{CertificateAuthority, Identity};

use crate::hub::Hub;

/// What the control plane presents, and how to issue it again.
#[derive(Clone)]
pub struct ServingCerts {
    pub xds: CertStore,
    pub webhook: ServingCert,
    identity: Identity,
    dns_names: Vec<String>,
    lifetime: Duration,
}

impl ServingCerts {
    /// Issues both certificates from `ca`: the xDS one for `identity`, the
    /// webhook one for the control plane Service's names in `namespace`.
    pub fn issue(
        ca: &CertificateAuthority,
        identity: Identity,
        namespace: &str,
        domain_suffix: &str,
        lifetime: Duration,
    ) -> anyhow::Result<Self> {
        let dns_names = vec![
            "weft-control".to_string(),
            format!("weft-control.{namespace}"),
            format!("weft-control.{namespace}.svc"),
            format!("weft-control.{namespace}.svc.{domain_suffix}"),
            "localhost".to_string(),
        ];
        let xds = CertStore::new(&weft_certs::issue_own(ca, &identity, lifetime)?)?;
        let (chain, key) = webhook_cert(ca, &dns_names, lifetime)?;
        Ok(ServingCerts {
            xds,
            webhook: ServingCert::from_pem(&chain, &key)?,
            identity,
            dns_names,
            lifetime,
        })
    }

    /// Issues both again.
    pub fn renew(&self, ca: &CertificateAuthority) -> anyhow::Result<()> {
        self.xds
            .rotate(&weft_certs::issue_own(ca, &self.identity, self.lifetime)?)?;
        let (chain, key) = webhook_cert(ca, &self.dns_names, self.lifetime)?;
        self.webhook.replace(&chain, &key)?;
        Ok(())
    }

    /// Renews at half the lifetime, for as long as the control plane runs.
    /// A failed renewal is retried every few seconds: the old certificates
    /// are still valid for the other half.
    pub async fn rotate(self, ca: Arc<CertificateAuthority>, hub: Arc<Hub>) {
        let half = self.lifetime / 2;
        let mut wait = half;
        loop {
            tokio::time::sleep(wait).await;
            match self.renew(&ca) {
                Ok(()) => {
                    hub.metrics.serving_cert_rotations.inc();
                    tracing::info!(
                        lifetime_s = self.lifetime.as_secs_f64(),
                        "serving certificates renewed"
                    );
                    wait = half;
                }
                Err(err) => {
                    tracing::error!("renewing the serving certificates failed: {err:#}");
                    wait = (half / 10).clamp(Duration::from_millis(100), Duration::from_secs(30));
                }
            }
        }
    }
}

fn webhook_cert(
    ca: &CertificateAuthority,
    dns_names: &[String],
    lifetime: Duration,
) -> anyhow::Result<(String, String)> {
    let names: Vec<&str> = dns_names.iter().map(String::as_str).collect();
    Ok(ca.issue_serving(&names, &["127.0.0.1".parse()?], lifetime)?)
}
