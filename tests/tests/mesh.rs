//! The proxy's control-plane side against a real control plane on a lab
//! cluster: certificate from the CA with the pod's token, delta xDS over
//! mTLS, the last snapshot kept through a control-plane restart, and updates
//! resumed after it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use weft_certs::tls::{CertStore, TrustBundle};
use weft_certs::{CaParams, CertificateAuthority, Identity};
use weft_control::{Config, ControlPlane};
use weft_lab::apiserver::testing::token;
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
    let client = lab.client().await.unwrap();
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
    let token = token(&client, "demo", "echo", Some("weft-ca"), 3600)
        .await
        .unwrap();
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

    // Rotation against the real CA: a certificate of the shortest lifetime
    // it grants (60 s) is replaced at about half its life, with the same
    // identity, in the same store.
    let short = Arc::new(IdentityConfig {
        ttl: Duration::from_secs(60),
        ..config.clone()
    });
    let short_lived = identity::fetch(&short).await.unwrap();
    let rotating = CertStore::new(&short_lived).unwrap();
    let rotation = tokio::spawn(identity::rotate(short, rotating.clone()));
    let first = rotating.certificate().full_chain()[0].clone();
    let fetched = tokio::time::Instant::now();
    let rotated_by = fetched + Duration::from_secs(45);
    while rotating.certificate().full_chain()[0] == first {
        assert!(
            tokio::time::Instant::now() < rotated_by,
            "the certificate was not rotated at half its life"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Not at once: the CA backdates certificates by a minute, and half
    // the lifetime counted from there would be now (a loop on the CA).
    assert!(
        fetched.elapsed() > Duration::from_secs(20),
        "rotated after {:?}",
        fetched.elapsed()
    );
    assert_eq!(rotating.certificate().identity(), cert.identity());
    rotation.abort();

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
            && state.snapshot.load().workload("c1/demo/a1").is_some()
    })
    .await;
    let snapshot = state.snapshot.load_full();
    let service = snapshot
        .service_by_host("echo.demo")
        .expect("service indexed by short name");
    assert_eq!(snapshot.endpoints(service).len(), 1);

    // The control plane goes away: the proxy keeps its last snapshot.
    control.stop();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(state.snapshot.load().workload("c1/demo/a1").is_some());
    workload(&client, "a2", "10.1.0.6").await;

    // It comes back on the same address: the proxy reconnects and catches up.
    let _control = start_control().await;
    eventually("update after the restart", || {
        state.snapshot.load().workload("c1/demo/a2").is_some()
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
    let client = lab.client().await.unwrap();
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
    let log_levels = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    for (pod, sa, pod_ip) in [
        ("client-1", "client", client_ip),
        ("echo-1", "echo", server_ip),
    ] {
        let token = token(&client, "demo", sa, Some("weft-ca"), 3600)
            .await
            .unwrap();
        let token_path = dir.path().join(format!("{sa}.token"));
        std::fs::write(&token_path, token).unwrap();
        let levels = log_levels.clone();
        let set_log_level: weft_proxy::admin::SetLogLevel = Box::new(move |level: &str| {
            if level.contains('!') {
                anyhow::bail!("{level:?} is not a log filter");
            }
            levels.lock().unwrap().push(level.to_string());
            Ok(())
        });
        let sidecar = sidecar::start_with(
            SidecarConfig {
                control_plane: xds_addr.to_string(),
                cluster_id: "c1".into(),
                network: String::new(),
                mode: sidecar::Mode::Sidecar,
                trust_domain: "cluster.local".into(),
                control_plane_namespace: "weft-system".into(),
                token_path,
                root_cert_path: root.clone(),
                root_cert_poll: Duration::from_secs(10),
                pod_name: pod.into(),
                pod_namespace: "demo".into(),
                pod_ip,
                pod_ips: vec![pod_ip],
                service_account: sa.into(),
                outbound_addr: "127.0.0.1:0".parse().unwrap(),
                inbound_capture_addr: "127.0.0.1:0".parse().unwrap(),
                inbound_mode: weft_proxy::inbound_passthrough::Mode::Strict,
                health_addr: "127.0.0.1:0".parse().unwrap(),
                app_health_addr: "127.0.0.1:0".parse().unwrap(),
                app_probes: String::new(),
                admin_addr: "127.0.0.1:0".parse().unwrap(),
                prometheus_addr: "127.0.0.1:0".parse().unwrap(),
                passthrough: false,
                sniff_timeout: Duration::from_millis(100),
                head_timeout: weft_proxy::http::HEAD_TIMEOUT,
                outliers: Default::default(),
                drain_timeout: Duration::from_secs(5),
                connect_timeout: Duration::from_secs(1),
                upgrades: Default::default(),
                dns_addr: Some("127.0.0.1:0".parse().unwrap()),
                dns_upstream: None,
                domain_suffix: "cluster.local".into(),
                access_log: false,
            },
            Some(set_log_level),
        )
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
            .workload("c1/demo/echo-1")
            .is_some())
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
            .app
            .metrics()
            .calls_from("spiffe://cluster.local/ns/demo/sa/client"),
        1
    );
    drop(conn);

    // The admin port shows the configuration and the traffic.
    let admin = |addr, path| weft_lab::apiserver::testing::http1(addr, "GET", path);
    let dump = admin(client_side.admin_addr, "/config_dump").await;
    assert!(dump.contains("\"uid\": \"c1/demo/echo-1\""), "{dump}");
    let clusters = admin(client_side.admin_addr, "/clusters").await;
    // The log filter changes at run time; bad input is a 400, not a crash.
    let post = |addr, path| weft_lab::apiserver::testing::http1(addr, "POST", path);
    for (path, code) in [
        ("/logging?level=weft_proxy=debug", "200"),
        ("/logging?level=x!", "400"),
        ("/logging", "400"),
    ] {
        let answer = post(client_side.admin_addr, path).await;
        let status = format!("HTTP/1.1 {code}");
        assert!(answer.starts_with(&status), "POST {path}: {answer}");
    }
    assert!(
        admin(client_side.admin_addr, "/logging")
            .await
            .starts_with("HTTP/1.1 405")
    );
    assert_eq!(
        *log_levels.lock().unwrap(),
        vec!["weft_proxy=debug".to_string()]
    );
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
            && stats.contains("weft_proxy_process_resident_memory_bytes ")
            && stats.contains("weft_proxy_heap_in_use_bytes ")
            && stats.contains("weft_proxy_process_cpu_seconds_total ")
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

    // Drain (what SIGTERM does): readiness turns 503, 15001 and 15006 stop
    // accepting.
    let left = client_side.drain(Duration::from_secs(2)).await;
    assert_eq!(left, 0, "nothing was open");
    assert!(
        admin(client_side.health_addr, "/healthz/ready")
            .await
            .starts_with("HTTP/1.1 503")
    );
    for closed in [client_side.outbound_addr, client_side.inbound_capture_addr] {
        assert!(
            tokio::net::TcpStream::connect(closed).await.is_err(),
            "{closed} still accepts"
        );
    }
}

