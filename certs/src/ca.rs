//! The mesh CA: a self-signed root, per-cluster intermediates under it, the
//! `cacerts` plug-in layout, and workload CSR signing.
//!
//! Multi-primary needs every cluster's CA to chain to one shared root, so that
//! a workload in one cluster trusts a peer whose certificate another cluster
//! signed. Each cluster therefore runs an intermediate; the root key stays
//! offline with the operator.

use std::path::Path;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;

use crate::error::{CertError, Result};
use crate::identity::Identity;
use crate::pem;
use crate::x509::{CertInfo, check_signed_by};

/// Default lifetime of a workload certificate.
pub const DEFAULT_WORKLOAD_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest workload lifetime the CA grants unless configured otherwise.
pub const DEFAULT_MAX_WORKLOAD_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Shortest lifetime the CA grants: anything shorter would rotate faster than
/// a proxy can reasonably fetch and install it.
pub const MIN_WORKLOAD_TTL: Duration = Duration::from_secs(60);
/// Certificates start a little in the past, so that a peer whose clock runs
/// slightly behind does not reject a certificate issued a moment ago.
const BACKDATE: Duration = Duration::from_secs(60);

/// The four files of the `cacerts` secret, as text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PluginFiles {
    /// This CA's certificate (`ca-cert.pem`).
    pub ca_cert: String,
    /// This CA's private key (`ca-key.pem`).
    pub ca_key: String,
    /// The trusted root or roots (`root-cert.pem`).
    pub root_cert: String,
    /// This CA's certificate up to and including the root (`cert-chain.pem`).
    pub cert_chain: String,
}

impl PluginFiles {
    pub const CA_CERT: &'static str = "ca-cert.pem";
    pub const CA_KEY: &'static str = "ca-key.pem";
    pub const ROOT_CERT: &'static str = "root-cert.pem";
    pub const CERT_CHAIN: &'static str = "cert-chain.pem";

    /// Reads the layout from a directory (a mounted `cacerts` secret).
    /// `cert-chain.pem` may be absent when `ca-cert.pem` is the root itself.
    pub fn read_dir(dir: &Path) -> Result<Self> {
        let read = |name: &str, required: bool| -> Result<String> {
            let path = dir.join(name);
            match std::fs::read_to_string(&path) {
                Ok(text) => Ok(text),
                Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => {
                    Ok(String::new())
                }
                Err(source) => Err(CertError::Io {
                    what: format!("reading {}", path.display()),
                    source,
                }),
            }
        };
        Ok(PluginFiles {
            ca_cert: read(Self::CA_CERT, true)?,
            ca_key: read(Self::CA_KEY, true)?,
            root_cert: read(Self::ROOT_CERT, true)?,
            cert_chain: read(Self::CERT_CHAIN, false)?,
        })
    }

    /// Writes the layout to a directory, the key readable by its owner only.
    pub fn write_dir(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| CertError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        write_file(&dir.join(Self::CA_CERT), &self.ca_cert, false)?;
        write_file(&dir.join(Self::CA_KEY), &self.ca_key, true)?;
        write_file(&dir.join(Self::ROOT_CERT), &self.root_cert, false)?;
        write_file(&dir.join(Self::CERT_CHAIN), &self.cert_chain, false)?;
        Ok(())
    }
}

