//! rustls configurations for mesh mTLS that check SPIFFE identities instead of
//! DNS names, with hot-swappable certificates and trust bundles.
//!
//! A workload certificate carries only a SPIFFE URI SAN, which rustls's default
//! server-name check would refuse. The verifiers here check the chain against
//! the trust bundle with webpki, then the identity: on the client side the
//! server's SPIFFE ID must be one the caller expected (from the Workload
//! resource); on the server side the client must present a SPIFFE ID, which is
//! exposed to the caller for authorization.

use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error as TlsError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::error::Result;
use crate::identity::Identity;
use crate::pem;
use crate::workload::WorkloadCert;
use crate::x509::CertInfo;

/// The one crypto provider weft uses. Configs are built with it explicitly, so
/// nothing depends on a process-wide default being installed.
static PROVIDER: LazyLock<Arc<CryptoProvider>> =
    LazyLock::new(|| Arc::new(rustls::crypto::ring::default_provider()));

pub fn provider() -> Arc<CryptoProvider> {
    PROVIDER.clone()
}

/// ALPN for the mesh transport: HTTP/2 between sidecars.
pub const MESH_ALPN: &[u8] = b"h2";
/// ALPN for an HTTP/1.1 link between sidecars: one HTTP/1.1 exchange at
/// a time, for the small requests an HTTP/1.1 app makes (see
/// `weft-proxy`'s `h1_link`). A sidecar that does not offer it answers
/// with HTTP/2.
pub const LINK_H1_ALPN: &[u8] = b"http/1.1";

/// The roots the mesh trusts. Cloning shares it; [`TrustBundle::replace`] takes
/// effect for the next handshake of every config built from it.
#[derive(Clone)]
pub struct TrustBundle {
    roots: Arc<ArcSwap<RootCertStore>>,
}

impl fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustBundle({} roots)", self.roots.load().len())
    }
}

impl TrustBundle {
    /// A bundle from PEM text holding one or more root certificates.
    pub fn from_pem(pem_text: &str) -> Result<Self> {
        let roots = Arc::new(ArcSwap::from_pointee(root_store(pem_text)?));
        Ok(TrustBundle { roots })
    }

    /// Replaces the roots (root rotation: publish old and new together, then
    /// the new alone once every workload has a certificate from it).
    pub fn replace(&self, pem_text: &str) -> Result<()> {
        root_store(pem_text).map(|roots| self.roots.store(Arc::new(roots)))
    }

    pub fn len(&self) -> usize {
        self.roots.load().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Verifies a presented chain against the current roots for the given
    /// key usage, mapping webpki's verdicts to rustls's certificate errors.
    fn verify_chain(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<(), TlsError> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        let roots = self.roots.load();
        cert.verify_for_usage(
            algorithms().all,
            &roots.roots,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map(|_| ())
        .map_err(pki_error)
    }
}

fn root_store(pem_text: &str) -> Result<RootCertStore> {
    let mut store = RootCertStore::empty();
    for der in pem::certificates("trust bundle", pem_text)? {
        store.add(der)?;
    }
    Ok(store)
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    PROVIDER.signature_verification_algorithms
}

fn pki_error(err: webpki::Error) -> TlsError {
    use webpki::Error as E;
    TlsError::InvalidCertificate(match err {
        E::BadDer | E::BadDerTime => CertificateError::BadEncoding,
        E::CertExpired { .. } => CertificateError::Expired,
        E::CertNotValidYet { .. } => CertificateError::NotValidYet,
        E::UnknownIssuer => CertificateError::UnknownIssuer,
        E::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    })
}

/// This workload's current certificate, shared by every config built from it.
/// [`CertStore::rotate`] makes new handshakes use a new certificate; connections
/// already established keep the one they negotiated.
#[derive(Clone)]
pub struct CertStore {
    current: Arc<ArcSwap<Current>>,
}

struct Current {
    key: Arc<CertifiedKey>,
    cert: WorkloadCert,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertStore({:?})", self.current.load().cert)
    }
}

impl CertStore {
    pub fn new(cert: &WorkloadCert) -> Result<Self> {
        Ok(CertStore {
            current: Arc::new(ArcSwap::from_pointee(current(cert)?)),
        })
    }

    pub fn rotate(&self, cert: &WorkloadCert) -> Result<()> {
        self.current.store(Arc::new(current(cert)?));
        Ok(())
    }

    pub fn certificate(&self) -> WorkloadCert {
        self.current.load().cert.clone()
    }

