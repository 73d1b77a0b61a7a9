use std::time::SystemTime;

/// Everything that can go wrong with certificates, keys and identities. Each
/// variant names the thing at fault so that an operator can act on the log
/// line alone.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{what}: no PEM block of type {expected} found")]
    NoPem {
        what: String,
        expected: &'static str,
    },
    #[error("{what}: malformed PEM: {reason}")]
    BadPem { what: String, reason: String },
    #[error("{what}: not a valid X.509 certificate: {reason}")]
    BadCertificate { what: String, reason: String },
    #[error("{what}: private key is not usable: {reason}")]
    BadKey { what: String, reason: String },
    #[error("{what}: the private key does not belong to the certificate")]
    KeyMismatch { what: String },
    #[error("{what}: certificate expired at {not_after:?}")]
    Expired { what: String, not_after: SystemTime },
    #[error("{what}: certificate is not valid before {not_before:?}")]
    NotYetValid {
        what: String,
        not_before: SystemTime,
    },
    #[error("{what}: not a CA certificate (basicConstraints CA is not set)")]
    NotCa { what: String },
    #[error("{what}: certificate chain is broken: {reason}")]
    BrokenChain { what: String, reason: String },
    #[error("CSR is not valid: {0}")]
    BadCsr(String),
    #[error("CSR signature does not verify against its own public key")]
    CsrSignature,
    #[error("CSR must request exactly one SAN, a SPIFFE URI; found {0}")]
    CsrSans(String),
    #[error("not a SPIFFE ID: {0:?}")]
    NotSpiffe(String),
    #[error(
        "SPIFFE ID {requested} is in trust domain {found:?}; this CA issues only for {expected:?}"
    )]
    ForeignTrustDomain {
        requested: String,
        found: String,
        expected: String,
    },
    #[error("CSR requests identity {requested}, but the caller authenticated as {authenticated}")]
    IdentityMismatch {
        requested: String,
        authenticated: String,
    },
    #[error("not a valid DNS name for a certificate: {0:?}")]
    InvalidDnsName(String),
    #[error("requested lifetime {requested_secs}s is not allowed: {reason}")]
    BadLifetime { requested_secs: u64, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

pub type Result<T, E = CertError> = std::result::Result<T, E>;
