//! The workload's side of identity: a key pair, a CSR for its SPIFFE ID, the
//! certificate it gets back, and when to rotate it.

use std::time::SystemTime;

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::ca::load_key_pair;
use crate::error::{CertError, Result};
use crate::identity::Identity;
use crate::pem;
use crate::x509::CertInfo;

/// A workload's private key. Generated in the proxy, never sent anywhere.
pub struct WorkloadKey {
    key: KeyPair,
}

impl WorkloadKey {
    /// A fresh ECDSA P-256 key: fast handshakes, small certificates.
    pub fn generate() -> Result<Self> {
        Ok(WorkloadKey {
            key: KeyPair::generate()?,
        })
    }

    /// A PKCS#10 CSR whose only SAN is the identity's SPIFFE URI.
    pub fn csr_pem(&self, identity: &Identity) -> Result<String> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            identity
                .uri()
                .try_into()
                .map_err(|_| CertError::NotSpiffe(identity.uri()))?,
        )];
        Ok(params.serialize_request(&self.key)?.pem()?)
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }
}

/// A workload certificate with its key, ready for TLS.
pub struct WorkloadCert {
    identity: Identity,
    /// Leaf first, root last, as the CA returned it.
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    info: CertInfo,
    rotate_at: SystemTime,
}

impl Clone for WorkloadCert {
    fn clone(&self) -> Self {
        WorkloadCert {
            identity: self.identity.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
            info: self.info.clone(),
            rotate_at: self.rotate_at,
        }
    }
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("not_after", &self.info.not_after)
            .field("rotate_at", &self.rotate_at)
            .finish_non_exhaustive()
    }
}

/// At most this fraction of the lifetime is taken off the half-life point at
/// random, so that pods started together do not all rotate at the same
/// instant and hit the CA in one burst.
pub const ROTATION_JITTER: f64 = 0.05;

impl WorkloadCert {
    /// Builds from the CA's PEM chain and the workload's key, checking that the
    /// key belongs to the leaf and that the leaf carries a SPIFFE identity.
    pub fn from_pem(chain_pem: &[String], key: &WorkloadKey) -> Result<Self> {
        let mut chain = Vec::with_capacity(chain_pem.len());
        for (i, cert) in chain_pem.iter().enumerate() {
            chain.extend(pem::certificates(
                &format!("certificate chain entry {i}"),
                cert,
            )?);
        }
        Self::from_parts(chain, key.key_pem())
    }

    /// Builds from a PEM chain file's text and a PEM key's text (as written by
    /// `weftctl certs workload`).
    pub fn from_pem_files(chain_pem: &str, key_pem: &str) -> Result<Self> {
        let chain = pem::certificates("certificate chain", chain_pem)?;
        Self::from_parts(chain, key_pem.to_string())
    }

    fn from_parts(chain: Vec<CertificateDer<'static>>, key_pem: String) -> Result<Self> {
        let leaf = chain.first().ok_or_else(|| CertError::NoPem {
            what: "certificate chain".into(),
            expected: "CERTIFICATE",
        })?;
        let info = CertInfo::parse("workload certificate", leaf)?;
        let key_pair = load_key_pair("workload key", &key_pem)?;
        if info.public_key != key_pair.public_key_raw() {
            return Err(CertError::KeyMismatch {
                what: "workload certificate and key".into(),
            });
        }
        let identity = info
            .identity()
            .ok_or_else(|| CertError::NotSpiffe(info.uri_sans.join(", ")))?;
        // Half of what is left from now, not from `not_before`: CAs backdate
        // certificates for clock skew (ours by a minute), and counted from
        // there a short-lived certificate would be due at once, every time.
        let start = info.not_before.max(SystemTime::now());
        let rotate_at = rotation_due(start, info.not_after, rand::random::<f64>());
        Ok(WorkloadCert {
            identity,
            chain,
            key: PrivatePkcs8KeyDer::from(key_pair.serialize_der()),
            info,
            rotate_at,
        })
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    pub fn not_before(&self) -> SystemTime {
        self.info.not_before
    }

    pub fn not_after(&self) -> SystemTime {
        self.info.not_after
    }

    /// The chain a TLS peer is sent: leaf and intermediates. The root is left
    /// out because the peer must already have it to trust anything.
    pub fn presented_chain(&self) -> Vec<CertificateDer<'static>> {
        match self.chain.len() {
            0 | 1 => self.chain.clone(),
            n => self.chain[..n - 1].to_vec(),
        }
    }

    /// Every certificate, leaf first, root last.
    pub fn full_chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    pub fn chain_pem(&self) -> String {
        pem::encode_certificates(&self.chain)
    }

    pub fn key_pem(&self) -> String {
        pem::encode("PRIVATE KEY", self.key.secret_pkcs8_der())
    }

    /// When this certificate should be replaced.
    pub fn rotate_at(&self) -> SystemTime {
        self.rotate_at
    }

    /// True once the certificate has passed (about) half its lifetime.
    pub fn needs_rotation(&self, now: SystemTime) -> bool {
        now >= self.rotate_at
    }
}

/// The rotation point: half the lifetime after `not_before`, brought forward by
/// `jitter` (0.0..1.0) times [`ROTATION_JITTER`] of the lifetime.
pub fn rotation_due(not_before: SystemTime, not_after: SystemTime, jitter: f64) -> SystemTime {
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let early = lifetime.mul_f64(ROTATION_JITTER * jitter.clamp(0.0, 1.0));
    not_before + lifetime / 2 - early.min(lifetime / 2)
}