    fn certified_key(&self) -> Arc<CertifiedKey> {
        self.current.load().key.clone()
    }
}

fn current(cert: &WorkloadCert) -> Result<Current> {
    let key = CertifiedKey::from_der(cert.presented_chain(), cert.private_key(), &PROVIDER)?;
    Ok(Current {
        key: Arc::new(key),
        cert: cert.clone(),
    })
}

/// A DNS-named serving certificate that can be replaced while serving (the
/// control plane's webhook): handshakes after [`ServingCert::replace`] get
/// the new one, open connections keep theirs.
#[derive(Clone)]
pub struct ServingCert {
    current: Arc<ArcSwap<CertifiedKey>>,
}

impl fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ServingCert")
    }
}

impl ServingCert {
    /// From a PEM chain (leaf first) and its PEM private key.
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self> {
        Ok(ServingCert {
            current: Arc::new(ArcSwap::from_pointee(certified_key(chain_pem, key_pem)?)),
        })
    }

    pub fn replace(&self, chain_pem: &str, key_pem: &str) -> Result<()> {
        self.current
            .store(Arc::new(certified_key(chain_pem, key_pem)?));
        Ok(())
    }

    /// A TLS 1.3 server config without client authentication (the API
    /// server calls webhooks without a client certificate) that always
    /// presents the current certificate.
    pub fn server_config(&self, alpn: &[&[u8]]) -> Result<Arc<ServerConfig>> {
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(self.clone()));
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(config))
    }
}

impl rustls::server::ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn certified_key(chain_pem: &str, key_pem: &str) -> Result<CertifiedKey> {
    Ok(CertifiedKey::from_der(
        pem::certificates("serving certificate", chain_pem)?,
        pem::private_key("serving key", key_pem)?,
        &PROVIDER,
    )?)
}

impl fmt::Debug for Resolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

struct Resolver(CertStore);

impl rustls::server::ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.certified_key())
    }
}

impl rustls::client::ResolvesClientCert for Resolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.certified_key())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Builds the server side of mesh mTLS: a client certificate chaining to the
/// bundle and carrying a SPIFFE ID is required. Read the caller's identity
/// with [`peer_identity`] after the handshake.
pub fn server_config(certs: &CertStore, bundle: &TrustBundle) -> Result<Arc<ServerConfig>> {
    server_config_with(certs, bundle, true)
}

/// As [`server_config`], but a client may also connect without a
/// certificate (and then has no identity). For the control plane's port,
/// where a proxy asks the CA for its first certificate before it has one.
/// A certificate that is presented is verified in full.
pub fn server_config_optional_client(
    certs: &CertStore,
    bundle: &TrustBundle,
) -> Result<Arc<ServerConfig>> {
    server_config_with(certs, bundle, false)
}

fn server_config_with(
    certs: &CertStore,
    bundle: &TrustBundle,
    mandatory: bool,
) -> Result<Arc<ServerConfig>> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(SpiffeClientVerifier {
            bundle: bundle.clone(),
            mandatory,
        }))
        .with_cert_resolver(Arc::new(Resolver(certs.clone())));
    config.alpn_protocols = vec![MESH_ALPN.to_vec()];
    // A resumed session skips certificate verification, so a root dropped
    // from the bundle, or a peer's changed identity, would go unnoticed until
    // the session expired. Mesh connections are pooled and long-lived, so full
    // handshakes are rare enough to always pay for.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// As [`server_config`], for a sidecar's mesh port: HTTP/1.1 links are
