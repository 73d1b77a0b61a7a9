//! PEM in and out, through `rustls_pki_types::pem::PemObject`.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::{CertError, Result};

/// Every certificate in a PEM text, in order. Fails on garbage or on a text
/// with no certificate at all, since a silently empty chain would later fail
/// in a far more confusing place.
pub fn certificates(what: &str, pem: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| CertError::BadPem {
            what: what.to_string(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(CertError::NoPem {
            what: what.to_string(),
            expected: "CERTIFICATE",
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, SEC1 or PKCS#1) in a PEM text.
pub fn private_key(what: &str, pem: &str) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| match e {
        rustls_pki_types::pem::Error::NoItemsFound => CertError::NoPem {
            what: what.to_string(),
            expected: "PRIVATE KEY",
        },
        other => CertError::BadPem {
            what: what.to_string(),
            reason: other.to_string(),
        },
    })
}

/// Encodes DER certificates as PEM text, one block each.
pub fn encode_certificates<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    certs
        .into_iter()
        .map(|der| encode("CERTIFICATE", der.as_ref()))
        .collect()
}

pub(crate) fn encode(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_a_clear_error() {
        let err = certificates("root-cert.pem", "hello").unwrap_err();
        assert!(matches!(err, CertError::NoPem { .. }), "{err}");
        let err = certificates(
            "root-cert.pem",
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap_err();
        assert!(matches!(err, CertError::BadPem { .. }), "{err}");
        assert!(err.to_string().contains("root-cert.pem"));
        let err = private_key("ca-key.pem", "").unwrap_err();
        assert!(matches!(err, CertError::NoPem { .. }), "{err}");
    }

    #[test]
    fn encoded_pem_parses_back() {
        let der = CertificateDer::from((0u8..=200).collect::<Vec<u8>>());
        let text = encode_certificates([&der]);
        let back = CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<std::result::Result<Vec<_>, _>>()
            .unwrap();
        assert_eq!(back, vec![der]);
    }
}
