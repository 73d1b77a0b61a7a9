//! The L4 data path across two sidecars, on loopback addresses of their
//! own: explicit-mode CONNECT on the client side, HBONE over mTLS between
//! sidecars, the server's app reached on its pod address, the caller's
//! identity seen by the server's sidecar; locality failover; and refusals.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_certs::tls::{CertStore, TrustBundle};
use weft_certs::{CaParams, CertificateAuthority, Identity, issue_workload};
use weft_proxy::balance::Here;
use weft_proxy::inbound;
use weft_proxy::local_app::{self, LocalApp};
use weft_proxy::outbound::{self, Outbound, serve_explicit};
use weft_proxy::pool::{CONNECT_TIMEOUT, HBONE_PORT, Pool};
use weft_proxy::state::Snapshot;
use weft_proxy::xds::XdsState;
use weft_xds_proto::mesh;
use weft_xds_proto::testing::{self, port};

const STEP: Duration = Duration::from_secs(10);

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "demo", sa).unwrap()
}

/// Loopback addresses private to this test run.
fn pod_ip(n: u8) -> IpAddr {
    let pid = std::process::id();
    IpAddr::from([127, 100 + (pid % 100) as u8, (pid / 100 % 250) as u8, n])
}

/// An app that says who it is, then echoes.
async fn echo_app(ip: IpAddr, name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind(SocketAddr::new(ip, 8080)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = conn.write_all(format!("{name}:").as_bytes()).await;
                let mut buf = [0u8; 1024];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// A server pod: its app and its sidecar's 15008.
async fn server_pod(
    ca: &CertificateAuthority,
    bundle: &TrustBundle,
    ip: IpAddr,
    name: &'static str,
    identity: &Identity,
) -> Arc<LocalApp> {
    echo_app(ip, name).await;
    server_sidecar(ca, bundle, ip, identity, None).await
}

/// A server pod's sidecar on 15008, with the mesh view `xds` when given.
async fn server_sidecar(
    ca: &CertificateAuthority,
    bundle: &TrustBundle,
    ip: IpAddr,
    identity: &Identity,
    xds: Option<Arc<XdsState>>,
) -> Arc<LocalApp> {
    let certs = CertStore::new(&issue_workload(ca, identity, None).unwrap()).unwrap();
    let config = local_app::Config {
        addresses: vec![ip],
        head_timeout: SLOW_HEAD_LIMIT,
        ..Default::default()
    };
    let inbound = Arc::new(LocalApp::new(
        config,
        xds,
        Arc::default(),
        Default::default(),
    ));
    let listener = TcpListener::bind(SocketAddr::new(ip, HBONE_PORT))
        .await
        .unwrap();
    tokio::spawn(inbound::serve(
        listener,
        certs,
        bundle.clone(),
        inbound.clone(),
    ));
    inbound
}

fn service() -> mesh::Service {
    let ports = vec![
        port(80, "tcp", mesh::AppProtocol::Tcp, 8080),
        port(81, "http", mesh::AppProtocol::Http, 8081),
        // No declared protocol: the client sidecar sniffs.
        port(82, "web", mesh::AppProtocol::Unspecified, 8081),
        port(90, "grpc", mesh::AppProtocol::Grpc, 9090),
        port(83, "quiet", mesh::AppProtocol::Tcp, 8083),
    ];
    mesh::Service {
        clusters: vec!["c1".into(), "c2".into()],
        ..testing::service("demo", "echo", [10, 96, 0, 10], ports)
    }
}

fn workload(
    uid: &str,
    ip: IpAddr,
    cluster: &str,
    zone: &str,
    sa: &str,
    healthy: bool,
) -> mesh::Workload {
    let IpAddr::V4(v4) = ip else { unreachable!() };
    let ports = [(80, 8080), (81, 8081), (82, 8081), (90, 9090), (83, 8083)];
    let binding = testing::binding("demo", "echo.demo.svc.cluster.local", &ports);
    let status = if healthy {
        mesh::WorkloadStatus::Healthy
    } else {
        mesh::WorkloadStatus::Unhealthy
    };
    mesh::Workload {
        cluster_id: cluster.into(),
        locality: Some(testing::locality("eu", zone)),
        status: status as i32,
        ..testing::workload(uid, v4.octets().to_vec(), sa, vec![binding])
    }
}

fn publish(xds: &XdsState, workloads: Vec<mesh::Workload>) {
    let snapshot = Snapshot::from_messages(&[service()], &workloads).expect("valid resources");
    xds.snapshot.store(Arc::new(snapshot));
}

/// Opens a CONNECT through the client sidecar; returns the HTTP status and
/// the stream.
async fn connect(proxy: SocketAddr, authority: &str) -> (u16, TcpStream) {
    let mut conn = TcpStream::connect(proxy).await.unwrap();
    conn.write_all(format!("CONNECT {authority} HTTP/1.1\r\nhost: {authority}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if tokio::time::timeout(STEP, conn.read(&mut byte))
            .await
            .unwrap()
            .unwrap()
            == 0
        {
            break;
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (code, conn)
}

/// Sends `message`, returns who answered and the echo.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(conn: &mut S, message: &str) -> String {
    conn.write_all(message.as_bytes()).await.unwrap();
    read_until(conn, message).await
}

/// Reads until what arrived ends with `end`.
async fn read_until<S: AsyncRead + Unpin>(conn: &mut S, message: &str) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 256];
    while !String::from_utf8_lossy(&out).ends_with(message) {
        let n = tokio::time::timeout(STEP, conn.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&out));
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

struct Mesh {
    ca: CertificateAuthority,
    bundle: TrustBundle,
    xds: Arc<XdsState>,
    outbound: Arc<Outbound>,
    proxy: SocketAddr,
}

/// The test sidecar's limit on the time to send a request head.
const SLOW_HEAD_LIMIT: Duration = Duration::from_millis(800);

/// Sends `head` (which never ends) a line every 100 ms until the proxy
/// closes the connection; returns how long that took, or `None` when it
/// was still open after 5 s.
async fn trickle<S: AsyncRead + AsyncWrite + Unpin>(mut conn: S, head: &str) -> Option<Duration> {
    let start = tokio::time::Instant::now();
    let mut lines = head
        .split_inclusive("\r\n")
        .map(String::from)
        .chain((0..).map(|i| format!("x-slow-{i}: still coming\r\n")));
    let mut buf = [0u8; 1024];
    while start.elapsed() < Duration::from_secs(5) {
        let line = lines.next().unwrap_or_default();
        if conn.write_all(line.as_bytes()).await.is_err() {
            return Some(start.elapsed());
        }
        match tokio::time::timeout(Duration::from_millis(100), conn.read(&mut buf)).await {
            // Closed, or answered (an error status) and then closed.
            Ok(Ok(0)) | Ok(Err(_)) => return Some(start.elapsed()),
            Ok(Ok(_)) | Err(_) => {}
        }
    }
    None
}

async fn client_sidecar(passthrough: bool) -> Mesh {
    let ca = CertificateAuthority::generate_root(
        "cluster.local",
        &CaParams::valid_for("root", Duration::from_secs(86400)),
    )
    .unwrap();
    let bundle = TrustBundle::from_pem(&ca.roots_pem()).unwrap();
    let certs = CertStore::new(&issue_workload(&ca, &id("client"), None).unwrap()).unwrap();
    let xds = Arc::new(XdsState::default());
    let config = outbound::Config {
        here: Here {
            cluster: "c1".into(),
            region: "eu".into(),
            zone: "a".into(),
        },
        passthrough,
        head_timeout: SLOW_HEAD_LIMIT,
        ..Default::default()
    };
    let pool = Pool::new(certs, bundle.clone(), CONNECT_TIMEOUT);
    let outbound = Arc::new(Outbound::new(
        config,
        xds.clone(),
        pool,
        Arc::default(),
        Default::default(),
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = listener.local_addr().unwrap();
    tokio::spawn(serve_explicit(listener, outbound.clone()));
    Mesh {
        ca,
        bundle,
        xds,
        outbound,
        proxy,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_through_two_sidecars_with_identity_and_locality_failover() {
    let mesh = client_sidecar(false).await;
    let (local_ip, remote_ip) = (pod_ip(2), pod_ip(3));
    let local = server_pod(&mesh.ca, &mesh.bundle, local_ip, "c1-echo", &id("echo")).await;
    let remote = server_pod(&mesh.ca, &mesh.bundle, remote_ip, "c2-echo", &id("echo")).await;
    publish(
        &mesh.xds,
        vec![
            workload("c1/demo/echo-1", local_ip, "c1", "a", "echo", true),
            workload("c2/demo/echo-1", remote_ip, "c2", "b", "echo", true),
        ],
    );

    // By hostname, short name and VIP: always the local cluster while healthy.
    for authority in [
        "echo.demo.svc.cluster.local:80",
        "echo.demo:80",
        "10.96.0.10:80",
    ] {
        let (code, mut conn) = connect(mesh.proxy, authority).await;
        assert_eq!(code, 200, "{authority}");
        assert_eq!(exchange(&mut conn, "hello").await, "c1-echo:hello");
    }
    assert_eq!(
        local
            .metrics()
            .calls_from("spiffe://cluster.local/ns/demo/sa/client"),
        3
    );
    assert_eq!(
        mesh.outbound.pool.connections(),
        1,
        "one pooled mTLS connection carries every tunnel"
    );

    // The local endpoint fails: traffic moves to the other cluster...
    publish(
        &mesh.xds,
        vec![
            workload("c1/demo/echo-1", local_ip, "c1", "a", "echo", false),
            workload("c2/demo/echo-1", remote_ip, "c2", "b", "echo", true),
        ],
    );
    let (_, mut conn) = connect(mesh.proxy, "echo.demo:80").await;
    assert_eq!(exchange(&mut conn, "x").await, "c2-echo:x");
    assert_eq!(
        remote
            .metrics()
            .calls_from("spiffe://cluster.local/ns/demo/sa/client"),
        1
    );
    // ...and comes back when it recovers.
    publish(
        &mesh.xds,
        vec![
            workload("c1/demo/echo-1", local_ip, "c1", "a", "echo", true),
            workload("c2/demo/echo-1", remote_ip, "c2", "b", "echo", true),
        ],
    );
    let (_, mut conn) = connect(mesh.proxy, "echo.demo:80").await;
    assert_eq!(exchange(&mut conn, "y").await, "c1-echo:y");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_clean() {
    let mesh = client_sidecar(false).await;
    let ip = pod_ip(4);
    server_pod(&mesh.ca, &mesh.bundle, ip, "echo", &id("echo")).await;

    // The Workload says "admin", the server proves "echo": refused.
    publish(
        &mesh.xds,
        vec![workload("c1/demo/echo-1", ip, "c1", "a", "admin", true)],
    );
    let (code, _) = connect(mesh.proxy, "echo.demo:80").await;
    assert_eq!(code, 502);

    // Unknown names, ports and (with passthrough off) outside addresses.
    publish(
        &mesh.xds,
        vec![workload("c1/demo/echo-1", ip, "c1", "a", "echo", true)],
    );
    assert_eq!(connect(mesh.proxy, "nope.demo:80").await.0, 404);
    assert_eq!(connect(mesh.proxy, "echo.demo:99").await.0, 404);
    assert_eq!(connect(mesh.proxy, "127.0.0.1:9").await.0, 404);

    // A tunnel to an address that is not the server pod's.
    let result = mesh
        .outbound
        .pool
        .tunnel(
            SocketAddr::new(ip, HBONE_PORT),
            &id("echo"),
            "127.0.0.1:22".parse().unwrap(),
            None,
            bytes::Bytes::from_static(b"early"),
        )
        .await;
    let refused = result.unwrap_err();
    assert!(refused.to_string().contains("403"), "{refused}");
    // Refused: the early bytes reached no app, so another endpoint may
    // be tried with them.
    assert!(!refused.sent);

    // Plaintext to 15008: no HTTP answer, the connection just ends.
    let mut plain = TcpStream::connect(SocketAddr::new(ip, HBONE_PORT))
        .await
        .unwrap();
    plain
        .write_all(b"CONNECT 127.0.0.1:8080 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(STEP, plain.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert!(
        !String::from_utf8_lossy(&buf[..n]).contains("200"),
        "plaintext got through"
    );

    // Garbage and an endless header on the outbound listener.
    let mut garbage = TcpStream::connect(mesh.proxy).await.unwrap();
    garbage
        .write_all(b"\x16\x03\x01 not http at all\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(STEP, garbage.read_to_end(&mut out))
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 501")
            || String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"),
        "{out:?}"
    );
    let mut endless = TcpStream::connect(mesh.proxy).await.unwrap();
    let _ = endless.write_all(&vec![b'a'; 16 * 1024]).await;
    let mut out = Vec::new();
    let closed = tokio::time::timeout(STEP, endless.read_to_end(&mut out)).await;
    assert!(closed.is_ok(), "an oversized head must end the connection");

    // The sidecar still works after all that.
    let (code, mut conn) = connect(mesh.proxy, "echo.demo:80").await;
    assert_eq!(code, 200);
    assert_eq!(exchange(&mut conn, "still").await, "echo:still");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_reaches_addresses_outside_the_mesh() {
    let mesh = client_sidecar(true).await;
    let outside = pod_ip(5);
    let addr = echo_app(outside, "outside").await;
    publish(&mesh.xds, vec![]);
    let (code, mut conn) = connect(mesh.proxy, &addr.to_string()).await;
    assert_eq!(code, 200);
    assert_eq!(exchange(&mut conn, "hi").await, "outside:hi");
}

// ---- L7: HTTP/1.1, HTTP/2 and gRPC through two sidecars ----

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

/// An HTTP app (HTTP/1.1 and HTTP/2) on `ip:8081` that says who it is, the
/// version it was spoken to in, and the caller identity its sidecar
/// reported; POST bodies are echoed. `/fail/<name>` fails on that app only.
async fn http_app(ip: IpAddr, name: &'static str) {
    let listener = TcpListener::bind(SocketAddr::new(ip, 8081)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |mut request: http::Request<hyper::body::Incoming>| async move {
                        if request.uri().path() == "/upgrade" {
                            return Ok(upgraded_echo(name, &mut request));
                        }
                        let failing = request.uri().path() == format!("/fail/{name}");
                        if request.uri().path() == "/slow" {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                        }
                        let identity = request
                            .headers()
                            .get("x-weft-peer-identity")
                            .map(|v| v.to_str().unwrap_or("?").to_string())
                            .unwrap_or_else(|| "-".into());
                        let version = format!("{:?}", request.version());
                        let body = request.into_body().collect().await?.to_bytes();
                        let text = format!(
                            "{name} {version} {identity} {}",
                            String::from_utf8_lossy(&body)
                        );
                        let mut response = http::Response::new(Full::new(Bytes::from(text)));
                        if failing {
                            *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
                        }
                        Ok::<_, hyper::Error>(response)
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(conn), service)
                    .await;
            });
        }
    });
}

/// Answers an upgrade to `websocket` with 101, then, on the switched
/// connection, says the app's name and the caller identity its sidecar
/// reported, and echoes what it reads. Anything else asking to upgrade is
/// refused with 426.
fn upgraded_echo(
    name: &'static str,
    request: &mut http::Request<hyper::body::Incoming>,
) -> http::Response<Full<Bytes>> {
    let mut response = http::Response::new(Full::default());
    if request.headers().get("upgrade").map(|v| v.as_bytes()) != Some(b"websocket") {
        *response.status_mut() = http::StatusCode::UPGRADE_REQUIRED;
        return response;
    }
    let identity = request
        .headers()
        .get_all("x-weft-peer-identity")
        .iter()
        .map(|v| v.to_str().unwrap_or("?"))
        .collect::<Vec<_>>()
        .join(",");
    let switched = hyper::upgrade::on(request);
    tokio::spawn(async move {
        let Ok(conn) = switched.await else { return };
        let mut conn = TokioIo::new(conn);
        let _ = conn
            .write_all(format!("{name} [{identity}] ready:").as_bytes())
            .await;
        let mut buf = [0u8; 256];
        while let Ok(n) = conn.read(&mut buf).await {
            if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    });
    *response.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert("upgrade", http::HeaderValue::from_static("websocket"));
    headers.insert("connection", http::HeaderValue::from_static("upgrade"));
    response
}

mod grpc {
    //! A gRPC app on `ip:9090`: the CA service's shape for unary calls and
    //! ADS's for a bidirectional stream, answering with the app's name and
    //! the caller identity its sidecar reported.
    use super::*;
    use std::pin::Pin;
    use tokio_stream::{Stream, StreamExt};
    use tonic::{Request, Response, Status, Streaming};
    use weft_xds_proto::ca::certificate_service_server::{
        CertificateService, CertificateServiceServer,
    };
    use weft_xds_proto::ca::{CreateCertificateRequest, CreateCertificateResponse};
    use weft_xds_proto::discovery::aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    };
    use weft_xds_proto::discovery::{
        DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    };

    #[derive(Clone)]
    pub struct App(pub &'static str);

    fn caller<T>(request: &Request<T>) -> String {
        request
            .metadata()
            .get("x-weft-peer-identity")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_string()
    }

    #[tonic::async_trait]
    impl CertificateService for App {
        async fn create_certificate(
            &self,
            request: Request<CreateCertificateRequest>,
        ) -> Result<Response<CreateCertificateResponse>, Status> {
            let who = caller(&request);
            Ok(Response::new(CreateCertificateResponse {
                cert_chain: vec![self.0.to_string(), who, request.into_inner().csr],
            }))
        }
    }

    type Responses<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

    #[tonic::async_trait]
    impl AggregatedDiscoveryService for App {
        async fn delta_aggregated_resources(
            &self,
            request: Request<Streaming<DeltaDiscoveryRequest>>,
        ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
            let (name, who) = (self.0, caller(&request));
            let replies = request.into_inner().map(move |item| {
                item.map(|r| DeltaDiscoveryResponse {
                    type_url: r.type_url,
                    nonce: format!("{name} {who}"),
                    ..Default::default()
                })
            });
            Ok(Response::new(Box::pin(replies)))
        }

        async fn stream_aggregated_resources(
            &self,
            _: Request<Streaming<DiscoveryRequest>>,
        ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
            Err(Status::unimplemented("not in this test"))
        }

        type DeltaAggregatedResourcesStream = Responses<DeltaDiscoveryResponse>;
        type StreamAggregatedResourcesStream = Responses<DiscoveryResponse>;
    }

    pub async fn serve(ip: IpAddr, name: &'static str) {
        let listener = TcpListener::bind(SocketAddr::new(ip, 9090)).await.unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(CertificateServiceServer::new(App(name)))
                .add_service(AggregatedDiscoveryServiceServer::new(App(name)))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
    }

    /// A gRPC channel whose connections are CONNECT tunnels through the
    /// client sidecar's explicit-mode listener.
    pub async fn channel(proxy: SocketAddr, authority: &'static str) -> tonic::transport::Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{authority}"))
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: http::Uri| async move {
                let (code, conn) = connect(proxy, authority).await;
                if code != 200 {
                    return Err(std::io::Error::other(format!("CONNECT answered {code}")));
                }
                Ok::<_, std::io::Error>(TokioIo::new(conn))
            }))
            .await
            .unwrap()
    }
}

/// Two server pods, each with HTTP and gRPC apps behind its sidecar.
async fn l7_pods(mesh: &Mesh, first: (u8, &'static str), second: (u8, &'static str)) {
    for (n, name) in [first, second] {
        let ip = pod_ip(n);
        server_pod(&mesh.ca, &mesh.bundle, ip, name, &id("echo")).await;
        http_app(ip, name).await;
        grpc::serve(ip, name).await;
    }
}

/// One healthy endpoint in c1, zone a, at `pod_ip(n)`.
fn publish_one(mesh: &Mesh, uid: &str, n: u8) {
    publish(
        &mesh.xds,
        vec![workload(uid, pod_ip(n), "c1", "a", "echo", true)],
    );
}

type H1 = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// An HTTP/1.1 connection through a CONNECT to `authority`.
async fn http1_via_connect(proxy: SocketAddr, authority: &str) -> H1 {
    let (code, conn) = connect(proxy, authority).await;
    assert_eq!(code, 200, "CONNECT {authority}");
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
        .await
        .unwrap();
    tokio::spawn(connection);
    sender
}

async fn send(sender: &mut H1, request: http::Request<Full<Bytes>>) -> (u16, String) {
    let (status, _, body) = send_full(sender, request).await;
    (status, body)
}

fn get(path: &str, host: &str) -> http::Request<Full<Bytes>> {
    http::Request::get(path)
        .header("host", host)
        .body(Full::default())
        .unwrap()
}

const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_http2_and_grpc_through_two_sidecars() {
    let mesh = client_sidecar(false).await;
    l7_pods(&mesh, (10, "echo-a"), (11, "echo-b")).await;
    publish(
        &mesh.xds,
        vec![
            workload("c1/demo/echo-a", pod_ip(10), "c1", "a", "echo", true),
            workload("c1/demo/echo-b", pod_ip(11), "c1", "a", "echo", true),
        ],
    );

    // HTTP/1.1 on a port declared `http`: one keep-alive connection from
    // the app, balanced per request over both endpoints, HTTP/1.1 restored
    // at the far side, and the caller's identity attached there; a
    // forged identity header is replaced.
    let mut h1 = http1_via_connect(mesh.proxy, "echo.demo:81").await;
    let mut served = std::collections::BTreeSet::new();
    for n in 0..20 {
        let request = http::Request::post("/")
            .header("host", "echo.demo:81")
            .header(
                "x-weft-peer-identity",
                "spiffe://cluster.local/ns/demo/sa/admin",
            )
            .body(Full::new(Bytes::from(format!("n={n}"))))
            .unwrap();
        let (status, body) = send(&mut h1, request).await;
        assert_eq!(status, 200, "{body}");
        let words: Vec<&str> = body.split(' ').collect();
        assert_eq!(
            words[1..],
            ["HTTP/1.1", CLIENT, &format!("n={n}")],
            "{body}"
        );
        served.insert(words[0].to_string());
    }
    assert_eq!(served.len(), 2, "per-request balancing reached {served:?}");

    // HTTP/2 with prior knowledge on a port that declares nothing: sniffed.
    let (code, conn) = connect(mesh.proxy, "echo.demo:82").await;
    assert_eq!(code, 200);
    let (mut h2, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(conn))
            .await
            .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get("http://echo.demo:82/")
        .body(Full::<Bytes>::default())
        .unwrap();
    let response = h2.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains(&format!(" HTTP/2.0 {CLIENT} ")), "{body}");
    // HTTP/1.1 on the same undeclared port is sniffed as HTTP/1.1.
    let mut h1 = http1_via_connect(mesh.proxy, "echo.demo:82").await;
    let (status, body) = send(&mut h1, get("/", "echo.demo:82")).await;
    assert_eq!(status, 200);
    assert!(body.contains(&format!(" HTTP/1.1 {CLIENT} ")), "{body}");

    // Absolute-form requests to the explicit proxy, routed by their URI.
    let conn = TcpStream::connect(mesh.proxy).await.unwrap();
    let (mut proxied, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
        .await
        .unwrap();
    tokio::spawn(connection);
    let (status, body) = send(
        &mut proxied,
        get(
            "http://echo.demo.svc.cluster.local:81/",
            "echo.demo.svc.cluster.local:81",
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(CLIENT), "{body}");
    let (status, body) = send(&mut proxied, get("http://nope.demo:81/", "nope.demo:81")).await;
    assert_eq!(status, 503, "an unknown host is the proxy's answer: {body}");

    // gRPC: unary and a bidirectional stream, over one channel.
    let channel = grpc::channel(mesh.proxy, "echo.demo:90").await;
    let mut ca = weft_xds_proto::ca::certificate_service_client::CertificateServiceClient::new(
        channel.clone(),
    );
    let reply = ca
        .create_certificate(weft_xds_proto::ca::CreateCertificateRequest {
            csr: "ping".into(),
            validity_seconds: 1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.cert_chain[1..], [CLIENT, "ping"]);
    assert!(reply.cert_chain[0].starts_with("echo-"));

    let mut ads = weft_xds_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = ads
        .delta_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for n in 0..3 {
        tx.send(weft_xds_proto::discovery::DeltaDiscoveryRequest {
            type_url: format!("message-{n}"),
            ..Default::default()
        })
        .await
        .unwrap();
        let reply = tokio::time::timeout(STEP, replies.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(reply.type_url, format!("message-{n}"));
        assert!(reply.nonce.ends_with(CLIENT), "{}", reply.nonce);
    }
    drop(tx);
    assert!(
        tokio::time::timeout(STEP, replies.message())
            .await
            .unwrap()
            .unwrap()
            .is_none(),
        "the stream ends cleanly when the client ends it"
    );

    // Each request was counted with its peers and code.
    let stats = mesh.outbound.metrics.encode();
    assert!(
        stats.contains("weft_proxy_requests_total{reporter=\"source\"")
            && stats.contains("destination_service=\"echo.demo.svc.cluster.local\"")
            && stats.contains("response_code=\"200\""),
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_endpoints_are_retried_and_ejected() {
    let mesh = client_sidecar(false).await;
    l7_pods(&mesh, (12, "echo-a"), (13, "echo-b")).await;
    // The local endpoint has no sidecar listening: every connect fails.
    let dead = pod_ip(14);
    publish(
        &mesh.xds,
        vec![
            workload("c1/demo/dead", dead, "c1", "a", "echo", true),
            workload("c2/demo/echo-b", pod_ip(13), "c2", "b", "echo", true),
        ],
    );
    let mut h1 = http1_via_connect(mesh.proxy, "echo.demo:81").await;
    // A POST: the failure happened before the request left, so even a
    // request with a body is retried elsewhere.
    let request = http::Request::post("/")
        .header("host", "echo.demo:81")
        .body(Full::new(Bytes::from("payload")))
        .unwrap();
    let (status, body) = send(&mut h1, request).await;
    assert_eq!(
        (status, body.as_str()),
        (200, format!("echo-b HTTP/1.1 {CLIENT} payload").as_str())
    );
    for _ in 0..10 {
        let (status, body) = send(&mut h1, get("/", "echo.demo:81")).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.starts_with("echo-b"), "{body}");
    }
    let retries = mesh.outbound.metrics.retries.get();
    assert!((1..=10).contains(&retries), "retried {retries} times");
    assert_eq!(
        mesh.outbound
            .load
            .outliers
            .ejections_total
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "five failed connects eject the dead endpoint; later requests go straight to echo-b"
    );

    // 5xx answers: echo-a fails /fail/echo-a, echo-b serves it. Once echo-a
    // has failed five times in a row it is ejected and only echo-b answers.
    publish(
        &mesh.xds,
        vec![
            workload("c1/demo/echo-a", pod_ip(12), "c1", "a", "echo", true),
            workload("c1/demo/echo-b", pod_ip(13), "c1", "a", "echo", true),
        ],
    );
    let mut answers = Vec::new();
    for _ in 0..40 {
        let (status, body) = send(&mut h1, get("/fail/echo-a", "echo.demo:81")).await;
        answers.push((status, body.split(' ').next().unwrap_or("").to_string()));
    }
    let failures = answers.iter().filter(|(s, _)| *s == 500).count();
    assert_eq!(failures, 5, "{answers:?}");
    assert!(
        answers[answers.len() - 10..]
            .iter()
            .all(|(s, who)| *s == 200 && who == "echo-b"),
        "{answers:?}"
    );
    let health = mesh.outbound.load.outliers.health("c1/demo/echo-a");
    assert!(health.ejected_for_seconds.is_some(), "{health:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_http_input_is_refused_and_bounded() {
    let mesh = client_sidecar(false).await;
    l7_pods(&mesh, (15, "echo-a"), (16, "echo-b")).await;
    publish_one(&mesh, "c1/demo/echo-a", 15);
    // Garbage after CONNECT to an HTTP port: a 400, not a crash.
    let (_, mut conn) = connect(mesh.proxy, "echo.demo:81").await;
    conn.write_all(b"\x00\x01garbage\r\n\r\n").await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(STEP, conn.read_to_end(&mut out)).await;
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"),
        "{out:?}"
    );
    // An oversized header: refused (431), the connection closed.
    let (_, mut conn) = connect(mesh.proxy, "echo.demo:81").await;
    let huge = format!(
        "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
        "a".repeat(100_000)
    );
    let _ = conn.write_all(huge.as_bytes()).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(STEP, conn.read_to_end(&mut out)).await;
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    // Slowloris: a head sent a line at a time, never finished, is cut off
    // at the limit: on the explicit proxy's own CONNECT, and on an HTTP
    // port behind it.
    for (what, conn, head) in [
        (
            "CONNECT head",
            TcpStream::connect(mesh.proxy).await.unwrap(),
            "CONNECT echo.demo:81 HTTP/1.1\r\n",
        ),
        (
            "HTTP head after CONNECT",
            connect(mesh.proxy, "echo.demo:81").await.1,
            "GET / HTTP/1.1\r\nhost: echo.demo\r\n",
        ),
    ] {
        let held = trickle(conn, head)
            .await
            .unwrap_or_else(|| panic!("{what}: a slow head held the connection"));
        assert!(
            held >= SLOW_HEAD_LIMIT - Duration::from_millis(100) && held < Duration::from_secs(3),
            "{what}: closed after {held:?}"
        );
    }
    // A kept-alive connection left idle after its answer is closed at
    // the same limit, as hyper's server closes it.
    let (_, mut conn) = connect(mesh.proxy, "echo.demo:81").await;
    let started = std::time::Instant::now();
    conn.write_all(b"GET / HTTP/1.1\r\nhost: echo.demo:81\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(STEP, conn.read_to_end(&mut out))
        .await
        .expect("an idle connection is closed")
        .unwrap();
    assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    let held = started.elapsed();
    assert!(
        held >= SLOW_HEAD_LIMIT - Duration::from_millis(100) && held < Duration::from_secs(3),
        "an idle connection closed after {held:?}"
    );
    // Mesh HTTP requests on 15008 without a target, or for another host.
    let certs = CertStore::new(&issue_workload(&mesh.ca, &id("client"), None).unwrap()).unwrap();
    let pool = Pool::new(certs, mesh.bundle.clone(), CONNECT_TIMEOUT);
    let link = pool
        .link(SocketAddr::new(pod_ip(15), HBONE_PORT), &id("echo"), None)
        .await
        .unwrap();
    let bare = http::Request::get("http://echo.demo/")
        .body(weft_proxy::http::empty())
        .unwrap();
    assert_eq!(link.request(bare).await.unwrap().status(), 400);
    let elsewhere = http::Request::get("http://echo.demo/")
        .header("x-weft-target", "127.0.0.1:22")
        .body(weft_proxy::http::empty())
        .unwrap();
    assert_eq!(link.request(elsewhere).await.unwrap().status(), 403);
    // Still serving.
    let mut h1 = http1_via_connect(mesh.proxy, "echo.demo:81").await;
    assert_eq!(send(&mut h1, get("/", "echo.demo:81")).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_on_http_ports_cross_the_mesh() {
    let mesh = client_sidecar(false).await;
    l7_pods(&mesh, (19, "echo-a"), (20, "echo-b")).await;
    publish_one(&mesh, "c1/demo/echo-a", 19);
    // The client claims to be someone else: the app must see only what
    // the server sidecar proved, on upgrades as on any HTTP request.
    let head = |upgrade: &str| {
        format!(
            "GET /upgrade HTTP/1.1\r\nhost: echo.demo:81\r\nconnection: upgrade\r\nupgrade: {upgrade}\r\n\
             x-weft-peer-identity: spiffe://cluster.local/ns/demo/sa/admin\r\n\r\n"
        )
    };
    // Through a CONNECT to the HTTP port, and as an absolute-form request
    // to the explicit proxy: the app switches, and the bytes after the
    // 101 go both ways through both sidecars.
    let (_, through_connect) = connect(mesh.proxy, "echo.demo:81").await;
    let absolute = TcpStream::connect(mesh.proxy).await.unwrap();
    for (what, mut conn, request) in [
        ("after CONNECT", through_connect, head("websocket")),
        (
            "absolute form",
            {
                absolute.set_nodelay(true).unwrap();
                absolute
            },
            head("websocket").replacen("/upgrade", "http://echo.demo:81/upgrade", 1),
        ),
    ] {
        conn.write_all(request.as_bytes()).await.unwrap();
        let answer = read_until(&mut conn, "ready:").await;
        assert!(answer.starts_with("HTTP/1.1 101"), "{what}: {answer:?}");
        assert!(
            answer.ends_with(&format!("echo-a [{}] ready:", id("client"))),
            "{what}: {answer:?}"
        );
        assert!(
            answer.to_ascii_lowercase().contains("upgrade: websocket"),
            "{what}: {answer:?}"
        );
        assert_eq!(exchange(&mut conn, "ping").await, "ping", "{what}");
        assert_eq!(exchange(&mut conn, "pong").await, "pong", "{what}");
    }
    // Refused by the app: its answer comes back, and the connection
    // keeps working as HTTP.
    let mut h1 = http1_via_connect(mesh.proxy, "echo.demo:81").await;
    let refused = http::Request::get("/upgrade")
        .header("host", "echo.demo:81")
        .header("connection", "upgrade")
        .header("upgrade", "other")
        .body(Full::default())
        .unwrap();
    assert_eq!(send(&mut h1, refused).await.0, 426);
    assert_eq!(send(&mut h1, get("/", "echo.demo:81")).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_in_flight_requests_and_refuses_new_connections() {
    let mesh = client_sidecar(false).await;
    l7_pods(&mesh, (17, "echo-a"), (18, "echo-b")).await;
    publish_one(&mesh, "c1/demo/echo-a", 17);
    let mut h1 = http1_via_connect(mesh.proxy, "echo.demo:81").await;
    let in_flight = tokio::spawn(async move {
        tokio::time::timeout(STEP, h1.ready())
            .await
            .unwrap()
            .unwrap();
        let response = h1.send_request(get("/slow", "echo.demo:81")).await.unwrap();
        let closing = response
            .headers()
            .get("connection")
            .is_some_and(|v| v == "close");
        (response.status().as_u16(), closing)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(mesh.outbound.drain.active(), 1, "the tunnel is counted");
    mesh.outbound.drain.start();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(
        TcpStream::connect(mesh.proxy).await.is_err(),
        "a draining sidecar accepts no new connections"
    );
    let (status, closing) = in_flight.await.unwrap();
    assert_eq!(status, 200, "the in-flight request finished");
    assert!(closing, "and its keep-alive connection was told to close");
    assert!(mesh.outbound.drain.idle(STEP).await);
}

/// Tunnels opened straight to a server sidecar, as any workload with a
/// mesh certificate can without its own sidecar. A server-first app's
/// greeting comes back at once (nothing waits to see what the caller
/// speaks); on a port declared TCP, bytes that look like HTTP are relayed
/// untouched; HTTP to an HTTP port reaches the app with the identity the
/// caller's certificate proved, not the one it wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_carry_tcp_as_declared_and_prove_http_callers() {
    let mesh = client_sidecar(false).await;
    let ip = pod_ip(21);
    publish(
        &mesh.xds,
        vec![workload("c1/demo/echo-t", ip, "c1", "a", "echo", true)],
    );
    echo_app(ip, "echo-t").await;
    http_app(ip, "echo-t").await;
    let quiet = TcpListener::bind(SocketAddr::new(ip, 8083)).await.unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = quiet.accept().await {
            tokio::spawn(async move {
                let (mut reader, mut writer) = conn.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
        }
    });
    server_sidecar(
        &mesh.ca,
        &mesh.bundle,
        ip,
        &id("echo"),
        Some(mesh.xds.clone()),
    )
    .await;
    let (sidecar, echo) = (SocketAddr::new(ip, HBONE_PORT), id("echo"));
    let tunnel = |port: u16| {
        mesh.outbound.pool.tunnel(
            sidecar,
            &echo,
            SocketAddr::new(ip, port),
            None,
            bytes::Bytes::new(),
        )
    };

    let started = std::time::Instant::now();
    let mut greeted = tunnel(8080).await.unwrap();
    assert_eq!(read_until(&mut greeted, "echo-t:").await, "echo-t:");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        exchange(&mut greeted, "GET / HTTP/1.1\r\n").await,
        "GET / HTTP/1.1\r\n"
    );

    let mut declared_tcp = tunnel(8083).await.unwrap();
    declared_tcp.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    assert_eq!(
        read_until(&mut declared_tcp, "\r\n").await,
        "GET / HTTP/1.1\r\n"
    );

    let mut http = tunnel(8081).await.unwrap();
    http.write_all(
        b"POST / HTTP/1.1\r\nhost: echo.demo\r\ncontent-length: 2\r\n\
          x-weft-peer-identity: spiffe://cluster.local/ns/demo/sa/admin\r\n\
          x-weft-target: 127.0.0.1:1\r\n\r\nhi",
    )
    .await
    .unwrap();
    let answer = read_until(&mut http, " hi").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.ends_with(&format!("echo-t HTTP/1.1 {} hi", id("client"))),
        "{answer}"
    );

    // A request head that never ends is cut off at the limit, as on the
    // other listeners.
    let slow = trickle(tunnel(8081).await.unwrap(), "GET / HTTP/1.1\r\n").await;
    assert!(
        slow.is_some_and(
            |t| t > SLOW_HEAD_LIMIT - Duration::from_millis(100) && t < Duration::from_secs(3)
        ),
        "{slow:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_its_endpoint_could_not_deliver_goes_elsewhere() {
    let mesh = client_sidecar(false).await;
    l7_pods(&mesh, (31, "echo-a"), (32, "echo-b")).await;
    // A pod going away: its sidecar still answers on 15008, its app is gone.
    let leaving = pod_ip(33);
    server_sidecar(&mesh.ca, &mesh.bundle, leaving, &id("echo"), None).await;
    publish(
        &mesh.xds,
        vec![
            workload("c1/demo/leaving", leaving, "c1", "a", "echo", true),
            workload("c2/demo/echo-b", pod_ip(32), "c2", "b", "echo", true),
        ],
    );
    let mut h1 = http1_via_connect(mesh.proxy, "echo.demo:81").await;
    let before = mesh.outbound.metrics.retries.get();
    let (status, body) = send(&mut h1, get("/", "echo.demo:81")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("echo-b"), "{body}");
    assert_eq!(mesh.outbound.metrics.retries.get(), before + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_apps_own_identity_header_never_leaves_its_sidecar() {
    let mesh = client_sidecar(false).await;
    // A workload without a sidecar: the client sidecar talks to it directly.
    let plain = pod_ip(34);
    http_app(plain, "plain").await;
    let mut without_sidecar = workload("c1/demo/plain", plain, "c1", "a", "echo", true);
    without_sidecar.tunnel_protocol = mesh::TunnelProtocol::None as i32;
    publish(&mesh.xds, vec![without_sidecar]);
    let mut h1 = http1_via_connect(mesh.proxy, "echo.demo:81").await;
    let request = http::Request::get("/")
        .header("host", "echo.demo:81")
        .header(
            "x-weft-peer-identity",
            "spiffe://cluster.local/ns/prod/sa/admin",
        )
        .body(Full::default())
        .unwrap();
    let (status, body) = send(&mut h1, request).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("plain"), "{body}");
    assert!(
        !body.contains("sa/admin"),
        "the app's claim went out: {body}"
    );
}

/// The server's sidecar enforces authorization as Envoy answers it: an
/// HTTP request gets `403 RBAC: access denied`, a gRPC call
/// PERMISSION_DENIED, and what no rule denies passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denials_are_403_for_http_and_permission_denied_for_grpc() {
    use weft_proxy::authorization::Policy;
    use weft_proxy::state::Local;

    let mesh = client_sidecar(false).await;
    let ip = pod_ip(30);
    http_app(ip, "echo-z").await;
    grpc::serve(ip, "echo-z").await;
    let local = Local {
        addresses: vec![ip],
        namespace: "demo".into(),
        network: String::new(),
    };
    let server_xds = Arc::new(XdsState::for_pod(local.clone()));
    server_sidecar(
        &mesh.ca,
        &mesh.bundle,
        ip,
        &id("echo"),
        Some(server_xds.clone()),
    )
    .await;
    publish_one(&mesh, "c1/demo/echo-z", 30);
    let path = |prefix: &str| mesh::Operation {
        paths: vec![mesh::StringMatch {
            kind: Some(mesh::string_match::Kind::Prefix(prefix.into())),
        }],
        ..Default::default()
    };
    let deny = mesh::Authorization {
        name: "deny".into(),
        namespace: "demo".into(),
        scope: mesh::AuthorizationScope::Namespace as i32,
        action: mesh::AuthorizationAction::Deny as i32,
        rules: vec![
            mesh::Rule {
                to: vec![path("/admin")],
                ..Default::default()
            },
            mesh::Rule {
                to: vec![path("/weft.ca.v1.CertificateService/")],
                ..Default::default()
            },
        ],
        ..Default::default()
    };
    let workloads = [workload("c1/demo/echo-z", ip, "c1", "a", "echo", true)];
    let snapshot = Snapshot::from_messages(&[service()], &workloads)
        .unwrap()
        .with_policies(
            [Arc::new(Policy::compile("demo/deny", &deny).unwrap())],
            &local,
        );
    server_xds.publish(snapshot);

    let mut h1 = http1_via_connect(mesh.proxy, "echo.demo:81").await;
    let (status, body) = send(&mut h1, get("/", "echo.demo:81")).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = send(&mut h1, get("/a/../admin/users", "echo.demo:81")).await;
    assert_eq!((status, body.as_str()), (403, "RBAC: access denied"));

    let channel = grpc::channel(mesh.proxy, "echo.demo:90").await;
    let mut ca =
        weft_xds_proto::ca::certificate_service_client::CertificateServiceClient::new(channel);
    let refused = ca
        .create_certificate(weft_xds_proto::ca::CreateCertificateRequest {
            csr: "ping".into(),
            validity_seconds: 1,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert_eq!(refused.message(), "RBAC: access denied");
}

/// Sends `request` once the previous exchange on this keep-alive
/// connection is over, returning the status, the response headers and the
/// body.
async fn send_full(
    sender: &mut H1,
    request: http::Request<Full<Bytes>>,
) -> (u16, http::HeaderMap, String) {
    tokio::time::timeout(STEP, sender.ready())
        .await
        .unwrap()
        .unwrap();
    let response = tokio::time::timeout(STEP, sender.send_request(request))
        .await
        .unwrap()
        .unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status.as_u16(),
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

/// A VirtualService and a DestinationRule compiled into the client
/// sidecar's snapshot, with real sidecars and apps behind it: redirects,
/// rewrites and response headers, a fault delay, a TCP route, a cookie
/// hash, locality distribution, a connection-pool limit and outlier
/// detection with the rule's own thresholds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_and_destination_policy_through_two_sidecars() {
    use weft_proxy::routes::{decode_destination, decode_route_set};
    use weft_proxy::state::Local;
    use weft_xds_proto::mesh::{path_rewrite, value_match};

    let mesh = client_sidecar(false).await;
    l7_pods(&mesh, (50, "echo-a"), (51, "echo-b")).await;
    let labelled = |uid: &str, n: u8, zone: &str, version: &str| mesh::Workload {
        labels: [("version".to_string(), version.to_string())].into(),
        ..workload(uid, pod_ip(n), "c1", zone, "echo", true)
    };
    let workloads = [
        labelled("c1/demo/echo-a", 50, "a", "a"),
        labelled("c1/demo/echo-b", 51, "b", "b"),
    ];
    let prefix = |p: &str| mesh::RouteMatch {
        path: Some(mesh::ValueMatch {
            kind: Some(value_match::Kind::Prefix(p.into())),
            invert: false,
        }),
        ..Default::default()
    };
    let to = |subset: &str| mesh::Backend {
        host: "echo.demo.svc.cluster.local".into(),
        subset: subset.into(),
        weight: 100,
        ..Default::default()
    };
    let rule = |path: &str, subset: &str| mesh::HttpRoute {
        matches: vec![prefix(path)],
        backends: vec![to(subset)],
        ..Default::default()
    };
    let routes = mesh::RouteSet {
        name: "virtualservice/demo/echo".into(),
        namespace: "demo".into(),
        hosts: vec!["echo.demo.svc.cluster.local".into()],
        export_to: vec!["*".into()],
        http: vec![
            mesh::HttpRoute {
                redirect: Some(mesh::Redirect {
                    path: Some(mesh::PathRewrite {
                        kind: Some(path_rewrite::Kind::Full("/new".into())),
                    }),
                    status: 301,
                    ..Default::default()
                }),
                backends: vec![],
                ..rule("/old", "")
            },
            mesh::HttpRoute {
                rewrite: Some(mesh::Rewrite {
                    path: Some(mesh::PathRewrite {
                        kind: Some(path_rewrite::Kind::Prefix("/fail".into())),
                    }),
                    authority: String::new(),
                }),
                response_headers: Some(mesh::HeaderEdits {
                    set: vec![mesh::HeaderValue {
                        name: "x-route".into(),
                        value: "api".into(),
                    }],
                    ..Default::default()
                }),
                retries: Some(mesh::RetryPolicy {
                    set: true,
                    ..Default::default()
                }),
                ..rule("/api", "a")
            },
            rule("/slow", "a"),
            mesh::HttpRoute {
                fault: Some(mesh::Fault {
                    delay_ms: 200,
                    delay_per_million: 1_000_000,
                    ..Default::default()
                }),
                ..rule("/delayed", "b")
            },
            rule("/sticky", "sticky"),
            rule("/", "spread"),
        ],
        tcp: vec![mesh::TcpRoute {
            port: 80,
            backends: vec![to("b")],
        }],
        ..Default::default()
    };
    let subset = |name: &str, labels: &[(&str, &str)], policy: mesh::TrafficPolicy| mesh::Subset {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        policy: Some(policy),
        ports: vec![],
    };
    let rules = mesh::DestinationPolicy {
        name: "demo/echo".into(),
        namespace: "demo".into(),
        host: "echo.demo.svc.cluster.local".into(),
        export_to: vec!["*".into()],
        subsets: vec![
            subset(
                "a",
                &[("version", "a")],
                mesh::TrafficPolicy {
                    pool: Some(mesh::ConnectionPool {
                        max_requests: 1,
                        ..Default::default()
                    }),
                    has_pool: true,
                    outlier: Some(mesh::OutlierPolicy {
                        consecutive_5xx: 2,
                        base_ejection_ms: 60_000,
                        max_ejection_percent: 100,
                        ..Default::default()
                    }),
                    has_outlier: true,
                    ..Default::default()
                },
            ),
            subset("b", &[("version", "b")], mesh::TrafficPolicy::default()),
            subset(
                "sticky",
                &[],
                mesh::TrafficPolicy {
                    has_lb: true,
                    hash: Some(mesh::ConsistentHash {
                        key: Some(mesh::consistent_hash::Key::Cookie("session".into())),
                    }),
                    ..Default::default()
                },
            ),
            subset(
                "spread",
                &[],
                mesh::TrafficPolicy {
                    has_locality: true,
                    locality: Some(mesh::LocalityPolicy {
                        distribute: vec![mesh::LocalityDistribute {
                            from: "eu/a/*".into(),
                            to: [("eu/a/*".to_string(), 20), ("eu/b/*".to_string(), 80)].into(),
                        }],
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            ),
        ],
        ..Default::default()
    };
    let names = &mut weft_proxy::resources::Interner::default();
    let route_set = Arc::new(
        decode_route_set(
            "virtualservice/demo/echo",
            &prost::Message::encode_to_vec(&routes),
            names,
        )
        .unwrap(),
    );
    let destination = Arc::new(
        decode_destination("demo/echo", &prost::Message::encode_to_vec(&rules), names).unwrap(),
    );
    let snapshot = Snapshot::from_messages(&[service()], &workloads)
        .unwrap()
        .with_traffic([route_set], [destination], &Local::default());
    mesh.xds.publish(snapshot);

    let mut h1 = http1_via_connect(mesh.proxy, "echo.demo:81").await;
    // A redirect is answered by the caller's sidecar.
    let (status, headers, _) = send_full(&mut h1, get("/old/page?x=1", "echo.demo:81")).await;
    assert_eq!(status, 301);
    assert_eq!(headers["location"], "http://echo.demo:81/new?x=1");
    // A fault delay holds the request.
    let started = std::time::Instant::now();
    let (status, _, body) = send_full(&mut h1, get("/delayed", "echo.demo:81")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.starts_with("echo-b"), "{body}");
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );

    // One cookie, one endpoint.
    let sticky = |session: &'static str| {
        http::Request::get("/sticky")
            .header("host", "echo.demo:81")
            .header("cookie", format!("theme=dark; session={session}"))
            .body(Full::default())
            .unwrap()
    };
    for session in ["alpha", "beta", "gamma"] {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..10 {
            let (_, _, body) = send_full(&mut h1, sticky(session)).await;
            seen.insert(body.split(' ').next().unwrap_or("").to_string());
        }
        assert_eq!(seen.len(), 1, "{session}: {seen:?}");
    }

    // Locality distribution: from eu/a, 80% to eu/b.
    let mut to_b = 0;
    for _ in 0..200 {
        let (_, _, body) = send_full(&mut h1, get("/", "echo.demo:81")).await;
        to_b += usize::from(body.starts_with("echo-b"));
    }
    assert!(
        (130..=190).contains(&to_b),
        "{to_b} of 200 to eu/b, 80% wanted"
    );

    // /api/echo-a is rewritten to /fail/echo-a, which echo-a fails: the
    // rewrite reached the app; the response header is the route's.
    let (status, headers, body) = send_full(&mut h1, get("/api/echo-a", "echo.demo:81")).await;
    assert_eq!(
        (status, headers["x-route"].to_str().unwrap()),
        (500, "api"),
        "{body}"
    );
    // That was echo-a's first 5xx; the rule's outlier detection ejects it
    // at the second (the proxy's own default is five).
    assert_eq!(
        mesh.outbound
            .load
            .outliers
            .ejections_total
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    let _ = send_full(&mut h1, get("/api/echo-a", "echo.demo:81")).await;
    assert_eq!(
        mesh.outbound
            .load
            .outliers
            .ejections_total
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // The connection pool of subset a holds one request: a second one at
    // the same time overflows.
    let mut other = http1_via_connect(mesh.proxy, "echo.demo:81").await;
    let slow =
        tokio::spawn(async move { send_full(&mut other, get("/slow", "echo.demo:81")).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, headers, _) = send_full(&mut h1, get("/slow", "echo.demo:81")).await;
    assert_eq!(
        (
            status,
            headers
                .get("x-envoy-overloaded")
                .map(|v| v.to_str().unwrap())
        ),
        (503, Some("true"))
    );
    assert_eq!(slow.await.unwrap().0, 200);
    assert_eq!(mesh.outbound.metrics.overflows.get(), 1);

    // A TCP route: port 80 goes to subset b.
    for _ in 0..5 {
        let (code, mut conn) = connect(mesh.proxy, "echo.demo:80").await;
        assert_eq!(code, 200);
        assert!(exchange(&mut conn, "hi").await.starts_with("echo-b:"));
    }
}

/// Counts the gateway's tunnels with `outcome`.
fn tunnels(metrics: &weft_proxy::metrics::Metrics, outcome: &'static str) -> u64 {
    metrics
        .gateway_tunnels
        .get_or_create(&weft_proxy::metrics::OutcomeLabels { outcome })
        .get()
}

/// A snapshot for a proxy on `network`, with `gateways`.
fn publish_on(
    xds: &XdsState,
    network: &str,
    me: Option<IpAddr>,
    workloads: Vec<mesh::Workload>,
    gateways: Vec<mesh::NetworkGateway>,
) {
    let mut names = weft_proxy::resources::Interner::default();
    let gateways: Vec<_> = gateways
        .iter()
        .map(|g| {
            let bytes = prost::Message::encode_to_vec(g);
            Arc::new(weft_proxy::network::decode_gateway(&g.name, &bytes, &mut names).unwrap())
        })
        .collect();
    let local = weft_proxy::state::Local {
        addresses: me.into_iter().collect(),
        namespace: "demo".into(),
        network: network.into(),
    };
    let snapshot = Snapshot::from_messages(&[service()], &workloads)
        .expect("valid resources")
        .with_gateways(gateways, &local);
    xds.snapshot.store(Arc::new(snapshot));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn across_networks_through_an_east_west_gateway() {
    let mesh = client_sidecar(false).await;
    let (server_ip, gateway_ip, near_ip, other_ip) =
        (pod_ip(20), pod_ip(21), pod_ip(22), pod_ip(23));
    let on = |network: &str, w: mesh::Workload| mesh::Workload {
        network: network.into(),
        ..w
    };
    let far = on(
        "n2",
        workload("c2/demo/echo-1", server_ip, "c2", "b", "echo", true),
    );
    let server = server_pod(&mesh.ca, &mesh.bundle, server_ip, "c2-echo", &id("echo")).await;

    // The gateway of n2: it knows the server, and a workload of n3.
    let gateway_id =
        Identity::new("cluster.local", "weft-system", "weft-eastwest-gateway").unwrap();
    let gateway_xds = Arc::new(XdsState::default());
    let stranger = on(
        "n3",
        workload("c3/demo/echo-9", other_ip, "c3", "c", "echo", true),
    );
    let plain = mesh::Workload {
        tunnel_protocol: mesh::TunnelProtocol::None as i32,
        identity: None,
        ..on(
            "n2",
            workload("c2/demo/plain", near_ip, "c2", "b", "echo", true),
        )
    };
    publish_on(
        &gateway_xds,
        "n2",
        None,
        vec![far.clone(), stranger, plain],
        vec![],
    );
    // Room for two connections in their handshake: enough for the test's
    // callers one at a time, and small enough to fill.
    let forwarder = Arc::new(weft_proxy::gateway::Forwarder {
        xds: gateway_xds,
        metrics: Arc::default(),
        drain: Default::default(),
        connect_timeout: CONNECT_TIMEOUT,
        handshakes: Arc::new(tokio::sync::Semaphore::new(2)),
    });
    let gateway_certs =
        CertStore::new(&issue_workload(&mesh.ca, &gateway_id, None).unwrap()).unwrap();
    let listener = TcpListener::bind(SocketAddr::new(gateway_ip, HBONE_PORT))
        .await
        .unwrap();
    let gateway_task = tokio::spawn(weft_proxy::gateway::serve(
        listener,
        gateway_certs,
        mesh.bundle.clone(),
        forwarder.clone(),
    ));
    let IpAddr::V4(gw4) = gateway_ip else {
        unreachable!()
    };
    let gateway = testing::gateway("c2", "n2", gw4.octets());
    publish_on(
        &mesh.xds,
        "n1",
        None,
        vec![far.clone()],
        vec![gateway.clone()],
    );

    // What the client's admin port shows: its network, the gateway, and
    // what the gateway weighs for echo.
    let dump = weft_proxy::admin::config_dump(&mesh.xds.snapshot.load());
    assert_eq!(dump["network"], "n1");
    assert_eq!(dump["gateways"][0]["name"], gateway.name.as_str());
    assert_eq!(dump["gateways"][0]["healthy"], true);
    assert_eq!(
        dump["gateway_weights"]["echo.demo.svc.cluster.local"][&gateway.name],
        1
    );

    // Double HBONE: the server's sidecar sees the client, not the gateway.
    for message in ["one", "two"] {
        let (code, mut conn) = connect(mesh.proxy, "echo.demo:80").await;
        assert_eq!(code, 200);
        assert_eq!(
            exchange(&mut conn, message).await,
            format!("c2-echo:{message}")
        );
    }
    assert_eq!(
        server
            .metrics()
            .calls_from("spiffe://cluster.local/ns/demo/sa/client"),
        2
    );
    assert_eq!(
        server
            .metrics()
            .calls_from("spiffe://cluster.local/ns/weft-system/sa/weft-eastwest-gateway"),
        0
    );
    assert_eq!(
        tunnels(&forwarder.metrics, "forwarded"),
        1,
        "one inner connection, pooled"
    );

    // What the gateway refuses, from a caller with a mesh identity: only
    // the mesh port of a sidecar on its own network is forwarded to.
    let link = mesh
        .outbound
        .pool
        .link(SocketAddr::new(gateway_ip, HBONE_PORT), &gateway_id, None)
        .await
        .unwrap();
    for (target, status, outcome) in [
        (
            SocketAddr::new(server_ip, 8080),
            403,
            "refused_not_mesh_port",
        ),
        (
            SocketAddr::new(other_ip, HBONE_PORT),
            403,
            "refused_other_network",
        ),
        (
            SocketAddr::new(near_ip, HBONE_PORT),
            403,
            "refused_no_sidecar",
        ),
        (
            SocketAddr::new(pod_ip(99), HBONE_PORT),
            403,
            "refused_unknown_workload",
        ),
    ] {
        let refused = link
            .tunnel(&target.to_string(), bytes::Bytes::new())
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains(&format!("answered {status}")),
            "{target}: {refused}"
        );
        assert_eq!(tunnels(&forwarder.metrics, outcome), 1, "{outcome}");
    }
    let request = http::Request::builder()
        .uri(format!("http://{server_ip}:8080/"))
        .body(weft_proxy::http::empty())
        .unwrap();
    assert_eq!(link.request(request).await.unwrap().status().as_u16(), 405);

    // Plaintext, and a certificate of another CA, never get past the
    // handshake.
    let mut raw = TcpStream::connect(SocketAddr::new(gateway_ip, HBONE_PORT))
        .await
        .unwrap();
    raw.write_all(format!("CONNECT {server_ip}:15008 HTTP/1.1\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(STEP, raw.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(read, Ok(0) | Err(_)) || !buf.starts_with(b"HTTP"),
        "plaintext got an answer"
    );
    let foreign_ca = CertificateAuthority::generate_root(
        "cluster.local",
        &CaParams::valid_for("root", Duration::from_secs(3600)),
    )
    .unwrap();
    let foreign = Pool::new(
        CertStore::new(&issue_workload(&foreign_ca, &id("client"), None).unwrap()).unwrap(),
        mesh.bundle.clone(),
        CONNECT_TIMEOUT,
    );
    // TLS 1.3 tells the client its certificate was refused only when it
    // next reads: the handshake or the first request fails.
    let refused = match foreign
        .link(SocketAddr::new(gateway_ip, HBONE_PORT), &gateway_id, None)
        .await
    {
        Err(_) => true,
        Ok(link) => link
            .tunnel(&format!("{server_ip}:15008"), bytes::Bytes::new())
            .await
            .is_err(),
    };
    assert!(refused, "another CA's certificate is refused");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        tunnels(&forwarder.metrics, "refused_handshake"),
        2,
        "plaintext and the other CA"
    );
    assert_eq!(
        tunnels(&forwarder.metrics, "forwarded"),
        1,
        "nothing else got through"
    );

    // Connections that never finish a handshake hold only the room made
    // for them: a third is closed at once, and counted.
    let gateway_addr = SocketAddr::new(gateway_ip, HBONE_PORT);
    let stalled = vec![
        TcpStream::connect(gateway_addr).await.unwrap(),
        TcpStream::connect(gateway_addr).await.unwrap(),
    ];
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = TcpStream::connect(gateway_addr).await.unwrap();
    let mut byte = [0u8; 1];
    let closed = tokio::time::timeout(STEP, third.read(&mut byte))
        .await
        .unwrap();
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "a third handshake was taken"
    );
    assert_eq!(tunnels(&forwarder.metrics, "refused_busy"), 1);
    drop(stalled);

    // The gateway dies: the client steps around it at once, to an
    // endpoint on its own network, and counts the failure.
    gateway_task.abort();
    drop(link);
    // A fresh client (of a mesh of its own), so that no pooled
    // connection through the old gateway outlives it.
    let fresh = client_sidecar(false).await;
    let near = server_pod(&fresh.ca, &fresh.bundle, near_ip, "c3-echo", &id("echo")).await;
    let near_workload = on(
        "n1",
        workload("c3/demo/echo-2", near_ip, "c3", "c", "echo", true),
    );
    publish_on(
        &fresh.xds,
        "n1",
        None,
        vec![far, near_workload],
        vec![gateway],
    );
    assert!(listener_gone(gateway_ip).await);
    for i in 0..10 {
        let (code, mut conn) = connect(fresh.proxy, "echo.demo:80").await;
        assert_eq!(code, 200, "connection {i}");
        assert_eq!(exchange(&mut conn, "x").await, "c3-echo:x");
    }
    assert!(fresh.outbound.metrics.gateway_failures.get() >= 1);
    assert!(
        near.metrics()
            .calls_from("spiffe://cluster.local/ns/demo/sa/client")
            == 10
    );
}

/// Waits until nothing listens on the gateway's port any more.
async fn listener_gone(ip: IpAddr) -> bool {
    for _ in 0..50 {
        if TcpStream::connect(SocketAddr::new(ip, HBONE_PORT))
            .await
            .is_err()
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A peer sidecar's 15008 as weft served it before HTTP/1.1 links: mTLS
/// offering HTTP/2 alone, every request answered `old`.
async fn sidecar_without_h1_links(mesh: &Mesh, ip: IpAddr) -> SocketAddr {
    let certs = CertStore::new(&issue_workload(&mesh.ca, &id("echo"), None).unwrap()).unwrap();
    let tls = weft_certs::tls::server_config(&certs, &mesh.bundle).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = TcpListener::bind(SocketAddr::new(ip, HBONE_PORT))
        .await
        .unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(stream) = acceptor.accept(tcp).await else {
                continue;
            };
            let service = hyper::service::service_fn(|_request| async {
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(
                    "old",
                ))))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service),
            );
        }
    });
    address
}

/// A sidecar with HTTP/1.1 links gets one; one without answers the offer
/// with HTTP/2, and that link is pooled and kept for its exchanges
/// rather than a new connection opened for each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_take_an_h1_link_where_the_peer_has_them_and_http2_where_not() {
    use weft_proxy::pool::ForExchange;

    let mesh = client_sidecar(false).await;
    let certs = CertStore::new(&issue_workload(&mesh.ca, &id("client"), None).unwrap()).unwrap();
    let pool = Pool::new(certs, mesh.bundle.clone(), CONNECT_TIMEOUT);

    let current = pod_ip(36);
    server_pod(&mesh.ca, &mesh.bundle, current, "echo-new", &id("echo")).await;
    let peer = SocketAddr::new(current, HBONE_PORT);
    assert!(matches!(
        pool.exchange_link(peer, &id("echo")).await.unwrap(),
        ForExchange::Http1(..)
    ));

    let old = sidecar_without_h1_links(&mesh, pod_ip(35)).await;
    for _ in 0..3 {
        let ForExchange::Http2(link) = pool.exchange_link(old, &id("echo")).await.unwrap() else {
            panic!("a peer without HTTP/1.1 links got one");
        };
        let request = http::Request::get("http://echo.demo/")
            .body(weft_proxy::http::empty())
            .unwrap();
        let response = link.request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"old");
    }
    assert_eq!(
        pool.connections(),
        1,
        "the first link was dropped without an exchange; the old peer's is kept"
    );
}

/// An application's pipelined requests on one connection are answered in
/// order: plain ones by the sidecar's own codec, and from the first one
/// that is not plain (a chunked body) on, by hyper's server, which is
/// handed the connection with that request's bytes intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_answered_in_order_across_the_hand_over_to_hyper() {
    let mesh = client_sidecar(false).await;
    l7_pods(&mesh, (37, "echo-p"), (38, "echo-q")).await;
    publish_one(&mesh, "c1/demo/echo-p", 37);
    let (code, mut conn) = connect(mesh.proxy, "echo.demo:81").await;
    assert_eq!(code, 200);
    let pipelined = "POST /one HTTP/1.1\r\nhost: echo.demo:81\r\ncontent-length: 3\r\n\r\none\
                     POST /two HTTP/1.1\r\nhost: echo.demo:81\r\ncontent-length: 3\r\n\r\ntwo\
                     POST /three HTTP/1.1\r\nhost: echo.demo:81\r\ntransfer-encoding: chunked\r\n\r\n5\r\nthree\r\n0\r\n\r\n\
                     POST /four HTTP/1.1\r\nhost: echo.demo:81\r\ncontent-length: 4\r\nconnection: close\r\n\r\nfour";
    conn.write_all(pipelined.as_bytes()).await.unwrap();
    let mut answers = Vec::new();
    tokio::time::timeout(STEP, conn.read_to_end(&mut answers))
        .await
        .expect("the sidecar closes after the last answer")
        .unwrap();
    let answers = String::from_utf8_lossy(&answers);
    let bodies: Vec<&str> = ["one", "two", "three", "four"]
        .iter()
        .map(|body| {
            let at = answers
                .find(&format!("echo-p HTTP/1.1 {CLIENT} {body}"))
                .unwrap_or_else(|| panic!("no answer to {body}: {answers}"));
            &answers[at..]
        })
        .collect();
    assert!(
        bodies.windows(2).all(|w| w[0].len() > w[1].len()),
        "out of order: {answers}"
    );
    assert_eq!(answers.matches("HTTP/1.1 200 OK").count(), 4, "{answers}");
}
