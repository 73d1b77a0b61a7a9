//! The L4 data path across two sidecars, on loopback addresses of their
//! own: explicit-mode CONNECT on the client side, HBONE over mTLS between
//! sidecars, the server's app reached on its pod address, the caller's
//! identity seen by the server's sidecar; locality failover; and refusals.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_certs::tls::{CertStore, TrustBundle};
use weft_certs::{CaParams, CertificateAuthority, Identity, issue_workload};
use weft_proxy::balance::Here;
use weft_proxy::hbone::{HBONE_PORT, Inbound, Pool, serve_inbound};
use weft_proxy::outbound::{Outbound, serve_explicit};
use weft_proxy::state::Snapshot;
use weft_proxy::xds::XdsState;
use weft_xds_proto::mesh;

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
) -> Arc<Inbound> {
    echo_app(ip, name).await;
    let certs = CertStore::new(&issue_workload(ca, identity, None).unwrap()).unwrap();
    let inbound = Arc::new(Inbound::new(vec![ip]));
    let listener = TcpListener::bind(SocketAddr::new(ip, HBONE_PORT))
        .await
        .unwrap();
    tokio::spawn(serve_inbound(
        listener,
        certs,
        bundle.clone(),
        inbound.clone(),
    ));
    inbound
}

fn service() -> mesh::Service {
    mesh::Service {
        name: "echo".into(),
        namespace: "demo".into(),
        hostname: "echo.demo.svc.cluster.local".into(),
        vips: vec![mesh::ClusterVip {
            cluster_id: "c1".into(),
            network: "n".into(),
            address: vec![10, 96, 0, 10],
        }],
        ports: vec![mesh::ServicePort {
            port: 80,
            name: "tcp".into(),
            app_protocol: mesh::AppProtocol::Tcp as i32,
            target_port: 8080,
        }],
        cluster_local: false,
        clusters: vec!["c1".into(), "c2".into()],
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
    mesh::Workload {
        uid: uid.into(),
        cluster_id: cluster.into(),
        addresses: vec![v4.octets().to_vec()],
        locality: Some(mesh::Locality {
            region: "eu".into(),
            zone: zone.into(),
            subzone: String::new(),
        }),
        identity: Some(mesh::Identity {
            trust_domain: "cluster.local".into(),
            namespace: "demo".into(),
            service_account: sa.into(),
        }),
        status: if healthy {
            mesh::WorkloadStatus::Healthy
        } else {
            mesh::WorkloadStatus::Unhealthy
        } as i32,
        services: vec![mesh::ServiceBinding {
            namespace: "demo".into(),
            hostname: "echo.demo.svc.cluster.local".into(),
            ports: vec![mesh::PortMapping {
                service_port: 80,
                target_port: 8080,
            }],
        }],
        tunnel_protocol: mesh::TunnelProtocol::Hbone as i32,
        ..Default::default()
    }
}

fn publish(xds: &XdsState, workloads: Vec<mesh::Workload>) {
    let services = BTreeMap::from([(
        "demo/echo.demo.svc.cluster.local".to_string(),
        Arc::new(service()),
    )]);
    let workloads = workloads
        .into_iter()
        .map(|w| (w.uid.clone(), Arc::new(w)))
        .collect();
    xds.snapshot
        .store(Arc::new(Snapshot::build(services, workloads)));
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
async fn exchange(conn: &mut TcpStream, message: &str) -> String {
    conn.write_all(message.as_bytes()).await.unwrap();
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

async fn client_sidecar(passthrough: bool) -> Mesh {
    let ca = CertificateAuthority::generate_root(
        "cluster.local",
        &CaParams::valid_for("root", Duration::from_secs(86400)),
    )
    .unwrap();
    let bundle = TrustBundle::from_pem(&ca.roots_pem()).unwrap();
    let certs = CertStore::new(&issue_workload(&ca, &id("client"), None).unwrap()).unwrap();
    let xds = Arc::new(XdsState::default());
    let mut outbound = Outbound::new(
        xds.clone(),
        Pool::new(certs, bundle.clone()),
        Here {
            cluster: "c1".into(),
            region: "eu".into(),
            zone: "a".into(),
        },
    );
    outbound.passthrough = passthrough;
    let outbound = Arc::new(outbound);
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
        local.calls_from("spiffe://cluster.local/ns/demo/sa/client"),
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
        remote.calls_from("spiffe://cluster.local/ns/demo/sa/client"),
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
    assert_eq!(connect(mesh.proxy, "echo.demo:81").await.0, 404);
    assert_eq!(connect(mesh.proxy, "127.0.0.1:9").await.0, 404);

    // A tunnel to an address that is not the server pod's.
    let result = mesh
        .outbound
        .pool
        .tunnel(
            SocketAddr::new(ip, HBONE_PORT),
            &id("echo"),
            "127.0.0.1:22".parse().unwrap(),
        )
        .await;
    assert!(result.unwrap_err().to_string().contains("403"));

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
