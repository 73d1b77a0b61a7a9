//! Mutual TLS between workloads over real TCP on loopback, with the configs
//! from `weft_certs::tls`, and a cross-check of the certificates with the
//! `openssl` command.

use std::ffi::OsStr;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use weft_certs::tls::{self, CertStore, TrustBundle};
use weft_certs::{
    CaParams, CertificateAuthority, Identity, WorkloadCert, WorkloadKey, issue_workload,
};

const TD: &str = "cluster.local";
const DAY: Duration = Duration::from_secs(24 * 3600);
const STEP: Duration = Duration::from_secs(10);

fn root() -> CertificateAuthority {
    named_root("root")
}

fn named_root(name: &str) -> CertificateAuthority {
    CertificateAuthority::generate_root(TD, &CaParams::valid_for(name, 3650 * DAY)).unwrap()
}

/// What webpki reports for a chain that does not reach a trusted root: no root
/// of that name, or (when two roots share a name) a root whose key did not
/// sign it.
fn untrusted(err: &str) -> bool {
    err.contains("UnknownIssuer") || err.contains("BadSignature")
}

fn intermediate(root: &CertificateAuthority, cluster: &str) -> CertificateAuthority {
    root.generate_intermediate(cluster, &CaParams::valid_for(cluster, 365 * DAY))
        .unwrap()
}

fn id(sa: &str) -> Identity {
    Identity::new(TD, "demo", sa).unwrap()
}

/// One workload's TLS material.
struct Side {
    certs: CertStore,
    bundle: TrustBundle,
}

fn side(ca: &CertificateAuthority, bundle_pem: &str, identity: &Identity) -> Side {
    let cert = issue_workload(ca, identity, None).unwrap();
    Side {
        certs: CertStore::new(&cert).unwrap(),
        bundle: TrustBundle::from_pem(bundle_pem).unwrap(),
    }
}

impl Side {
    fn server(&self) -> Arc<rustls::ServerConfig> {
        tls::server_config(&self.certs, &self.bundle).unwrap()
    }

    fn client(&self, expected: Vec<Identity>) -> Arc<rustls::ClientConfig> {
        tls::client_config(&self.certs, &self.bundle, expected).unwrap()
    }
}

type ServerResult = Result<Option<Identity>, String>;

/// A server that accepts one connection, echoes four bytes, and reports the
/// client's identity, or the handshake error.
async fn serve_once(
    config: Arc<rustls::ServerConfig>,
) -> (SocketAddr, tokio::task::JoinHandle<ServerResult>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.map_err(|e| e.to_string())?;
        let mut tls = TlsAcceptor::from(config)
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let peer = tls::peer_identity(tls.get_ref().1.peer_certificates());
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(&buf).await.map_err(|e| e.to_string())?;
        tls.flush().await.map_err(|e| e.to_string())?;
        Ok(peer)
    });
    (addr, task)
}

async fn connect(
    config: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    TlsConnector::from(config)
        .connect(tls::mesh_server_name(addr.ip()), tcp)
        .await
        .map_err(|e| e.to_string())
}

/// Connects, sends "ping", expects it back; returns the server's identity.
async fn ping(config: Arc<rustls::ClientConfig>, addr: SocketAddr) -> Result<Identity, String> {
    let mut tls = connect(config, addr).await?;
    let peer = tls::peer_identity(tls.get_ref().1.peer_certificates())
        .ok_or("server sent no SPIFFE identity")?;
    tls.write_all(b"ping").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 4];
    tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    assert_eq!(&buf, b"ping");
    Ok(peer)
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(STEP, f).await.expect("step timed out")
}

/// One connection from `client`, expecting the server to be echo, to a
/// server with `server`'s credentials: what each side saw.
async fn exchange(client: &Side, server: &Side) -> (Result<Identity, String>, ServerResult) {
    let (addr, task) = serve_once(server.server()).await;
    let seen = within(ping(client.client(vec![id("echo")]), addr)).await;
    (seen, server_result(task).await)
}

/// A connection the client refuses, saying `reason`; the server sees it fail.
async fn refused_by_client(client: &Side, server: &Side, reason: &str) {
    let (seen, served) = exchange(client, server).await;
    let err = seen.unwrap_err();
    assert!(err.contains(reason), "{err}");
    assert!(served.is_err());
}

/// A connection the server refuses; returns what the server said.
async fn refused_by_server(client: &Side, server: &Side) -> String {
    let (seen, served) = exchange(client, server).await;
    // In TLS 1.3 the client learns of the refusal only when it reads.
    assert!(seen.is_err());
    served.unwrap_err()
}

async fn server_result(task: tokio::task::JoinHandle<ServerResult>) -> ServerResult {
    within(task).await.expect("server task panicked")
}