// ---- The lab: two clusters, real processes, the demo's workloads ----

mod lab {
    //! Two lab clusters on a flat network with every piece real: API
    //! servers, weft-control processes, the webhook injecting sidecars, the
    //! pod runner applying the init container's capture rules in per-pod
    //! network namespaces (as root; loopback and explicit proxying
    //! otherwise), and weft-proxy processes carrying the traffic. One test,
    //! because a lab owns machine-wide names while it runs.

    use std::time::{Duration, Instant};

    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, DeleteParams};
    use weft_lab::lab::{Lab, LabOptions};
    use weft_lab::mesh::Binaries;
    use weft_lab::netns;
    use weft_lab::runner::{Network, pod_dir};
    use weft_lab::traffic::{Held, PodClient, by_cluster};

    mod networks;
    mod observe;
    mod scope;
    mod traffic;

    const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/client";

    async fn wait_ready(client: &kube::Client, names: &[&str]) {
        let pods: Api<Pod> = Api::namespaced(client.clone(), "demo");
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let mut all = true;
            for name in names {
                let ready = pods
                    .get_opt(name)
                    .await
                    .unwrap()
                    .and_then(|p| p.status)
                    .and_then(|s| s.conditions)
                    .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
                all &= ready;
            }
            if all {
                return;
            }
            assert!(Instant::now() < deadline, "pods {names:?} not ready");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The client pod of c1 calling echo, once its first call is answered.
    async fn echo_caller(lab: &Lab, dir: &std::path::Path) -> PodClient {
        let c1 = &lab.cluster("c1").unwrap().client;
        let caller = PodClient::new(c1, &pod_dir(dir, "c1", "demo", "client"), "demo", "echo")
            .await
            .unwrap();
        caller
            .until(Duration::from_secs(60), |a| a.is_ok())
            .await
            .unwrap();
        caller
    }

    async fn apply(lab: &Lab, cluster: &str, text: &str) {
        weft_lab::apply::apply_all(&lab.cluster(cluster).unwrap().client, text)
            .await
            .unwrap();
    }

    #[test]
    fn two_clusters_locality_failover_secrets_and_restarts_then_three_networks() {
        let binaries = match Binaries::locate() {
            Ok(b) => b,
            Err(err) => {
                println!("SKIP: {err:#} (cargo test --workspace builds them)");
                return;
            }
        };
        let network = match netns::unavailable() {
            None => Network::Namespaces,
            Some(reason) => {
                println!(
                    "per-pod namespaces unavailable ({reason}): loopback lab, explicit proxying"
                );
                Network::Loopback
            }
        };
        if network == Network::Namespaces && netns::exists(netns::ROUTER) {
            println!("SKIP: a lab is running on this machine (weftctl lab down)");
            return;
        }
        let flat = binaries.clone();
        in_lab(network, 2, move |dir| scenario(flat, network, dir));
        match network {
            Network::Namespaces => in_lab(network, 3, move |dir| networks::scenario(binaries, dir)),
            Network::Loopback => println!(
                "SKIP the multi-network lab: loopback addresses cannot be kept apart (needs root and iptables)"
            ),
        }
    }

    /// Runs `scenario` in a lab of `clusters` routers' worth, then checks
    /// that nothing the lab made outlived it, also after a failure.
    fn in_lab<F, Fut>(network: Network, clusters: u8, scenario: F)
    where
        F: FnOnce(std::path::PathBuf) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()>,
    {
        if network == Network::Namespaces {
            netns::create_router(clusters).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let dir_path = dir.path().to_path_buf();
        // The lab's threads (and the processes they start) live in the
        // router namespace: enter it on a thread of our own.
        let result = std::thread::spawn(move || {
            if network == Network::Namespaces {
                netns::enter(netns::ROUTER).unwrap();
            }
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap()
                .block_on(scenario(dir_path))
        })
        .join();
        let left = netns::sweep();
        if network == Network::Namespaces && result.is_ok() {
            // Only the pods still running when the lab stopped are swept here:
            // the router itself, and nothing else, must be left by `down`.
            assert!(netns::list().is_empty(), "namespaces left after the sweep");
            assert_eq!(
                left,
                vec![netns::ROUTER.to_string()],
                "lab.down() left pod namespaces behind"
            );
        }
        // No process the lab started is still running.
        let pids = std::fs::read_to_string(dir.path().join("pids")).unwrap_or_default();
        for pid in pids.lines().filter_map(|l| l.parse::<i32>().ok()) {
            // SAFETY: signal 0 only checks for existence.
            let alive = unsafe { libc::kill(pid, 0) } == 0
                && std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| !s.contains(") Z "));
            assert!(!alive, "process {pid} outlived the lab");
        }
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    }

    const ECHO_STRICT: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: echo-strict
  namespace: demo
  labels: {app: echo-strict}
  annotations: {sidecar.weft.io/inboundMode: STRICT}
spec:
  serviceAccountName: echo
  containers:
  - name: echo
    image: ghcr.io/weft-mesh/weft-echo:0.1.0
    args: ["--http", "0.0.0.0:8080"]
    ports:
    - {name: http, containerPort: 8080}
    readinessProbe:
      httpGet: {path: /healthz, port: http}
      periodSeconds: 1
"#;

    /// The echo pods probe the port they serve on. The kubelet's probes go
    /// to the sidecar (15020), so that port stays captured: a pod without
    /// a sidecar cannot forge a caller's identity to it (PERMISSIVE) or
    /// reach it at all (STRICT), and the pods are still ready.
    async fn probes_keep_the_serving_port_captured(
        lab: &Lab,
        dir: &std::path::Path,
        network: Network,
    ) {
        let c1 = lab.cluster("c1").unwrap().client.clone();
        let pods: Api<Pod> = Api::namespaced(c1.clone(), "demo");
        let echo = pods.get("echo-v1").await.unwrap();
        let probe = echo.spec.unwrap().containers[0]
            .readiness_probe
            .clone()
            .unwrap()
            .http_get
            .unwrap();
        assert_eq!(probe.path.as_deref(), Some("/app-health/echo/readyz"));
        assert_eq!(
            probe.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15020)
        );
        if network != Network::Namespaces {
            println!("loopback lab: no capture rules, so plaintext to the app is not tested here");
            return;
        }
        apply(lab, "c1", include_str!("../../examples/lab/outsider.yaml")).await;
        apply(lab, "c1", ECHO_STRICT).await;
        wait_ready(&c1, &["outsider", "echo-strict"]).await;
        let outsider = pod_dir(dir, "c1", "demo", "outsider");
        let ip = |pod: &str| -> std::net::IpAddr {
            std::fs::read_to_string(pod_dir(dir, "c1", "demo", pod).join("ip"))
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let seen_by = |pod| {
            let app = std::net::SocketAddr::new(ip(pod), 8080);
            let outsider = outsider.clone();
            async move { weft_lab::traffic::identity_seen_by_echo(&outsider, app).await }
        };
        let seen = seen_by("echo-v1").await;
        // The echo server reports "-" for a caller without an identity.
        assert_eq!(
            seen.as_deref(),
            Ok("-"),
            "a forged identity reached the app"
        );
        let refused = seen_by("echo-strict").await;
        assert!(
            refused.is_err(),
            "plaintext reached a STRICT pod's app: {refused:?}"
        );
        pods.delete("outsider", &DeleteParams::default())
            .await
            .unwrap();
        pods.delete("echo-strict", &DeleteParams::default())
            .await
            .unwrap();
    }

    /// An AuthorizationPolicy on echo, rewritten step by step.
    fn echo_policy(action: &str, rules: &str) -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: echo-policy, namespace: demo}}\nspec:\n  selector: {{matchLabels: {{app: echo}}}}\n  action: {action}\n{rules}"
        )
    }

    const DENY_ADMIN: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: demo}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#;

    const DRY_RUN_DENY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: trial-deny
  namespace: demo
  annotations: {istio.io/dry-run: "true"}