/// taken when a client offers them, HTTP/2 otherwise.
pub fn link_server_config(certs: &CertStore, bundle: &TrustBundle) -> Result<Arc<ServerConfig>> {
    let mut config = Arc::unwrap_or_clone(server_config(certs, bundle)?);
    config.alpn_protocols = vec![LINK_H1_ALPN.to_vec(), MESH_ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// As [`client_config`], offering an HTTP/1.1 link first and HTTP/2
/// after it, so that a peer sidecar without HTTP/1.1 links still answers.
pub fn link_h1_client_config(
    certs: &CertStore,
    bundle: &TrustBundle,
    expected: Vec<Identity>,
) -> Result<Arc<ClientConfig>> {
    let mut config = Arc::unwrap_or_clone(client_config(certs, bundle, expected)?);
    config.alpn_protocols = vec![LINK_H1_ALPN.to_vec(), MESH_ALPN.to_vec()];
    Ok(Arc::new(config))
}

/// Builds the client side of mesh mTLS for one destination: the server must
/// chain to the bundle and present one of the `expected` identities.
/// Building a config is cheap (the certificate and roots are shared), so the
/// proxy makes one per destination identity and caches it.
pub fn client_config(
    certs: &CertStore,
    bundle: &TrustBundle,
    expected: Vec<Identity>,
) -> Result<Arc<ClientConfig>> {
    let resolver = Arc::new(Resolver(certs.clone()));
    let config = verifying(bundle, expected)?.with_client_cert_resolver(resolver);
    Ok(mesh_client(config))
}

/// A client config with no certificate of its own, for the one call a
/// workload makes before it has one: asking the control plane's CA. The
/// server is still verified, chain and identity.
pub fn client_config_without_certificate(
    bundle: &TrustBundle,
    expected: Vec<Identity>,
) -> Result<Arc<ClientConfig>> {
    Ok(mesh_client(
        verifying(bundle, expected)?.with_no_client_auth(),
    ))
}

/// TLS 1.3 with a server that must chain to `bundle` and prove one of
/// the `expected` identities.
fn verifying(
    bundle: &TrustBundle,
    expected: Vec<Identity>,
) -> Result<rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>> {
    let verifier = Arc::new(SpiffeServerVerifier {
        bundle: bundle.clone(),
        expected,
    });
    Ok(ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier))
}

/// What every mesh client config says: HTTP/2, no SNI (it would only leak
/// an address; the identity check replaces it), and no resumption (see
/// server_config: every connection verifies the peer in full).
fn mesh_client(mut config: ClientConfig) -> Arc<ClientConfig> {
    config.alpn_protocols = vec![MESH_ALPN.to_vec()];
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// The SPIFFE identity in a peer's end-entity certificate.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<Identity> {
    let leaf = certs?.first()?;
    CertInfo::parse("peer certificate", leaf).ok()?.identity()
}

/// A server name for `connect` calls. The verifiers ignore it; the identity is
/// what is checked.
pub fn mesh_server_name(addr: std::net::IpAddr) -> ServerName<'static> {
    ServerName::IpAddress(addr.into())
}

fn identity_of(end_entity: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    CertInfo::parse("peer certificate", end_entity)
        .ok()
        .and_then(|info| info.identity())
        .ok_or_else(|| {
            TlsError::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(
                NoSpiffeId,
            ))))
        })
}

#[derive(Debug)]
struct NoSpiffeId;

impl fmt::Display for NoSpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("peer certificate carries no single SPIFFE ID")
    }
}

impl std::error::Error for NoSpiffeId {}

/// The server presented a valid chain but the wrong workload identity.
#[derive(Debug)]
pub struct UnexpectedIdentity {
    pub presented: Identity,
    pub expected: Vec<Identity>,
}

impl fmt::Display for UnexpectedIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let expected: Vec<String> = self.expected.iter().map(|i| i.to_string()).collect();
        write!(
            f,
            "server presented {}, expected {}",
            self.presented,
            expected.join(" or ")
        )
    }
}

impl std::error::Error for UnexpectedIdentity {}

/// Handshake signatures are checked the same way whichever side is
/// verified: with the ring provider's algorithms.
macro_rules! handshake_signatures {
    ($($check:ident),+) => {
        $(
            fn $check(
                &self,
                message: &[u8],
                cert: &CertificateDer<'_>,
                dss: &DigitallySignedStruct,
            ) -> Result<HandshakeSignatureValid, TlsError> {
                rustls::crypto::$check(message, cert, dss, &algorithms())
            }
        )+
    };
    () => {
        handshake_signatures!(verify_tls12_signature, verify_tls13_signature);

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            algorithms().supported_schemes()
        }
    };
}

#[derive(Debug)]
struct SpiffeServerVerifier {
    bundle: TrustBundle,
    expected: Vec<Identity>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, TlsError> {
        let usage = webpki::KeyUsage::server_auth();
        self.bundle
            .verify_chain(end_entity, intermediates, now, usage)?;
        let presented = identity_of(end_entity)?;
        if !self.expected.contains(&presented) {
            return Err(TlsError::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(UnexpectedIdentity {
                    presented,
                    expected: self.expected.clone(),
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    handshake_signatures!();
}

#[derive(Debug)]
struct SpiffeClientVerifier {
    bundle: TrustBundle,
    mandatory: bool,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional; workloads have exactly one certificate anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, TlsError> {
        let usage = webpki::KeyUsage::client_auth();
        self.bundle
            .verify_chain(end_entity, intermediates, now, usage)?;
        identity_of(end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    handshake_signatures!();
}

/// `SystemTime` to the time type webpki wants, for tests and tools that check
/// a chain at a chosen moment.
pub fn unix_time(t: SystemTime) -> UnixTime {
    UnixTime::since_unix_epoch(t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default())
}
