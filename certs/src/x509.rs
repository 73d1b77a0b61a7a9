//! What weft reads out of a certificate, parsed once with x509-parser.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::{CertError, Result};
use crate::identity::Identity;

/// The facts about one certificate that weft's checks need.
#[derive(Clone, Debug)]
pub struct CertInfo {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    pub uri_sans: Vec<String>,
    pub subject: String,
    /// The raw subject public key, to compare with a private key's.
    pub public_key: Vec<u8>,
}

impl CertInfo {
    pub fn parse(what: &str, der: &CertificateDer<'_>) -> Result<Self> {
        let cert = parse(what, der)?;
        let bad = |reason: String| CertError::BadCertificate {
            what: what.to_string(),
            reason,
        };
        let uri_sans = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(uri.to_string()),
                    _ => None,
                })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(bad(format!("subjectAltName: {e}"))),
        };
        let is_ca = match cert.basic_constraints() {
            Ok(Some(bc)) => bc.value.ca,
            Ok(None) => false,
            Err(e) => return Err(bad(format!("basicConstraints: {e}"))),
        };
        Ok(CertInfo {
            not_before: to_system_time(cert.validity().not_before.timestamp()),
            not_after: to_system_time(cert.validity().not_after.timestamp()),
            is_ca,
            uri_sans,
            subject: cert.subject().to_string(),
            public_key: cert.public_key().subject_public_key.data.to_vec(),
        })
    }

    /// The SPIFFE identity, when the certificate carries exactly one
    /// SPIFFE URI SAN (more than one would make the identity ambiguous).
    pub fn identity(&self) -> Option<Identity> {
        let mut spiffe = self.uri_sans.iter().filter(|u| u.starts_with("spiffe://"));
        let first = spiffe.next()?;
        if spiffe.next().is_some() {
            return None;
        }
        first.parse().ok()
    }

    /// Fails if `now` is outside the validity window.
    pub fn check_valid_at(&self, what: &str, now: SystemTime) -> Result<()> {
        if now > self.not_after {
            return Err(CertError::Expired {
                what: what.to_string(),
                not_after: self.not_after,
            });
        }
        if now < self.not_before {
            return Err(CertError::NotYetValid {
                what: what.to_string(),
                not_before: self.not_before,
            });
        }
        Ok(())
    }

    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or_default()
    }
}

/// Checks that `child` carries a valid signature by `issuer`'s key.
pub fn check_signed_by(
    what: &str,
    child: &CertificateDer<'_>,
    issuer: &CertificateDer<'_>,
) -> Result<()> {
    let child_cert = parse(what, child)?;
    let issuer_cert = parse(what, issuer)?;
    child_cert
        .verify_signature(Some(issuer_cert.public_key()))
        .map_err(|e| CertError::BrokenChain {
            what: what.to_string(),
            reason: format!(
                "{:?} is not signed by {:?}: {e}",
                child_cert.subject().to_string(),
                issuer_cert.subject().to_string()
            ),
        })
}

fn parse<'a>(what: &str, der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>> {
    let (rest, cert) =
        X509Certificate::from_der(der.as_ref()).map_err(|e| CertError::BadCertificate {
            what: what.to_string(),
            reason: e.to_string(),
        })?;
    if !rest.is_empty() {
        return Err(CertError::BadCertificate {
            what: what.to_string(),
            reason: format!("{} trailing bytes after the certificate", rest.len()),
        });
    }
    Ok(cert)
}

fn to_system_time(unix_seconds: i64) -> SystemTime {
    if unix_seconds >= 0 {
        UNIX_EPOCH + Duration::from_secs(unix_seconds.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(unix_seconds.unsigned_abs())
    }
}
