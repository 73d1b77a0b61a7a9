//! `weft-certs`: the mesh's certificate authority and workload identity.
//!
//! It owns everything about X.509 in weft: the root and per-cluster
//! intermediate CAs and their `cacerts` plug-in layout, SPIFFE identities,
//! signing workload CSRs into short-lived certificates, the workload's key,
//! CSR and rotation schedule, and the rustls client and server configurations
//! that authenticate peers by SPIFFE ID rather than DNS name. Both the control
//! plane (which signs) and the proxy (which presents and verifies) use it.
//! Only the ring crypto provider is used, and configs are built with it
//! explicitly.

pub mod accept;
mod ca;
mod error;
mod identity;
pub mod pem;
pub mod tls;
mod workload;
mod x509;

pub use ca::{
    CaParams, CertificateAuthority, DEFAULT_MAX_WORKLOAD_TTL, DEFAULT_WORKLOAD_TTL,
    MIN_WORKLOAD_TTL, PluginFiles, SigningPolicy, write_file,
};
pub use error::{CertError, Result};
pub use identity::Identity;
pub use workload::{ROTATION_JITTER, WorkloadCert, WorkloadKey, rotation_due};
pub use x509::CertInfo;

use std::time::Duration;

/// Issues a workload certificate in one step: new key, CSR, signature. For
/// tools and tests; a proxy makes the CSR itself and sends it to the CA.
pub fn issue_workload(
    ca: &CertificateAuthority,
    identity: &Identity,
    ttl: Option<Duration>,
) -> Result<WorkloadCert> {
    let key = WorkloadKey::generate()?;
    let chain = ca.sign_csr(&key.csr_pem(identity)?, identity, ttl)?;
    WorkloadCert::from_pem(&chain, &key)
}

/// The control plane's own certificate (see
/// [`CertificateAuthority::sign_own_csr`]): any lifetime the operator chose.
pub fn issue_own(
    ca: &CertificateAuthority,
    identity: &Identity,
    ttl: Duration,
) -> Result<WorkloadCert> {
    let key = WorkloadKey::generate()?;
    let chain = ca.sign_own_csr(&key.csr_pem(identity)?, identity, ttl)?;
    WorkloadCert::from_pem(&chain, &key)
}

#[cfg(test)]
mod tests;