/// Writes a file; secret files get mode 0600 from creation, never briefly
/// world-readable.
pub fn write_file(path: &Path, contents: &str, secret: bool) -> Result<()> {
    use std::io::Write;
    let io_err = |source| CertError::Io {
        what: format!("writing {}", path.display()),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(io_err)?;
    file.write_all(contents.as_bytes()).map_err(io_err)
}

/// Validity window and name of a CA certificate being created.
#[derive(Clone, Debug)]
pub struct CaParams {
    pub common_name: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl CaParams {
    /// A CA valid from now (backdated slightly) for `ttl`.
    pub fn valid_for(common_name: impl Into<String>, ttl: Duration) -> Self {
        let now = SystemTime::now();
        CaParams {
            common_name: common_name.into(),
            not_before: now - BACKDATE,
            not_after: now + ttl,
        }
    }
}

/// How long the workload certificates this CA signs may live.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SigningPolicy {
    pub default_ttl: Duration,
    pub max_ttl: Duration,
}

impl Default for SigningPolicy {
    fn default() -> Self {
        SigningPolicy {
            default_ttl: DEFAULT_WORKLOAD_TTL,
            max_ttl: DEFAULT_MAX_WORKLOAD_TTL,
        }
    }
}

/// A CA that can sign: its key, its certificate, and the chain from it to the
/// root.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// This CA's certificate first, the root last.
    chain: Vec<CertificateDer<'static>>,
    /// Every root the mesh trusts (more than one while a root rotates).
    roots: Vec<CertificateDer<'static>>,
    info: CertInfo,
    trust_domain: String,
    policy: SigningPolicy,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("subject", &self.info.subject)
            .field("trust_domain", &self.trust_domain)
            .field("not_after", &self.info.not_after)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// A new self-signed root for a trust domain.
    pub fn generate_root(trust_domain: &str, params: &CaParams) -> Result<Self> {
        check_trust_domain(trust_domain)?;
        let key = KeyPair::generate()?;
        let cert_params = ca_cert_params(params, None)?;
        let cert = cert_params.self_signed(&key)?;
        let der = cert.der().clone();
        Self::assemble(key, vec![der.clone()], vec![der], trust_domain)
    }

    /// A new intermediate CA for one cluster, signed by this CA. Intermediates
    /// may sign only workloads (path length 0), so a leaked cluster key cannot
    /// mint further CAs.
    pub fn generate_intermediate(&self, cluster_id: &str, params: &CaParams) -> Result<Self> {
        if params.not_after > self.info.not_after {
            return Err(CertError::BadLifetime {
                requested_secs: secs_between(params.not_before, params.not_after),
                reason: format!(
                    "an intermediate must not outlive its issuer (issuer expires {:?})",
                    self.info.not_after
                ),
            });
        }
        self.info.check_valid_at("issuing CA", SystemTime::now())?;
        let key = KeyPair::generate()?;
        let cert_params = ca_cert_params(params, Some(cluster_id))?;
        let cert = cert_params.signed_by(&key, &self.issuer)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        Self::assemble(key, chain, self.roots.clone(), &self.trust_domain)
    }

    /// Loads a CA from the `cacerts` plug-in files and checks that they hang
    /// together: the key belongs to the certificate, the certificate is a CA
    /// and currently valid, and the chain leads to one of the roots.
    pub fn from_plugin(files: &PluginFiles, trust_domain: &str) -> Result<Self> {
        Self::from_plugin_at(files, trust_domain, SystemTime::now())
    }

    pub fn from_plugin_at(
        files: &PluginFiles,
        trust_domain: &str,
        now: SystemTime,
    ) -> Result<Self> {
        check_trust_domain(trust_domain)?;
        let ca_cert = pem::certificates(PluginFiles::CA_CERT, &files.ca_cert)?
            .into_iter()
            .next()
            .ok_or_else(|| CertError::NoPem {
                what: PluginFiles::CA_CERT.into(),
                expected: "CERTIFICATE",
            })?;
        let roots = pem::certificates(PluginFiles::ROOT_CERT, &files.root_cert)?;
        let listed_chain = if files.cert_chain.trim().is_empty() {
            Vec::new()
        } else {
            pem::certificates(PluginFiles::CERT_CHAIN, &files.cert_chain)?
        };

        // Normalise to [ca-cert, intermediates..., root].
        let mut chain = vec![ca_cert.clone()];
        chain.extend(listed_chain.into_iter().filter(|c| *c != ca_cert));
        let last_is_root = chain.last().is_some_and(|last| roots.contains(last));
        if !last_is_root {
            let last = chain.last().cloned().unwrap_or_else(|| ca_cert.clone());
            let root = roots
                .iter()
                .find(|root| check_signed_by(PluginFiles::CERT_CHAIN, &last, root).is_ok())
                .ok_or_else(|| CertError::BrokenChain {
                    what: PluginFiles::CERT_CHAIN.into(),
                    reason: "the chain does not end at any certificate in root-cert.pem".into(),
                })?;
            chain.push(root.clone());
        }
        for pair in chain.windows(2) {
            check_signed_by(PluginFiles::CERT_CHAIN, &pair[0], &pair[1])?;
        }
        if let Some(root) = chain.last() {
            check_signed_by(PluginFiles::ROOT_CERT, root, root)?;
        }
        for (i, cert) in chain.iter().enumerate() {
            let what = if i == 0 {
                PluginFiles::CA_CERT.to_string()
            } else {
                format!("{} certificate {i}", PluginFiles::CERT_CHAIN)
            };
            CertInfo::parse(&what, cert)?.check_valid_at(&what, now)?;
        }

        let key = load_key_pair(PluginFiles::CA_KEY, &files.ca_key)?;
        Self::assemble(key, chain, roots, trust_domain)
    }

    fn assemble(
        key: KeyPair,
        chain: Vec<CertificateDer<'static>>,
        roots: Vec<CertificateDer<'static>>,
        trust_domain: &str,
    ) -> Result<Self> {
        let ca_cert = chain.first().cloned().ok_or_else(|| CertError::NoPem {
            what: PluginFiles::CA_CERT.into(),
            expected: "CERTIFICATE",
        })?;
        let info = CertInfo::parse(PluginFiles::CA_CERT, &ca_cert)?;
        if !info.is_ca {
            return Err(CertError::NotCa {
                what: PluginFiles::CA_CERT.into(),
            });
        }
        if info.public_key != key.public_key_raw() {
            return Err(CertError::KeyMismatch {
                what: format!("{} and {}", PluginFiles::CA_CERT, PluginFiles::CA_KEY),
            });
        }
        let issuer = Issuer::from_ca_cert_der(&ca_cert, key)?;
        Ok(CertificateAuthority {
            issuer,
            chain,
            roots,
            info,
            trust_domain: trust_domain.to_string(),
            policy: SigningPolicy::default(),
        })
    }

    pub fn with_policy(mut self, policy: SigningPolicy) -> Self {
        self.policy = policy;
        self
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn not_after(&self) -> SystemTime {
        self.info.not_after
    }

    /// The PEM of every trusted root, for proxies' trust bundles.
    pub fn roots_pem(&self) -> String {
        pem::encode_certificates(&self.roots)
    }

    /// This CA as the four `cacerts` files.
    pub fn plugin_files(&self) -> PluginFiles {
        PluginFiles {
            ca_cert: pem::encode_certificates(self.chain.first()),
            ca_key: self.issuer.key().serialize_pem(),
            root_cert: self.roots_pem(),
            cert_chain: pem::encode_certificates(&self.chain),
        }
    }

    /// Signs a workload CSR. `authenticated` is who the caller proved to be
    /// (from its service-account token); the CSR may ask for that identity
    /// and nothing else. Returns PEM certificates, leaf first, root last.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        authenticated: &Identity,
        ttl: Option<Duration>,
    ) -> Result<Vec<String>> {
        self.sign_csr_at(csr_pem, authenticated, ttl, SystemTime::now())
    }

    /// As [`sign_csr`](Self::sign_csr), at a given time.
    pub fn sign_csr_at(
        &self,
        csr_pem: &str,
        authenticated: &Identity,
        ttl: Option<Duration>,
        now: SystemTime,
    ) -> Result<Vec<String>> {
        let ttl = self.resolve_ttl(ttl)?;
        self.sign_for(csr_pem, authenticated, ttl, now)
    }

    /// Signs a CSR made in this process for the control plane's own
    /// identity. The lifetime is the operator's (`--serving-cert-lifetime`),
    /// not bounded below like a workload's request, so that a test can
    /// rotate every few seconds; it is still capped by this CA's own expiry.
    pub fn sign_own_csr(
        &self,
        csr_pem: &str,
        identity: &Identity,
        ttl: Duration,
    ) -> Result<Vec<String>> {
        self.sign_for(csr_pem, identity, ttl, SystemTime::now())
    }

    fn sign_for(
        &self,
        csr_pem: &str,
        authenticated: &Identity,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<Vec<String>> {
        self.info.check_valid_at("signing CA", now)?;
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(csr_error)?;
        let requested = requested_identity(&csr)?;
        if requested.trust_domain != self.trust_domain {
            return Err(CertError::ForeignTrustDomain {
                requested: requested.to_string(),
                found: requested.trust_domain.clone(),
                expected: self.trust_domain.clone(),
            });
        }
        if &requested != authenticated {
            return Err(CertError::IdentityMismatch {
                requested: requested.to_string(),
                authenticated: authenticated.to_string(),
            });
        }

        // Only the public key is taken from the CSR. Everything else (SANs,
        // CA flag, key usages) is set here, so a crafted CSR cannot ask for
        // more than a workload certificate.
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.not_before = (now - BACKDATE).max(self.info.not_before).into();
        params.not_after = (now + ttl).min(self.info.not_after).into();
        params.serial_number = Some(random_serial());
        params.subject_alt_names = vec![SanType::URI(
            requested
                .uri()
                .try_into()
                .map_err(|_| CertError::NotSpiffe(requested.uri()))?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&csr.public_key, &self.issuer)?;

        let mut out = vec![leaf.pem()];
        out.extend(self.chain.iter().map(|c| pem::encode_certificates([c])));
        Ok(out)
    }

    /// Issues an ordinary TLS serving certificate for DNS names and IP
    /// addresses (API servers, the injection webhook), which clients check by
    /// hostname rather than by SPIFFE ID. Returns the PEM chain (leaf first,
    /// root last) and the PEM private key.
    pub fn issue_serving(
        &self,
        dns_names: &[&str],
        ips: &[std::net::IpAddr],
        ttl: Duration,
    ) -> Result<(String, String)> {
        let now = SystemTime::now();
        self.info.check_valid_at("signing CA", now)?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        if let Some(first) = dns_names.first() {
            params.distinguished_name.push(DnType::CommonName, *first);
        }
        params.not_before = (now - BACKDATE).max(self.info.not_before).into();
        params.not_after = (now + ttl).min(self.info.not_after).into();
        params.serial_number = Some(random_serial());
        for name in dns_names {
            let invalid = || CertError::InvalidDnsName(name.to_string());
            rustls_pki_types::DnsName::try_from(*name).map_err(|_| invalid())?;
            params
                .subject_alt_names
                .push(SanType::DnsName((*name).try_into().map_err(|_| invalid())?));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&key, &self.issuer)?;
        let mut chain = leaf.pem();
        chain.push_str(&pem::encode_certificates(&self.chain));
        Ok((chain, key.serialize_pem()))
    }

    fn resolve_ttl(&self, requested: Option<Duration>) -> Result<Duration> {
        let ttl = requested.unwrap_or(self.policy.default_ttl);
        if ttl < MIN_WORKLOAD_TTL {
            return Err(CertError::BadLifetime {
                requested_secs: ttl.as_secs(),
                reason: format!("shorter than the minimum {}s", MIN_WORKLOAD_TTL.as_secs()),
            });
        }
        // A longer request is capped rather than refused: the workload still
        // gets a certificate and simply rotates sooner than it asked.
        Ok(ttl.min(self.policy.max_ttl))
    }
}

fn requested_identity(csr: &CertificateSigningRequestParams) -> Result<Identity> {
    let sans = &csr.params.subject_alt_names;
    let describe = || {
        sans.iter()
            .map(|s| format!("{s:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    match sans.as_slice() {
        [SanType::URI(uri)] => uri.as_str().parse::<Identity>(),
        [] => Err(CertError::CsrSans("none".into())),
        [_] => Err(CertError::NotSpiffe(describe())),
        _ => Err(CertError::CsrSans(describe())),
    }
}

fn csr_error(err: rcgen::Error) -> CertError {
    match err {
        rcgen::Error::InvalidCertificationRequestSignature => CertError::CsrSignature,
        rcgen::Error::CouldNotParseCertificationRequest => {
            CertError::BadCsr("not a PEM PKCS#10 certificate request".into())
        }
        rcgen::Error::UnsupportedExtension => {
            CertError::BadCsr("requests an extension this CA does not grant".into())
        }
        other => CertError::BadCsr(other.to_string()),
    }
}

fn ca_cert_params(params: &CaParams, cluster_id: Option<&str>) -> Result<CertificateParams> {
    if params.not_after <= params.not_before {
        return Err(CertError::BadLifetime {
            requested_secs: 0,
            reason: "not_after must be later than not_before".into(),
        });
    }
    let mut cert = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "weft");
    if let Some(cluster) = cluster_id {
        name.push(DnType::OrganizationalUnitName, cluster);
    }
    name.push(DnType::CommonName, params.common_name.as_str());
    cert.distinguished_name = name;
    cert.not_before = params.not_before.into();
    cert.not_after = params.not_after.into();
    cert.serial_number = Some(random_serial());
    cert.is_ca = IsCa::Ca(match cluster_id {
        Some(_) => BasicConstraints::Constrained(0),
        None => BasicConstraints::Unconstrained,
    });
    cert.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    cert.use_authority_key_identifier_extension = cluster_id.is_some();
    Ok(cert)
}

pub(crate) fn load_key_pair(what: &str, key_pem: &str) -> Result<KeyPair> {
    // Parse with pki-types first so that garbage gets the same clear error as
    // everywhere else, then hand the DER to rcgen.
    let der = pem::private_key(what, key_pem)?;
    KeyPair::try_from(&der).map_err(|e| CertError::BadKey {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

fn check_trust_domain(trust_domain: &str) -> Result<()> {
    Identity::new(trust_domain, "x", "x").map(|_| ())
}

fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // A positive INTEGER with no leading zero byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn secs_between(a: SystemTime, b: SystemTime) -> u64 {
    b.duration_since(a).unwrap_or_default().as_secs()
}