spec:
  action: DENY
  rules: [{}]
"#;

    const DENY_GET: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-get, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules: [{to: [{operation: {methods: [GET]}}]}]
"#;

    const DENY_TCP: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-tcp, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules: [{to: [{operation: {ports: ["9000"], methods: [GET]}}]}]
"#;

    /// A Service only c1's echo-v1 backs, declared in both clusters (each
    /// keeps its own Service object): c2's callers reach c1 through it.
    const ECHO_ONE: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: echo-one, namespace: demo}
spec:
  selector: {app: echo, version: v1}
  ports:
  - {name: http, port: 80, targetPort: 8080, appProtocol: http}
  - {name: tcp, port: 9000, targetPort: 9000, appProtocol: tcp}
"#;

    const STRICT_EXCEPT_9000: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: echo-tcp-open, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  portLevelMtls:
    "9000": {mode: PERMISSIVE}
"#;

    fn forbidden(answer: &weft_lab::traffic::Answer) -> bool {
        matches!(answer, Err(why) if why.contains(" 403") && why.contains("RBAC: access denied"))
    }

    async fn delete(lab: &Lab, cluster: &str, text: &str) {
        weft_lab::apply::delete_all(&lab.cluster(cluster).unwrap().client, text)
            .await
            .unwrap();
    }

    /// Istio's security policy, enforced by the destination's sidecar on
    /// real mTLS traffic: each step applies a policy and sees the next
    /// request decided by it, within a second.
    async fn security_policy_is_enforced(
        lab: &Lab,
        dir: &std::path::Path,
        network: Network,
        caller: &PodClient,
    ) {
        let c1 = lab.cluster("c1").unwrap().client.clone();
        let timed = |what: &'static str, started: Instant| {
            let took = started.elapsed();
            println!("policy: {what} in {:.0} ms", took.as_secs_f64() * 1000.0);
            assert!(took < Duration::from_secs(1), "{what} took {took:?}");
        };

        // An ALLOW policy without rules: nothing is allowed.
        let started = Instant::now();
        apply(lab, "c1", &echo_policy("ALLOW", "")).await;
        caller
            .until(Duration::from_secs(5), forbidden)
            .await
            .unwrap();
        timed("default deny", started);
        assert!(caller.batch(3).await.iter().all(forbidden));

        // Allowed by principal.
        let by_principal =
            "  rules:\n  - from: [{source: {principals: [cluster.local/ns/demo/sa/client]}}]\n";
        let started = Instant::now();
        apply(lab, "c1", &echo_policy("ALLOW", by_principal)).await;
        caller
            .until(Duration::from_secs(5), |a| a.is_ok())
            .await
            .unwrap();
        timed("allow by principal", started);

        // A DENY wins over the ALLOW; gone, the ALLOW rules again.
        apply(lab, "c1", DENY_GET).await;
        caller
            .until(Duration::from_secs(5), forbidden)
            .await
            .unwrap();
        delete(lab, "c1", DENY_GET).await;
        caller
            .until(Duration::from_secs(5), |a| a.is_ok())
            .await
            .unwrap();

        // Every rule kind, over real mTLS: an ALLOW that matches this
        // caller's request admits it, one that does not refuses it.
        let client_ip = std::fs::read_to_string(pod_dir(dir, "c1", "demo", "client").join("ip"))
            .unwrap()
            .trim()
            .to_string();
        let from = |source: &str| format!("  rules:\n  - from: [{{source: {{{source}}}}}]\n");
        let to = |operation: &str| format!("  rules:\n  - to: [{{operation: {{{operation}}}}}]\n");
        let when = |key: &str, values: &str| {
            format!("  rules:\n  - when: [{{key: \"{key}\", values: [{values}]}}]\n")
        };
        let me = format!("\"{client_ip}/32\"");
        let elsewhere = "\"192.0.2.0/24\"";
        let mut kinds: Vec<(&str, String, String)> = vec![
            (
                "principals",
                from("principals: [\"cluster.local/ns/demo/sa/client\"]"),
                from("principals: [\"cluster.local/ns/demo/sa/other\"]"),
            ),
            (
                "notPrincipals",
                from("notPrincipals: [\"*/sa/other\"]"),
                from("notPrincipals: [\"*/sa/client\"]"),
            ),
            (
                "namespaces",
                from("namespaces: [demo]"),
                from("namespaces: [prod]"),
            ),
            (
                "notNamespaces",
                from("notNamespaces: [prod]"),
                from("notNamespaces: [demo]"),
            ),
            (
                "hosts",
                to("hosts: [\"echo.demo*\"]"),
                to("hosts: [\"other.demo*\"]"),
            ),
            (
                "notHosts",
                to("notHosts: [\"other.demo*\"]"),
                to("notHosts: [\"echo.demo*\"]"),
            ),
            ("ports", to("ports: [\"8080\"]"), to("ports: [\"9999\"]")),
            (
                "notPorts",
                to("notPorts: [\"9999\"]"),
                to("notPorts: [\"8080\"]"),
            ),
            ("methods", to("methods: [GET]"), to("methods: [POST]")),
            (
                "notMethods",
                to("notMethods: [POST]"),
                to("notMethods: [GET]"),
            ),
            ("paths", to("paths: [\"/\"]"), to("paths: [\"/other\"]")),
            (
                "notPaths",
                to("notPaths: [\"/other\"]"),
                to("notPaths: [\"/\"]"),
            ),
            (
                "request.headers",
                when("request.headers[host]", "\"echo*\""),
                when("request.headers[host]", "\"other*\""),
            ),
            (
                "source.principal",
                when("source.principal", "\"*/sa/client\""),
                when("source.principal", "\"*/sa/other\""),
            ),
            (
                "source.namespace",
                when("source.namespace", "demo"),
                when("source.namespace", "prod"),
            ),
            (
                "destination.port",
                when("destination.port", "\"8080\""),
                when("destination.port", "\"9999\""),
            ),
        ];
        if network == Network::Namespaces {
            // Loopback labs share addresses between pods.
            kinds.extend([
                (
                    "ipBlocks",
                    from(&format!("ipBlocks: [{me}]")),
                    from(&format!("ipBlocks: [{elsewhere}]")),
                ),
                (
                    "notIpBlocks",
                    from(&format!("notIpBlocks: [{elsewhere}]")),
                    from(&format!("notIpBlocks: [{me}]")),
                ),
                (
                    "remoteIpBlocks",
                    from(&format!("remoteIpBlocks: [{me}]")),
                    from(&format!("remoteIpBlocks: [{elsewhere}]")),
                ),
                (
                    "notRemoteIpBlocks",
                    from(&format!("notRemoteIpBlocks: [{elsewhere}]")),
                    from(&format!("notRemoteIpBlocks: [{me}]")),
                ),
                (
                    "source.ip",
                    when("source.ip", &me),
                    when("source.ip", elsewhere),
                ),
                (
                    "remote.ip",
                    when("remote.ip", &me),
                    when("remote.ip", elsewhere),
                ),
            ]);
        }
        for (kind, admits, refuses) in &kinds {
            apply(lab, "c1", &echo_policy("ALLOW", admits)).await;
            caller
                .until(Duration::from_secs(5), |a| a.is_ok())
                .await
                .unwrap_or_else(|e| panic!("{kind}: the matching rule did not admit: {e}"));
            apply(lab, "c1", &echo_policy("ALLOW", refuses)).await;
            caller
                .until(Duration::from_secs(5), forbidden)
                .await
                .unwrap_or_else(|e| panic!("{kind}: the other rule did not refuse: {e}"));
        }
        println!(
            "policy: {} rule kinds each admitted and refused a caller",
            kinds.len()
        );
        apply(lab, "c1", &echo_policy("ALLOW", by_principal)).await;
        caller
            .until(Duration::from_secs(5), |a| a.is_ok())
            .await
            .unwrap();

        // Changes that do not concern this caller, under constant
        // traffic: no request fails.
        let steady = caller.clone();
        let traffic = tokio::spawn(async move {
            let mut answers = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline {
                answers.push(steady.once().await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answers
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        apply(lab, "c1", DENY_ADMIN).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        apply(
            lab,
            "c1",
            &echo_policy(
                "ALLOW",
                &format!("{by_principal}  - from: [{{source: {{namespaces: [prod]}}}}]\n"),
            ),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        delete(lab, "c1", DENY_ADMIN).await;
        let answers = traffic.await.unwrap();
        let failed: Vec<_> = answers.iter().filter(|a| a.is_err()).collect();
        println!(
            "policy: {} requests across 3 policy changes, {} failed",
            answers.len(),
            failed.len()
        );
        assert!(failed.is_empty(), "{failed:?}");

        // A dry-run DENY of everything is reported, not enforced.
        apply(lab, "c1", DRY_RUN_DENY).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(
            caller.batch(5).await.iter().all(|a| a.is_ok()),
            "a dry-run policy denied"
        );

        // The server's sidecar counts its decisions by policy.
        let echo_ip =
            std::fs::read_to_string(pod_dir(dir, "c1", "demo", "echo-v1").join("ip")).unwrap();
        let metrics_addr = std::net::SocketAddr::new(echo_ip.trim().parse().unwrap(), 15090);
        let metrics =
            weft_lab::apiserver::testing::http1(metrics_addr, "GET", "/stats/prometheus").await;
        for decision in [
            "decision=\"denied\"",
            "decision=\"allowed\"",
            "policy=\"demo/echo-policy\"",
            "decision=\"dry_run_denied\"",
        ] {
            assert!(
                metrics.lines().any(
                    |l| l.starts_with("weft_proxy_authorization_decisions_total")
                        && l.contains(decision)
                ),
                "no {decision} in the server's metrics"
            );
        }

        // Across clusters: c2's client (same trust domain) is allowed by
        // principal, then denied by namespace.
        let c2 = lab.cluster("c2").unwrap().client.clone();
        apply(lab, "c1", ECHO_ONE).await;
        apply(lab, "c2", ECHO_ONE).await;
        apply(lab, "c2", include_str!("../../examples/lab/client.yaml")).await;
        wait_ready(&c2, &["client"]).await;
        let remote = PodClient::new(
            &c2,
            &pod_dir(dir, "c2", "demo", "client"),
            "demo",
            "echo-one",
        )
        .await
        .unwrap();
        remote
            .until(Duration::from_secs(30), |a| a.is_ok())
            .await
            .unwrap();
        let answer = remote.once().await.unwrap();
        assert_eq!(answer["cluster"], "c1", "{answer:?}");
        assert_eq!(answer["peer"], CLIENT);
        apply(
            lab,
            "c1",
            &echo_policy(
                "ALLOW",
                "  rules:\n  - from: [{source: {namespaces: [prod]}}]\n",
            ),
        )
        .await;
        remote
            .until(Duration::from_secs(5), forbidden)
            .await
            .unwrap();
        apply(
            lab,
            "c1",
            &echo_policy(
                "ALLOW",
                "  rules:\n  - from: [{source: {namespaces: [demo]}}]\n",
            ),
        )
        .await;
        remote
            .until(Duration::from_secs(5), |a| a.is_ok())
            .await
            .unwrap();

        if network != Network::Namespaces {
            println!("loopback lab: no capture rules, so TCP and plaintext are not tested here");
        } else {
            // A TCP port: an open connection that a new DENY covers is
            // closed (the rule's HTTP-only `methods` is ignored on TCP, as
            // Istio does for DENY), and new ones are refused.
            let vip = Api::<k8s_openapi::api::core::v1::Service>::namespaced(c1.clone(), "demo")
                .get("echo-one")
                .await
                .unwrap()
                .spec
                .unwrap()
                .cluster_ip
                .unwrap();
            let target: std::net::SocketAddr = format!("{vip}:9000").parse().unwrap();
            let client_dir = pod_dir(dir, "c1", "demo", "client");
            let held = Held::from_pod(&client_dir, target).await.unwrap();
            assert_eq!(
                held.send("ping\n".into(), Some(5)).await.as_deref(),
                Ok("ping\n")
            );
            let started = Instant::now();
            apply(lab, "c1", DENY_TCP).await;
            let mut closed = false;
            while started.elapsed() < Duration::from_secs(3) && !closed {
                closed = held.send("ping\n".into(), Some(5)).await.is_err();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(closed, "the open connection outlived the DENY");
            timed("open TCP connection closed by a new DENY", started);
            let fresh = Held::from_pod(&client_dir, target).await;
            let refused = match fresh {
                Ok(fresh) => fresh.send("ping\n".into(), Some(5)).await.is_err(),
                Err(_) => true,
            };
            assert!(refused, "a new TCP connection got through the DENY");
            // HTTP on port 80 is not covered by it.
            caller
                .until(Duration::from_secs(5), |a| a.is_ok())
                .await
                .unwrap();
            delete(lab, "c1", DENY_TCP).await;
            delete(lab, "c1", &echo_policy("ALLOW", "")).await;

            // STRICT for the namespace, PERMISSIVE on echo's TCP port: a
            // pod without a sidecar reaches 9000 in plaintext, not 8080.
            apply(lab, "c1", include_str!("../../examples/lab/outsider.yaml")).await;
            wait_ready(&c1, &["outsider"]).await;
            apply(lab, "c1", STRICT_EXCEPT_9000).await;
            let outsider = pod_dir(dir, "c1", "demo", "outsider");
            let app = |port: u16| std::net::SocketAddr::new(echo_ip.trim().parse().unwrap(), port);
            let started = Instant::now();
            loop {
                let http = weft_lab::traffic::identity_seen_by_echo(&outsider, app(8080)).await;
                if http.is_err() {
                    break;
                }
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "plaintext still reaches 8080: {http:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            timed("namespace STRICT in force", started);
            let tcp = Held::from_pod(&outsider, app(9000)).await.unwrap();
            assert_eq!(
                tcp.send("open\n".into(), Some(5)).await.as_deref(),
                Ok("open\n"),
                "the PERMISSIVE port"
            );
            // Mesh traffic is mTLS, so it is unaffected.
            caller
                .until(Duration::from_secs(5), |a| a.is_ok())
                .await
                .unwrap();
            delete(lab, "c1", STRICT_EXCEPT_9000).await;
            delete(lab, "c1", include_str!("../../examples/lab/outsider.yaml")).await;
        }
        delete(lab, "c1", &echo_policy("ALLOW", "")).await;
        delete(lab, "c1", DRY_RUN_DENY).await;
        delete(lab, "c2", include_str!("../../examples/lab/client.yaml")).await;
        delete(lab, "c1", ECHO_ONE).await;
        delete(lab, "c2", ECHO_ONE).await;
        caller
            .until(Duration::from_secs(5), |a| a.is_ok())
            .await
            .unwrap();
    }

    async fn scenario(binaries: Binaries, network: Network, dir: std::path::PathBuf) {
        let mut lab = Lab::up(LabOptions::two_clusters(network, dir.clone(), binaries))
            .await
            .unwrap();
        let common = include_str!("../../examples/lab/demo-common.yaml");
        apply(&lab, "c1", common).await;
        apply(&lab, "c2", common).await;
        apply(&lab, "c1", include_str!("../../examples/lab/echo-c1.yaml")).await;
        apply(&lab, "c1", include_str!("../../examples/lab/client.yaml")).await;
        apply(&lab, "c2", include_str!("../../examples/lab/echo-c2.yaml")).await;
        let c1 = lab.cluster("c1").unwrap().client.clone();
        wait_ready(&c1, &["echo-v1", "client"]).await;
        wait_ready(&lab.cluster("c2").unwrap().client, &["echo-v2"]).await;
        let caller = echo_caller(&lab, &dir).await;

        // Local first, with the caller's identity at the server.
        let answers = caller.batch(20).await;
        assert_eq!(by_cluster(&answers).get("c1"), Some(&20), "{answers:?}");
        for answer in &answers {
            assert_eq!(answer.as_ref().unwrap()["peer"], CLIENT);
        }
        observe::access_logs_and_traces_follow_a_request(&dir, &caller, CLIENT).await;

        probes_keep_the_serving_port_captured(&lab, &dir, network).await;
        security_policy_is_enforced(&lab, &dir, network, &caller).await;
        observe::the_dashboard_and_the_reference_match_what_is_exported(&lab, &dir).await;
        traffic::traffic_policy_is_applied(&lab, &dir, network, &caller).await;
        scope::draining_moves_traffic_and_fails_nothing(&lab, &caller).await;
        scope::scope_annotations_decide_which_clusters_serve(&lab, &caller).await;
        scope::names_resolve_in_the_sidecar(&lab, &dir, network).await;
        scope::service_exports_serve_clusterset_names(&lab, &dir, network, &caller).await;

        // Failover: c1's echo is deleted as Kubernetes deletes a pod (a
        // grace period, its endpoint terminating, SIGTERM): no request fails
        // and traffic is on c2 within half a second.
        let pods: Api<Pod> = Api::namespaced(c1.clone(), "demo");
        pods.delete("echo-v1", &DeleteParams::default())
            .await
            .unwrap();
        let failover = caller
            .until_stable("c2", Duration::from_secs(30))
            .await
            .unwrap();
        println!(
            "failover to c2: {:.2} s, {} failed requests",
            failover.after.as_secs_f64(),
            failover.errors
        );
        assert_eq!(failover.errors, 0, "requests failed during failover");
        assert!(
            failover.after < Duration::from_millis(500),
            "failover took {:?}",
            failover.after
        );

        // The remote secret for c2 goes: c2's endpoints leave c1's view
        // within a second (with c1's echo gone, requests then fail)...
        lab.cluster("c1")
            .unwrap()
            .remove_remote("c2")
            .await
            .unwrap();
        let started = Instant::now();
        caller
            .until(Duration::from_secs(5), |a| a.is_err())
            .await
            .unwrap();
        let gone_in = started.elapsed();
        println!(
            "c2's endpoints unused {:.2} s after its secret was deleted",
            gone_in.as_secs_f64()
        );
        assert!(gone_in < Duration::from_secs(1), "took {gone_in:?}");
        assert!(
            caller.batch(5).await.iter().all(|a| a.is_err()),
            "c2 still used"
        );
        // ...and come back when it is re-applied.
        let c2 = lab.clusters.iter().find(|c| c.name() == "c2").unwrap();
        lab.cluster("c1").unwrap().add_remote(c2).await.unwrap();
        let settled = caller
            .until_stable("c2", Duration::from_secs(30))
            .await
            .unwrap();
        println!(
            "c2 used again {:.2} s after its secret came back",
            settled.after.as_secs_f64()
        );

        // Restored: traffic returns to c1.
        apply(&lab, "c1", include_str!("../../examples/lab/echo-c1.yaml")).await;
        wait_ready(&c1, &["echo-v1"]).await;
        let back = caller
            .until_stable("c1", Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(back.errors, 0, "coming back must not fail requests");

        // c1's control plane restarts under steady traffic: nothing fails.
        let steady = caller.clone();
        let traffic = tokio::spawn(async move {
            let mut answers = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(6);
            while Instant::now() < deadline {
                answers.push(steady.once().await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            answers
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        lab.cluster_mut("c1")
            .unwrap()
            .start_control()
            .await
            .unwrap();
        let answers = traffic.await.unwrap();
        let failed: Vec<_> = answers.iter().filter(|a| a.is_err()).collect();
        println!(
            "{} requests across the control-plane restart, {} failed",
            answers.len(),
            failed.len()
        );
        assert!(failed.is_empty(), "{failed:?}");
        assert!(answers.len() > 50);

        lab.down().await;
    }
}