#[tokio::test]
async fn workloads_under_two_intermediates_of_one_root_see_each_other() {
    let root = root();
    let client = side(&intermediate(&root, "c1"), &root.roots_pem(), &id("client"));
    let server = side(&intermediate(&root, "c2"), &root.roots_pem(), &id("echo"));

    let (seen, served) = exchange(&client, &server).await;
    let seen_by_client = seen.unwrap();
    assert_eq!(seen_by_client, id("echo"));
    assert_eq!(served.unwrap(), Some(id("client")));
}

#[tokio::test]
async fn a_server_from_another_root_is_refused() {
    let (trusted, foreign) = (named_root("trusted"), named_root("foreign"));
    let client = side(&trusted, &trusted.roots_pem(), &id("client"));
    let server = side(&foreign, &foreign.roots_pem(), &id("echo"));
    refused_by_client(&client, &server, "UnknownIssuer").await;
}

#[tokio::test]
async fn a_client_from_another_root_is_refused() {
    let (trusted, foreign) = (named_root("trusted"), named_root("foreign"));
    let client = side(&foreign, &trusted.roots_pem(), &id("client"));
    let server = side(&trusted, &trusted.roots_pem(), &id("echo"));
    let err = refused_by_server(&client, &server).await;
    assert!(err.contains("UnknownIssuer"), "{err}");

    // Two roots with the same name are still told apart by their keys.
    let twin = named_root("trusted");
    let client = side(&twin, &trusted.roots_pem(), &id("client"));
    let err = refused_by_server(&client, &server).await;
    assert!(untrusted(&err), "{err}");
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    // A CA valid since ten days ago, and a one-hour certificate it issued five
    // days ago: expired long since.
    let now = SystemTime::now();
    let ca = CertificateAuthority::generate_root(
        TD,
        &CaParams {
            common_name: "root".into(),
            not_before: now - 10 * DAY,
            not_after: now + 10 * DAY,
        },
    )
    .unwrap();
    let key = WorkloadKey::generate().unwrap();
    let chain = ca
        .sign_csr_at(
            &key.csr_pem(&id("echo")).unwrap(),
            &id("echo"),
            Some(Duration::from_secs(3600)),
            now - 5 * DAY,
        )
        .unwrap();
    let expired = WorkloadCert::from_pem(&chain, &key).unwrap();
    assert!(expired.not_after() < now);

    let server = Side {
        certs: CertStore::new(&expired).unwrap(),
        bundle: TrustBundle::from_pem(&ca.roots_pem()).unwrap(),
    };
    let client = side(&ca, &ca.roots_pem(), &id("client"));
    refused_by_client(&client, &server, "Expired").await;
}

#[tokio::test]
async fn a_client_expecting_a_refuses_a_server_presenting_b() {
    let root = root();
    let client = side(&root, &root.roots_pem(), &id("client"));
    let server = side(&root, &root.roots_pem(), &id("impostor"));
    let (addr, task) = serve_once(server.server()).await;
    let err = within(ping(client.client(vec![id("echo")]), addr))
        .await
        .unwrap_err();
    assert!(
        err.contains("UnexpectedIdentity") && err.contains("impostor"),
        "{err}"
    );
    assert!(server_result(task).await.is_err());

    // The same server is accepted by a client that allows a set including it.
    let (addr, task) = serve_once(server.server()).await;
    let allowed = client.client(vec![id("echo"), id("impostor")]);
    assert_eq!(within(ping(allowed, addr)).await.unwrap(), id("impostor"));
    server_result(task).await.unwrap();
}

#[tokio::test]
async fn rotation_changes_new_handshakes_and_leaves_open_connections_alone() {
    let root = root();
    let client = side(&root, &root.roots_pem(), &id("client"));
    let server = side(&root, &root.roots_pem(), &id("echo"));

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server.server());
    let server_task = tokio::spawn(async move {
        // Two connections, each echoing until the client closes.
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.unwrap();
            let tls = acceptor.accept(tcp).await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(tls);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });

    let config = client.client(vec![id("echo")]);
    let mut first = within(connect(config.clone(), addr)).await.unwrap();
    let first_leaf = first.get_ref().1.peer_certificates().unwrap()[0].clone();

    let before = server.certs.certificate();
    let after = issue_workload(&root, &id("echo"), None).unwrap();
    server.certs.rotate(&after).unwrap();

    let second = within(connect(config, addr)).await.unwrap();
    let second_leaf = second.get_ref().1.peer_certificates().unwrap()[0].clone();
    assert_eq!(first_leaf, before.full_chain()[0]);
    assert_eq!(second_leaf, after.full_chain()[0]);
    assert_ne!(first_leaf, second_leaf);

    // The connection made before the rotation still carries data.
    first.write_all(b"still").await.unwrap();
    let mut buf = [0u8; 5];
    within(first.read_exact(&mut buf)).await.unwrap();
    assert_eq!(&buf, b"still");
    within(server_task).await.unwrap();
}

