//! The proxy's control-plane side against a real control plane on a lab
//! cluster: certificate from the CA with the pod's token, delta xDS over
//! mTLS, the last snapshot kept through a control-plane restart, and updates
//! resumed after it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use weft_certs::tls::{CertStore, TrustBundle};
use weft_certs::{CaParams, CertificateAuthority, Identity};
use weft_control::{Config, ControlPlane};
use weft_lab::{ApiServer, ApiServerConfig};
use weft_proxy::identity::{self, IdentityConfig};
use weft_proxy::xds::{self, Backoff, XdsState};

const WAIT: Duration = Duration::from_secs(20);

async fn eventually(what: &str, check: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

async fn create<K>(api: &Api<K>, value: serde_json::Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    api.create(
        &PostParams::default(),
        &serde_json::from_value(value).unwrap(),
    )
    .await
    .unwrap()
}

async fn workload(client: &kube::Client, name: &str, ip: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "demo");
    create(&pods, json!({"metadata": {"name": name}, "spec": {"serviceAccountName": "echo", "containers": [{"name": "app", "image": "echo"}]}})).await;
    pods.patch_status(
        name,
        &PatchParams::default(),
        &Patch::Merge(
            json!({"status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]}}),
        ),
    )
    .await
    .unwrap();
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "demo");
    create(&slices, json!({
        "metadata": {"name": format!("{name}-slice"), "labels": {"kubernetes.io/service-name": "echo"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [ip], "targetRef": {"kind": "Pod", "name": name}}],
        "ports": [{"name": "http", "port": 8080}],
    }))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_gets_an_identity_syncs_and_survives_a_control_plane_restart() {
    let lab = ApiServer::start(ApiServerConfig::default()).await.unwrap();
    let kubeconfig = kube::config::Kubeconfig::from_yaml(lab.kubeconfig()).unwrap();
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in ["weft-system", "demo"] {
        create(&namespaces, json!({"metadata": {"name": ns}})).await;
    }
    // A plug-in CA, so that a restarted control plane signs with the same root.
    let root = CertificateAuthority::generate_root(
        "cluster.local",
        &CaParams::valid_for("root", Duration::from_secs(86400 * 30)),
    )
    .unwrap();
    let c1 = root
        .generate_intermediate(
            "c1",
            &CaParams::valid_for("c1", Duration::from_secs(86400 * 7)),
        )
        .unwrap();
    let files = c1.plugin_files();
    let secrets: Api<Secret> = Api::namespaced(client.clone(), "weft-system");
    create(&secrets, json!({"metadata": {"name": "cacerts"}, "stringData": {
        "ca-cert.pem": files.ca_cert, "ca-key.pem": files.ca_key, "root-cert.pem": files.root_cert, "cert-chain.pem": files.cert_chain,
    }}))
    .await;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "demo");
    create(&accounts, json!({"metadata": {"name": "echo"}})).await;
    create(&Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), "demo"), json!({
        "metadata": {"name": "echo"}, "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))
    .await;
    workload(&client, "a1", "10.1.0.5").await;

    let xds_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let start_control = || {
        let client = client.clone();
        async move {
            let mut config = Config::new("c1");
            config.xds_tls_addr = Some(xds_addr);
            ControlPlane::start(config, client).await.unwrap()
        }
    };
    let control = start_control().await;

    // The pod's projected token, as the kubelet writes it.
    let token = accounts
        .create_token_request(
            "echo",
            &PostParams::default(),
            &TokenRequest {
                spec: TokenRequestSpec {
                    audiences: vec!["weft-ca".into()],
                    expiration_seconds: Some(3600),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap()
        .status
        .unwrap()
        .token;
    let dir = tempfile::tempdir().unwrap();
    let token_path = dir.path().join("token");
    std::fs::write(&token_path, token).unwrap();

    let bundle = TrustBundle::from_pem(&root.roots_pem()).unwrap();
    let control_identity = Identity::new("cluster.local", "weft-system", "weft-control").unwrap();
    let config = IdentityConfig {
        control_plane: xds_addr.to_string(),
        control_plane_identity: control_identity.clone(),
        identity: Identity::new("cluster.local", "demo", "echo").unwrap(),
        token_path,
        bundle: bundle.clone(),
        ttl: Duration::from_secs(3600),
    };
    let cert = identity::fetch(&config).await.unwrap();
    assert_eq!(
        cert.identity().to_string(),
        "spiffe://cluster.local/ns/demo/sa/echo"
    );
    assert_eq!(
        cert.full_chain().len(),
        3,
        "leaf, the c1 intermediate, the shared root"
    );

    let store = CertStore::new(&cert).unwrap();
    let tls = weft_certs::tls::client_config(&store, &bundle, vec![control_identity]).unwrap();
    let state = Arc::new(XdsState::default());
    let node = weft_xds_proto::envoy::config::core::v3::Node {
        id: "sidecar~10.1.0.5~a1.demo~demo.svc.cluster.local".into(),
        ..Default::default()
    };
    let backoff = Backoff {
        base: Duration::from_millis(50),
        max: Duration::from_millis(500),
    };
    let client_task = tokio::spawn(xds::run(
        move || {
            let tls = tls.clone();
            async move { Ok(weft_proxy::channel::mesh(xds_addr.to_string(), tls)) }
        },
        node,
        state.clone(),
        backoff,
    ));
    eventually("first snapshot", || {
        state.synced.load(Ordering::Relaxed)
            && state.snapshot.load().workloads.contains_key("c1/demo/a1")
    })
    .await;
    let snapshot = state.snapshot.load_full();
    let service = snapshot
        .service_by_host("echo.demo")
        .expect("service indexed by short name");
    assert_eq!(snapshot.endpoints(service).count(), 1);

    // The control plane goes away: the proxy keeps its last snapshot.
    control.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(state.snapshot.load().workloads.contains_key("c1/demo/a1"));
    workload(&client, "a2", "10.1.0.6").await;

    // It comes back on the same address: the proxy reconnects and catches up.
    let _control = start_control().await;
    eventually("update after the restart", || {
        state.snapshot.load().workloads.contains_key("c1/demo/a2")
    })
    .await;
    assert!(state.reconnects.load(Ordering::Relaxed) >= 1);
    assert_eq!(state.nacks.load(Ordering::Relaxed), 0);
    client_task.abort();
}

/// The whole path: a lab cluster, weft-control, and two sidecars configured
/// as the injector configures them; an app's connection to a mesh hostname
/// crosses both sidecars over mTLS and the server side sees who called.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_crosses_two_sidecars_configured_by_the_control_plane() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use weft_proxy::sidecar::{self, SidecarConfig};

    let pid = std::process::id();
    let ip = |n: u8| -> std::net::IpAddr {
        [127, 200 + (pid % 50) as u8, (pid / 50 % 250) as u8, n].into()
    };
    let (client_ip, server_ip) = (ip(10), ip(11));

    let lab = ApiServer::start(ApiServerConfig::default()).await.unwrap();
    let kubeconfig = kube::config::Kubeconfig::from_yaml(lab.kubeconfig()).unwrap();
    let client = kube::Client::try_from(
        kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .unwrap(),
    )
    .unwrap();
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in ["weft-system", "demo"] {
        create(&namespaces, json!({"metadata": {"name": ns}})).await;
    }
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), "demo");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "demo");
    for (pod, sa, pod_ip) in [
        ("client-1", "client", client_ip),
        ("echo-1", "echo", server_ip),
    ] {
        create(&accounts, json!({"metadata": {"name": sa}})).await;
        create(
            &pods,
            json!({
                "metadata": {"name": pod, "annotations": {"sidecar.weft.io/status": "{}"}},
                "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "app"}]},
            }),
        )
        .await;
        pods.patch_status(pod, &PatchParams::default(), &Patch::Merge(json!({"status": {"podIP": pod_ip.to_string(), "conditions": [{"type": "Ready", "status": "True"}]}})))
            .await
            .unwrap();
    }
    create(&Api::<k8s_openapi::api::core::v1::Service>::namespaced(client.clone(), "demo"), json!({
        "metadata": {"name": "echo"}, "spec": {"ports": [{"name": "tcp-echo", "port": 80, "targetPort": 8080}]},
    }))
    .await;
    create(&Api::<EndpointSlice>::namespaced(client.clone(), "demo"), json!({
        "metadata": {"name": "echo-x", "labels": {"kubernetes.io/service-name": "echo"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [server_ip.to_string()], "targetRef": {"kind": "Pod", "name": "echo-1"}}],
        "ports": [{"name": "tcp-echo", "port": 8080}],
    }))
    .await;

    let xds_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut config = Config::new("c1");
    config.xds_tls_addr = Some(xds_addr);
    let control = ControlPlane::start(config, client.clone()).await.unwrap();

    // The app behind the server sidecar.
    let app = tokio::net::TcpListener::bind((server_ip, 8080))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = app.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 256];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root-cert.pem");
    std::fs::write(&root, control.ca.roots_pem()).unwrap();
    let mut sidecars = Vec::new();
    for (pod, sa, pod_ip) in [
        ("client-1", "client", client_ip),
        ("echo-1", "echo", server_ip),
    ] {
        let token = accounts
            .create_token_request(
                sa,
                &PostParams::default(),
                &TokenRequest {
                    spec: TokenRequestSpec {
                        audiences: vec!["weft-ca".into()],
                        expiration_seconds: Some(3600),
                        ..Default::default()
                    },
                    ..Default::default()
                },
            )
            .await
            .unwrap()
            .status
            .unwrap()
            .token;
        let token_path = dir.path().join(format!("{sa}.token"));
        std::fs::write(&token_path, token).unwrap();
        let sidecar = sidecar::start(SidecarConfig {
            control_plane: xds_addr.to_string(),
            cluster_id: "c1".into(),
            trust_domain: "cluster.local".into(),
            control_plane_namespace: "weft-system".into(),
            token_path,
            root_cert_path: root.clone(),
            pod_name: pod.into(),
            pod_namespace: "demo".into(),
            pod_ip,
            service_account: sa.into(),
            outbound_addr: "127.0.0.1:0".parse().unwrap(),
            inbound_capture_addr: "127.0.0.1:0".parse().unwrap(),
            inbound_mode: weft_proxy::inbound::Mode::Strict,
            health_addr: "127.0.0.1:0".parse().unwrap(),
            admin_addr: "127.0.0.1:0".parse().unwrap(),
            prometheus_addr: "127.0.0.1:0".parse().unwrap(),
            passthrough: false,
            sniff_timeout: Duration::from_millis(100),
            outliers: Default::default(),
            drain_timeout: Duration::from_secs(5),
        })
        .await
        .unwrap();
        sidecars.push(sidecar);
    }
    let (client_side, server_side) = (&sidecars[0], &sidecars[1]);

    // Ready once configured.
    let health = client_side.health_addr;
    let ready = || async move {
        let mut conn = tokio::net::TcpStream::connect(health).await.unwrap();
        conn.write_all(b"GET /healthz/ready HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        conn.read_to_string(&mut out).await.unwrap();
        out.starts_with("HTTP/1.1 200")
    };
    let deadline = tokio::time::Instant::now() + WAIT;
    while !(ready().await
        && client_side
            .xds
            .snapshot
            .load()
            .workloads
            .contains_key("c1/demo/echo-1"))
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the client sidecar never got configured"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut conn = tokio::net::TcpStream::connect(client_side.outbound_addr)
        .await
        .unwrap();
    conn.write_all(b"CONNECT echo.demo.svc.cluster.local:80 HTTP/1.1\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 39];
    conn.read_exact(&mut head).await.unwrap();
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    conn.write_all(b"across the mesh").await.unwrap();
    let mut echoed = [0u8; 15];
    tokio::time::timeout(WAIT, conn.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"across the mesh");
    assert_eq!(
        server_side
            .inbound
            .calls_from("spiffe://cluster.local/ns/demo/sa/client"),
        1
    );
    drop(conn);

    // The admin port shows the configuration and the traffic.
    let admin = |addr: std::net::SocketAddr, path: &'static str| async move {
        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        tokio::time::timeout(WAIT, conn.read_to_string(&mut out))
            .await
            .unwrap()
            .unwrap();
        out
    };
    let dump = admin(client_side.admin_addr, "/config_dump").await;
    assert!(dump.contains("\"uid\": \"c1/demo/echo-1\""), "{dump}");
    let clusters = admin(client_side.admin_addr, "/clusters").await;
    assert!(
        clusters.contains("echo.demo.svc.cluster.local"),
        "{clusters}"
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let stats = admin(client_side.prometheus_addr, "/stats/prometheus").await;
        if stats.contains("weft_proxy_tcp_connections_closed_total{reporter=\"source\"")
            && stats.contains("destination_service=\"echo.demo.svc.cluster.local\"")
            && stats.contains("weft_proxy_xds_connected 1")
            && stats.contains("weft_proxy_workloads 2")
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stats = admin(server_side.prometheus_addr, "/stats/prometheus").await;
    assert!(
        stats.contains("source_principal=\"spiffe://cluster.local/ns/demo/sa/client\""),
        "{stats}"
    );
    // 15090 serves metrics only; the mesh view stays on loopback's 15000.
    assert!(
        admin(client_side.prometheus_addr, "/config_dump")
            .await
            .starts_with("HTTP/1.1 404")
    );

    // Drain (what SIGTERM does): readiness turns 503, 15001 stops accepting.
    let left = client_side.drain(Duration::from_secs(2)).await;
    assert_eq!(left, 0, "nothing was open");
    assert!(
        admin(client_side.health_addr, "/healthz/ready")
            .await
            .starts_with("HTTP/1.1 503")
    );
    assert!(
        tokio::net::TcpStream::connect(client_side.outbound_addr)
            .await
            .is_err()
    );
}
