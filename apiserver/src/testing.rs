//! Test support for anything that talks to a lab API server, written once:
//! waiting for a condition, and ServiceAccount tokens as the kubelet or a
//! remote secret would hold them. The tests of every crate above use it.

use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};

/// How long a test waits for something that should happen.
pub const WAIT: Duration = Duration::from_secs(20);

/// Polls `check` every 20 ms until it holds, failing the test after
/// `WAIT` with `what` it was waiting for.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// A token for `namespace/service_account` valid for `seconds`, bound to
/// `audience` (none: the API server's own).
pub async fn token(
    client: &kube::Client,
    namespace: &str,
    service_account: &str,
    audience: Option<&str>,
    seconds: i64,
) -> kube::Result<String> {
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audience.into_iter().map(String::from).collect(),
            expiration_seconds: Some(seconds),
            ..Default::default()
        },
        ..Default::default()
    };
    let issued = Api::<ServiceAccount>::namespaced(client.clone(), namespace)
        .create_token_request(service_account, &PostParams::default(), &request)
        .await?;
    Ok(issued.status.map(|s| s.token).unwrap_or_default())
}

/// An HTTP/1.1 connection over TLS to `addr`, trusting the roots in
/// `roots_pem` for `server_name`: for raw requests whose status codes and
/// bodies a typed client would hide. Panics on failure, as a test would.
pub async fn http1_over_tls(
    addr: std::net::SocketAddr,
    roots_pem: &str,
    server_name: &str,
) -> hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in weft_certs::pem::certificates("roots", roots_pem).expect("PEM roots") {
        roots.add(cert).expect("a root certificate");
    }
    let tls = rustls::ClientConfig::builder_with_provider(weft_certs::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls_pki_types::ServerName::try_from(server_name.to_string()).expect("a name");
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .expect("HTTP/1.1 handshake");
    tokio::spawn(connection);
    sender
}

/// One plain HTTP/1.1 request without a body to `addr`, on a connection
/// of its own; the whole answer as text (status line, headers, body),
/// within `WAIT`. For the small local ports tests look at (admin,
/// monitoring).
pub async fn http1(addr: std::net::SocketAddr, method: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        );
        tcp.write_all(head.as_bytes()).await?;
        let mut answer = String::new();
        tcp.read_to_string(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    match tokio::time::timeout(WAIT, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(err)) => panic!("{method} {path} on {addr}: {err}"),
        Err(_) => panic!("{method} {path} on {addr}: no answer within {WAIT:?}"),
    }
}