#[tokio::test]
async fn a_bundle_with_two_roots_trusts_both_during_root_rotation() {
    let old_root = named_root("root-2025");
    let new_root = named_root("root-2026");
    let both = format!("{}{}", old_root.roots_pem(), new_root.roots_pem());
    let client = side(&old_root, &both, &id("client"));
    assert_eq!(client.bundle.len(), 2);
    let server = side(&new_root, &both, &id("echo"));
    let config = client.client(vec![id("echo")]);
    let server_config = server.server();

    let (addr, task) = serve_once(server_config.clone()).await;
    assert_eq!(
        within(ping(config.clone(), addr)).await.unwrap(),
        id("echo")
    );
    assert_eq!(server_result(task).await.unwrap(), Some(id("client")));

    // Dropping the old root from the server's bundle takes effect at the next
    // handshake of the same config: the old-root client is now refused.
    server.bundle.replace(&new_root.roots_pem()).unwrap();
    let (addr, task) = serve_once(server_config).await;
    assert!(within(ping(config, addr)).await.is_err());
    let err = server_result(task).await.unwrap_err();
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[tokio::test]
async fn a_truncated_handshake_fails_cleanly_and_the_server_keeps_serving() {
    let root = root();
    let server = side(&root, &root.roots_pem(), &id("echo"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(server.server());
    let server_task = tokio::spawn(async move {
        let mut results = Vec::new();
        for _ in 0..2 {
            let (tcp, _) = listener.accept().await.unwrap();
            let handshake = acceptor.accept(tcp).await;
            results.push(handshake.map(|_| ()).map_err(|e| e.to_string()));
        }
        results
    });

    // Half a TLS record header, then close.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(&[0x16, 0x03, 0x01, 0x02]).await.unwrap();
    drop(raw);

    let client = side(&root, &root.roots_pem(), &id("client"));
    within(connect(client.client(vec![id("echo")]), addr))
        .await
        .unwrap();

    let results = within(server_task).await.unwrap();
    assert!(results[0].is_err(), "truncated handshake must fail");
    assert!(results[1].is_ok(), "the next handshake must succeed");
}

fn openssl(args: &[&OsStr]) -> (bool, String) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The certificates must mean the same to other X.509 stacks: checked with the
/// `openssl` command where it is installed.
#[test]
fn openssl_verifies_the_chain_and_sees_the_spiffe_san() {
    if std::process::Command::new("openssl")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("SKIPPED: openssl is not installed; cannot cross-check certificates");
        return;
    }
    let root = root();
    let cert = issue_workload(&intermediate(&root, "c1"), &id("echo"), None).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: String| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let chain = cert.full_chain();
    let leaf = write(
        "leaf.pem",
        weft_certs::pem::encode_certificates(&chain[..1]),
    );
    let inter = write(
        "inter.pem",
        weft_certs::pem::encode_certificates(&chain[1..2]),
    );
    let root_pem = write("root.pem", root.roots_pem());

    for purpose in ["sslserver", "sslclient"] {
        let (ok, text) = openssl(&[
            "verify".as_ref(),
            "-purpose".as_ref(),
            purpose.as_ref(),
            "-CAfile".as_ref(),
            root_pem.as_os_str(),
            "-untrusted".as_ref(),
            inter.as_os_str(),
            leaf.as_os_str(),
        ]);
        assert!(
            ok && text.contains(": OK"),
            "openssl verify ({purpose}): {text}"
        );
    }
    let (ok, text) = openssl(&[
        "x509".as_ref(),
        "-noout".as_ref(),
        "-ext".as_ref(),
        "subjectAltName,basicConstraints".as_ref(),
        "-in".as_ref(),
        leaf.as_os_str(),
    ]);
    assert!(ok, "{text}");
    assert!(
        text.contains("URI:spiffe://cluster.local/ns/demo/sa/echo"),
        "{text}"
    );
    assert!(text.contains("CA:FALSE"), "{text}");
    assert!(!text.contains("DNS:"), "{text}");

    // A certificate from a foreign root does not verify against ours.
    let stranger = issue_workload(&named_root("stranger"), &id("echo"), None).unwrap();
    let stray = write("stray.pem", stranger.chain_pem());
    let (ok, text) = openssl(&[
        "verify".as_ref(),
        "-CAfile".as_ref(),
        root_pem.as_os_str(),
        stray.as_os_str(),
    ]);
    assert!(!ok, "a foreign certificate verified: {text}");
}
