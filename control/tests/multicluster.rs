//! weft-control against lab API servers: clusters merged, remote secrets
//! through their whole lifecycle, a remote that dies, delta xDS semantics and
//! the CA. Each test builds its own clusters on loopback.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use prost::Message;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_apiserver::testing::{eventually, token};
use weft_apiserver::{ApiServer, ApiServerConfig};
use weft_control::hub::Debounce;
use weft_control::{Config, ControlPlane};
use weft_xds_proto::discovery::DeltaDiscoveryRequest;
use weft_xds_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weft_xds_proto::{mesh, type_url};

/// A lab cluster: its API server and an admin client.
struct Lab {
    server: ApiServer,
    client: kube::Client,
}

async fn client_for(kubeconfig: &str) -> kube::Client {
    weft_apiserver::client_for(kubeconfig).await.unwrap()
}

impl Lab {
    async fn start(name: &str) -> Lab {
        Self::start_with(ApiServerConfig {
            cluster_name: name.into(),
            ..Default::default()
        })
        .await
    }

    async fn start_with(config: ApiServerConfig) -> Lab {
        let server = ApiServer::start(config).await.unwrap();
        let client = client_for(server.kubeconfig()).await;
        let lab = Lab { server, client };
        for ns in ["weft-system", "demo"] {
            lab.namespace(ns).await;
        }
        lab
    }

    async fn namespace(&self, name: &str) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        let ns = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
        let _ = api.create(&PostParams::default(), &ns).await;
    }

    async fn service(&self, name: &str, cluster_local: bool) {
        let api: Api<Service> = Api::namespaced(self.client.clone(), "demo");
        let annotations = if cluster_local {
            json!({"weft.io/cluster-local": "true"})
        } else {
            json!({})
        };
        let svc = serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": annotations},
            "spec": {"selector": {"app": name}, "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        }))
        .unwrap();
        api.create(&PostParams::default(), &svc).await.unwrap();
    }

    /// A ready pod backing `service`, with its EndpointSlice.
    async fn workload(&self, service: &str, pod: &str, ip: &str) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), "demo");
        let object = serde_json::from_value(json!({
            "metadata": {"name": pod, "labels": {"app": service}, "annotations": {"sidecar.weft.io/status": "{}"}},
            "spec": {"serviceAccountName": "echo", "nodeName": "node-1", "containers": [{"name": "app", "image": "echo"}]},
        }))
        .unwrap();
        pods.create(&PostParams::default(), &object).await.unwrap();
        pods.patch_status(
            pod,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "conditions": [{"type": "Ready", "status": "True"}]}})),
        )
        .await
        .unwrap();
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), "demo");
        let slice = serde_json::from_value(json!({
            "metadata": {"name": format!("{pod}-slice"), "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true}, "targetRef": {"kind": "Pod", "name": pod, "namespace": "demo"}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        }))
        .unwrap();
        slices.create(&PostParams::default(), &slice).await.unwrap();
    }

    async fn remove_workload(&self, pod: &str) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), "demo");
        // Forced, as nothing plays the kubelet here.
        pods.delete(pod, &DeleteParams::default().grace_period(0))
            .await
            .unwrap();
        let slices: Api<EndpointSlice> = Api::namespaced(self.client.clone(), "demo");
        slices
            .delete(&format!("{pod}-slice"), &DeleteParams::default())
            .await
            .unwrap();
    }

    /// A kubeconfig for this cluster with a service-account token, as
    /// `weftctl create-remote-secret` makes.
    async fn reader_kubeconfig(&self, account: &str) -> String {
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), "weft-system");
        let sa = serde_json::from_value(json!({"metadata": {"name": account}})).unwrap();
        let _ = accounts.create(&PostParams::default(), &sa).await;
        let token = token(&self.client, "weft-system", account, None, 3600)
            .await
            .unwrap();
        self.server
            .kubeconfig()
            .replace(self.server.admin_token(), &token)
    }
}

/// Sets (or with `None` removes) one entry of a remote secret in `lab`.
async fn remote_secret(lab: &Lab, secret: &str, entries: BTreeMap<&str, Option<String>>) {
    let api: Api<Secret> = Api::namespaced(lab.client.clone(), "weft-system");
    let data: serde_json::Map<String, serde_json::Value> = entries
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k.to_string(), json!(v))))
        .collect();
    let object = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": secret, "namespace": "weft-system", "labels": {"weft.io/multicluster": "true"}},
        "stringData": data,
    });
    match api.get_opt(secret).await.unwrap() {
        Some(existing) => {
            // Replaced in one write, as `kubectl apply` would: a delete and
            // create would briefly free the ids for another Secret.
            let mut object = object;
            object["metadata"]["resourceVersion"] = json!(existing.metadata.resource_version);
            api.replace(
                secret,
                &PostParams::default(),
                &serde_json::from_value(object).unwrap(),
            )
            .await
            .unwrap();
        }
        None => {
            api.create(
                &PostParams::default(),
                &serde_json::from_value(object).unwrap(),
            )
            .await
            .unwrap();
        }
    }
}

/// Pushes within a second, so tests do not wait on the default 10 s.
fn quick_debounce() -> Debounce {
    Debounce {
        quiet: Duration::from_millis(50),
        max_delay: Duration::from_secs(1),
    }
}

async fn control_plane(lab: &Lab, id: &str) -> ControlPlane {
    let mut config = Config::new(id);
    config.xds_plain_addr = Some("127.0.0.1:0".parse().unwrap());
    config.xds_tls_addr = Some("127.0.0.1:0".parse().unwrap());
    config.monitoring_addr = Some("127.0.0.1:0".parse().unwrap());
    config.remote_timeout = Duration::from_secs(2);
    config.debounce = quick_debounce();
    ControlPlane::start(config, lab.client.clone())
        .await
        .unwrap()
}

/// What a test xDS client has received.
#[derive(Default)]
struct Seen {
    workloads: BTreeMap<String, (String, mesh::Workload)>,
    services: BTreeMap<String, (String, mesh::Service)>,
    authorizations: BTreeMap<String, mesh::Authorization>,
    route_sets: BTreeMap<String, mesh::RouteSet>,
    destinations: BTreeMap<String, mesh::DestinationPolicy>,
    gateways: BTreeMap<String, mesh::NetworkGateway>,
    /// Every removal ever received, in order.
    removed: Vec<String>,
    /// Services that arrived before any workload bound to them.
    without_endpoints: Vec<String>,
    responses: Vec<(String, usize, usize)>,
}

/// A delta xDS client that ACKs everything (or NACKs on request) and keeps
/// what it was sent.
struct XdsClient {
    requests: mpsc::Sender<DeltaDiscoveryRequest>,
    seen: Arc<Mutex<Seen>>,
    nack_next: Arc<Mutex<bool>>,
}

impl XdsClient {
    async fn connect(
        addr: std::net::SocketAddr,
        initial: BTreeMap<&'static str, BTreeMap<String, String>>,
    ) -> XdsClient {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Self::over(channel, initial).await
    }

    async fn over(
        channel: tonic::transport::Channel,
        initial: BTreeMap<&'static str, BTreeMap<String, String>>,
    ) -> XdsClient {
        let (requests, outbound) = mpsc::channel(16);
        for url in type_url::ALL {
            requests
                .send(DeltaDiscoveryRequest {
                    node: Some(weft_xds_proto::envoy::config::core::v3::Node {
                        id: "sidecar~10.0.0.1~test.demo~demo.svc.cluster.local".into(),
                        ..Default::default()
                    }),
                    type_url: url.into(),
                    initial_resource_versions: initial
                        .get(url)
                        .cloned()
                        .unwrap_or_default()
                        .into_iter()
                        .collect(),
                    ..Default::default()
                })
                .await
                .unwrap();
        }
        let mut client = AggregatedDiscoveryServiceClient::new(channel)
            .max_decoding_message_size(64 * 1024 * 1024);
        let mut responses = client
            .delta_aggregated_resources(ReceiverStream::new(outbound))
            .await
            .unwrap()
            .into_inner();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let nack_next = Arc::new(Mutex::new(false));
        let (seen2, nack2, acks) = (seen.clone(), nack_next.clone(), requests.clone());
        tokio::spawn(async move {
            while let Ok(Some(response)) = responses.message().await {
                let nack = std::mem::take(&mut *nack2.lock().unwrap());
                if !nack {
                    let mut seen = seen2.lock().unwrap();
                    seen.responses.push((
                        response.type_url.clone(),
                        response.resources.len(),
                        response.removed_resources.len(),
                    ));
                    for resource in &response.resources {
                        let body = resource.resource.as_ref().unwrap().value.as_slice();
                        if response.type_url == type_url::WORKLOAD {
                            let w = mesh::Workload::decode(body).unwrap();
                            seen.workloads
                                .insert(resource.name.clone(), (resource.version.clone(), w));
                        } else if response.type_url == type_url::AUTHORIZATION {
                            let a = mesh::Authorization::decode(body).unwrap();
                            seen.authorizations.insert(resource.name.clone(), a);
                        } else if response.type_url == type_url::ROUTE_SET {
                            let r = mesh::RouteSet::decode(body).unwrap();
                            seen.route_sets.insert(resource.name.clone(), r);
                        } else if response.type_url == type_url::DESTINATION_POLICY {
                            let d = mesh::DestinationPolicy::decode(body).unwrap();
                            seen.destinations.insert(resource.name.clone(), d);
                        } else if response.type_url == type_url::NETWORK_GATEWAY {
                            let g = mesh::NetworkGateway::decode(body).unwrap();
                            seen.gateways.insert(resource.name.clone(), g);
                        } else {
                            let s = mesh::Service::decode(body).unwrap();
                            let bound = seen
                                .workloads
                                .values()
                                .any(|(_, w)| w.services.iter().any(|b| b.hostname == s.hostname));
                            if !bound {
                                seen.without_endpoints.push(s.hostname.clone());
                            }
                            seen.services
                                .insert(resource.name.clone(), (resource.version.clone(), s));
                        }
                    }
                    for name in &response.removed_resources {
                        seen.workloads.remove(name);
                        seen.services.remove(name);
                        seen.authorizations.remove(name);
                        seen.route_sets.remove(name);
                        seen.destinations.remove(name);
                        seen.gateways.remove(name);
                        seen.removed.push(name.clone());
                    }
                }
                let ack = DeltaDiscoveryRequest {
                    type_url: response.type_url.clone(),
                    response_nonce: response.nonce.clone(),
                    error_detail: nack.then(|| weft_xds_proto::google::rpc::Status {
                        code: 3,
                        message: "test proxy refuses this push".into(),
                        details: vec![],
                    }),
                    ..Default::default()
                };
                if acks.send(ack).await.is_err() {
                    break;
                }
            }
        });
        XdsClient {
            requests,
            seen,
            nack_next,
        }
    }

    fn workload_names(&self) -> BTreeSet<String> {
        self.seen
            .lock()
            .unwrap()
            .workloads
            .keys()
            .cloned()
            .collect()
    }

    fn workload(&self, uid: &str) -> Option<mesh::Workload> {
        self.seen
            .lock()
            .unwrap()
            .workloads
            .get(uid)
            .map(|(_, w)| w.clone())
    }

    fn authorization(&self, name: &str) -> Option<mesh::Authorization> {
        self.seen.lock().unwrap().authorizations.get(name).cloned()
    }

    fn route_set(&self, name: &str) -> Option<mesh::RouteSet> {
        self.seen.lock().unwrap().route_sets.get(name).cloned()
    }

    fn destination(&self, name: &str) -> Option<mesh::DestinationPolicy> {
        self.seen.lock().unwrap().destinations.get(name).cloned()
    }

    fn gateway(&self, name: &str) -> Option<mesh::NetworkGateway> {
        self.seen.lock().unwrap().gateways.get(name).cloned()
    }

    fn service(&self, name: &str) -> Option<mesh::Service> {
        self.seen
            .lock()
            .unwrap()
            .services
            .get(name)
            .map(|(_, s)| s.clone())
    }

    fn versions(&self) -> BTreeMap<&'static str, BTreeMap<String, String>> {
        let seen = self.seen.lock().unwrap();
        BTreeMap::from([
            (
                type_url::WORKLOAD,
                seen.workloads
                    .iter()
                    .map(|(k, (v, _))| (k.clone(), v.clone()))
                    .collect(),
            ),
            (
                type_url::SERVICE,
                seen.services
                    .iter()
                    .map(|(k, (v, _))| (k.clone(), v.clone()))
                    .collect(),
            ),
        ])
    }
}

const ECHO: &str = "demo/echo.demo.svc.cluster.local";

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_clusters_merge_and_changes_propagate() {
    let c1 = Lab::start("c1").await;
    let c2 = Lab::start("c2").await;
    let c3 = Lab::start("c3").await;
    for (lab, ip) in [(&c1, "10.1.0.5"), (&c2, "10.2.0.5"), (&c3, "10.3.0.5")] {
        lab.service("echo", false).await;
        lab.service(
            "local-only",
            lab.server.kubeconfig() == c2.server.kubeconfig(),
        )
        .await;
        lab.workload("echo", &format!("echo-{ip}"), ip).await;
    }
    c1.workload("local-only", "lo-c1", "10.1.0.9").await;
    c2.workload("local-only", "lo-c2", "10.2.0.9").await;
    let control = control_plane(&c1, "c1").await;
    remote_secret(
        &c1,
        "remote-c2",
        BTreeMap::from([("c2", Some(c2.reader_kubeconfig("reader").await))]),
    )
    .await;
    remote_secret(
        &c1,
        "remote-c3",
        BTreeMap::from([("c3", Some(c3.reader_kubeconfig("reader").await))]),
    )
    .await;
    let client = XdsClient::connect(control.xds_plain_addr.unwrap(), BTreeMap::new()).await;

    eventually("all three clusters' workloads", || async {
        client.workload_names().is_superset(&names(&[
            "c1/demo/echo-10.1.0.5",
            "c2/demo/echo-10.2.0.5",
            "c3/demo/echo-10.3.0.5",
        ]))
    })
    .await;
    eventually("echo merged with three VIPs", || async {
        client.service(ECHO).is_some_and(|s| s.vips.len() == 3)
    })
    .await;
    let w = client.workload("c2/demo/echo-10.2.0.5").unwrap();
    assert_eq!(w.cluster_id, "c2");
    assert_eq!(w.addresses, vec![vec![10, 2, 0, 5]]);
    assert_eq!(w.identity.unwrap().service_account, "echo");
    assert_eq!(w.tunnel_protocol, mesh::TunnelProtocol::Hbone as i32);
    assert_eq!(w.services[0].hostname, "echo.demo.svc.cluster.local");

    // c2 marks local-only as cluster-local (global: false): c2 keeps its
    // endpoints to itself, so c2's pod does not back it for c1's proxies;
    // c1 and c3, global by default, still merge theirs (Cilium's
    // per-cluster semantics, docs/services.md).
    let local = client
        .service("demo/local-only.demo.svc.cluster.local")
        .unwrap();
    assert_eq!(local.clusters, ["c1", "c3"]);
    assert!(!local.cluster_local);
    eventually("c2's local-only pod without the binding", || async {
        client
            .workload("c2/demo/lo-c2")
            .is_some_and(|w| w.services.is_empty())
    })
    .await;

    // A pod added in c3 reaches the client; its removal too.
    c3.workload("echo", "echo-new", "10.3.0.6").await;
    eventually("new c3 pod", || async {
        client.workload("c3/demo/echo-new").is_some()
    })
    .await;
    c3.remove_workload("echo-new").await;
    eventually("c3 pod removed", || async {
        client.workload("c3/demo/echo-new").is_none()
    })
    .await;

    // Monitoring answers.
    let monitoring = control.monitoring_addr.unwrap();
    let metrics = http_get(monitoring, "/metrics").await;
    assert!(
        metrics.contains("weft_control_managed_clusters 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("weft_control_connected_proxies 1"),
        "{metrics}"
    );
    let ready = http_get(monitoring, "/ready").await;
    assert!(ready.starts_with("ready"), "{ready}");
    let clusters = http_get(monitoring, "/debug/clusters").await;
    assert!(clusters.contains("\"id\":\"c3\""), "{clusters}");
}

/// The body of a GET on a monitoring port.
async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    let answer = weft_apiserver::testing::http1(addr, "GET", path).await;
    answer
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// Two clusters, each with the echo service and one pod of it: a1 in c1,
/// b1 in c2.
async fn two_clusters_with_echo() -> (Lab, Lab) {
    let c1 = Lab::start("c1").await;
    let c2 = Lab::start("c2").await;
    c1.service("echo", false).await;
    c2.service("echo", false).await;
    c1.workload("echo", "a1", "10.1.0.5").await;
    c2.workload("echo", "b1", "10.2.0.5").await;
    (c1, c2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_secret_lifecycle() {
    let (c1, c2) = two_clusters_with_echo().await;
    let control = control_plane(&c1, "c1").await;
    let client = XdsClient::connect(control.xds_plain_addr.unwrap(), BTreeMap::new()).await;
    eventually("local workload", || async {
        client.workload("c1/demo/a1").is_some()
    })
    .await;

    // Add.
    let first = c2.reader_kubeconfig("reader-1").await;
    remote_secret(
        &c1,
        "remote-c2",
        BTreeMap::from([("c2", Some(first.clone()))]),
    )
    .await;
    eventually("c2 added", || async {
        client.workload("c2/demo/b1").is_some()
    })
    .await;

    // Refusals: the local id, a duplicate id, malformed YAML, an exec
    // kubeconfig. Each is counted; c2 is unaffected.
    let exec = first.replace(
        "    token: ",
        "    exec:\n      command: /bin/sh\n      apiVersion: client.authentication.k8s.io/v1\n    token: ",
    );
    remote_secret(
        &c1,
        "bad",
        BTreeMap::from([
            ("c1", Some(first.clone())),
            ("c2", Some(first.clone())),
            ("c9", Some("::: this is [not yaml".into())),
            ("c8", Some(exec)),
        ]),
    )
    .await;
    let monitoring = control.monitoring_addr.unwrap();
    eventually("refusals counted", || async {
        let m = http_get(monitoring, "/metrics").await;
        [
            "local-cluster",
            "duplicate-cluster-id",
            "invalid-kubeconfig",
        ]
        .iter()
        .all(|reason| m.contains(&format!("reason=\"{reason}\"")))
            && m.contains(
                "weft_control_rejected_remote_secrets_total{reason=\"invalid-kubeconfig\"} 2",
            )
    })
    .await;
    assert!(client.workload("c2/demo/b1").is_some());
    assert_eq!(
        control
            .hub
            .model()
            .cluster_status()
            .iter()
            .map(|c| c.id.as_str())
            .collect::<Vec<_>>(),
        ["c1", "c2"]
    );
    // Its valid duplicate would take c2 over once remote-c2 goes; remove it.
    let secrets: Api<Secret> = Api::namespaced(c1.client.clone(), "weft-system");
    secrets
        .delete("bad", &DeleteParams::default())
        .await
        .unwrap();

    // Rotate: a new token. B's workload must never be removed meanwhile.
    let removed_before = client.seen.lock().unwrap().removed.len();
    let second = c2.reader_kubeconfig("reader-2").await;
    assert_ne!(first, second);
    remote_secret(&c1, "remote-c2", BTreeMap::from([("c2", Some(second))])).await;
    eventually("rotation switched", || async {
        let status = control.hub.model().cluster_status();
        status
            .iter()
            .any(|c| c.id == "c2" && c.generation > 1 && !c.rotating)
    })
    .await;
    // The new client sees changes.
    c2.workload("echo", "b2", "10.2.0.6").await;
    eventually("b2 via the new client", || async {
        client.workload("c2/demo/b2").is_some()
    })
    .await;
    let removed: Vec<String> = client.seen.lock().unwrap().removed[removed_before..].to_vec();
    assert!(
        !removed.iter().any(|r| r.starts_with("c2/")),
        "c2 workloads vanished during rotation: {removed:?}"
    );

    // Delete: gone within a second.
    let api: Api<Secret> = Api::namespaced(c1.client.clone(), "weft-system");
    let started = std::time::Instant::now();
    api.delete("remote-c2", &DeleteParams::default())
        .await
        .unwrap();
    eventually("c2 gone", || async {
        client.workload("c2/demo/b1").is_none() && client.workload("c2/demo/b2").is_none()
    })
    .await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "removal took {took:?}");
    assert!(
        client.workload("c1/demo/a1").is_some(),
        "the local cluster is untouched"
    );
    eventually("echo without c2", || async {
        client.service(ECHO).is_some_and(|s| s.clusters == ["c1"])
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_remote_is_stale_not_blocking_and_recovers() {
    let c1 = Lab::start("c1").await;
    let dir = tempfile::tempdir().unwrap();
    let c2 = Lab::start_with(ApiServerConfig {
        cluster_name: "c2".into(),
        dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    })
    .await;
    c1.service("echo", false).await;
    c2.service("echo", false).await;
    c1.workload("echo", "a1", "10.1.0.5").await;
    c2.workload("echo", "b1", "10.2.0.5").await;
    let kubeconfig = c2.reader_kubeconfig("reader").await;
    let control = control_plane(&c1, "c1").await;
    // A remote that never answers must not hold readiness past its timeout.
    let dead = kubeconfig.replace(&c2.server.addr().port().to_string(), "1");
    remote_secret(&c1, "never", BTreeMap::from([("c9", Some(dead))])).await;
    remote_secret(&c1, "remote-c2", BTreeMap::from([("c2", Some(kubeconfig))])).await;
    let client = XdsClient::connect(control.xds_plain_addr.unwrap(), BTreeMap::new()).await;
    eventually("c2 synced", || async {
        client.workload("c2/demo/b1").is_some_and(|w| !w.stale)
    })
    .await;
    eventually("ready despite the dead remote", || async {
        control.ready(Duration::from_secs(2))
    })
    .await;

    // Kill c2's API server.
    let addr = c2.server.addr();
    c2.server.stop().await;
    eventually("c2 workloads flagged stale, still served", || async {
        client.workload("c2/demo/b1").is_some_and(|w| w.stale)
    })
    .await;
    assert!(control.ready(Duration::from_secs(2)));
    assert!(client.workload("c1/demo/a1").is_some_and(|w| !w.stale));
    let metrics = http_get(control.monitoring_addr.unwrap(), "/metrics").await;
    assert!(
        metrics.contains("weft_control_cluster_stale{cluster=\"c2\"} 1"),
        "{metrics}"
    );

    // Bring it back on the same address: stale clears.
    let _back = ApiServer::start(ApiServerConfig {
        addr,
        cluster_name: "c2".into(),
        dir: Some(dir.path().to_path_buf()),
        ..Default::default()
    })
    .await
    .unwrap();
    eventually("c2 recovered", || async {
        client.workload("c2/demo/b1").is_some_and(|w| !w.stale)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_xds_ack_nack_and_resume() {
    let c1 = Lab::start("c1").await;
    c1.service("echo", false).await;
    c1.workload("echo", "a1", "10.1.0.5").await;
    c1.workload("echo", "a2", "10.1.0.6").await;
    let control = control_plane(&c1, "c1").await;
    let addr = control.xds_plain_addr.unwrap();
    let client = XdsClient::connect(addr, BTreeMap::new()).await;
    eventually("initial state", || async {
        client.workload_names() == names(&["c1/demo/a1", "c1/demo/a2"])
    })
    .await;
    let versions = client.versions();
    drop(client);

    // Reconnect with what the first stream had, minus one entry made stale
    // and plus one that no longer exists: only the difference is sent.
    let mut initial = versions.clone();
    let workloads = initial.get_mut(type_url::WORKLOAD).unwrap();
    workloads.insert("c1/demo/a2".into(), "0".into());
    workloads.insert("c1/demo/gone".into(), "7".into());
    let resumed = XdsClient::connect(addr, initial).await;
    eventually("difference resent", || async {
        let seen = resumed.seen.lock().unwrap();
        seen.workloads.contains_key("c1/demo/a2")
            && seen.removed.contains(&"c1/demo/gone".to_string())
    })
    .await;
    {
        let seen = resumed.seen.lock().unwrap();
        assert!(
            !seen.workloads.contains_key("c1/demo/a1"),
            "a1 was current and must not be resent"
        );
        assert!(
            seen.services.is_empty(),
            "services were current and must not be resent"
        );
    }

    // A NACK is counted; the next change still arrives.
    *resumed.nack_next.lock().unwrap() = true;
    c1.workload("echo", "a3", "10.1.0.7").await;
    let monitoring = control.monitoring_addr.unwrap();
    eventually("NACK counted", || async {
        http_get(monitoring, "/metrics")
            .await
            .contains("weft_control_xds_nacks_total 1")
    })
    .await;
    c1.workload("echo", "a4", "10.1.0.8").await;
    eventually("pushes continue after a NACK", || async {
        resumed.workload("c1/demo/a4").is_some()
    })
    .await;

    // A burst of changes becomes a handful of pushes.
    let before = resumed.seen.lock().unwrap().responses.len();
    for i in 0..40 {
        c1.workload("echo", &format!("burst-{i}"), &format!("10.1.1.{i}"))
            .await;
    }
    eventually("burst delivered", || async {
        let have = resumed.workload_names();
        (0..40).all(|i| have.contains(&format!("c1/demo/burst-{i}")))
    })
    .await;
    let pushes = resumed.seen.lock().unwrap().responses.len() - before;
    assert!(pushes < 20, "40 pods took {pushes} pushes");
    let _ = resumed.requests.capacity();
}

/// A gRPC channel over TLS to `addr` that verifies the control plane's
/// SPIFFE identity (`config` decides whether a client certificate goes too).
async fn tls_channel(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> tonic::transport::Channel {
    tls_channel_from(addr, config, None).await.unwrap()
}

/// As [`tls_channel`], from the local address `from` when given.
async fn tls_channel_from(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
    from: Option<std::net::IpAddr>,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let config = config.clone();
            async move {
                let socket = tokio::net::TcpSocket::new_v4()?;
                if let Some(ip) = from {
                    socket.bind(std::net::SocketAddr::new(ip, 0))?;
                }
                let tcp = socket.connect(addr).await?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(weft_certs::tls::mesh_server_name(addr.ip()), tcp)
                    .await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_signs_only_the_callers_own_identity() {
    use weft_certs::tls::{self, TrustBundle};
    use weft_certs::{Identity, WorkloadCert, WorkloadKey};
    use weft_xds_proto::ca::CreateCertificateRequest;
    use weft_xds_proto::ca::certificate_service_client::CertificateServiceClient;

    let c1 = Lab::start("c1").await;
    let accounts: Api<ServiceAccount> = Api::namespaced(c1.client.clone(), "demo");
    let sa = serde_json::from_value(json!({"metadata": {"name": "echo"}})).unwrap();
    accounts.create(&PostParams::default(), &sa).await.unwrap();
    // Tokens asked for in the same second are the same text unless their
    // lifetimes differ.
    let token_for = |audience: &'static str, seconds: i64| {
        let client = c1.client.clone();
        async move {
            token(&client, "demo", "echo", Some(audience), seconds)
                .await
                .unwrap()
        }
    };
    let token = |audience: &'static str| token_for(audience, 3600);
    let control = control_plane(&c1, "c1").await;
    let bundle = TrustBundle::from_pem(&control.ca.roots_pem()).unwrap();
    let control_identity = Identity::new("cluster.local", "weft-system", "weft-control").unwrap();

    let channel = |config| tls_channel(control.xds_tls_addr.unwrap(), config);
    let anonymous =
        tls::client_config_without_certificate(&bundle, vec![control_identity.clone()]).unwrap();
    let mut ca = CertificateServiceClient::new(channel(anonymous).await);
    let me = Identity::new("cluster.local", "demo", "echo").unwrap();
    let key = WorkloadKey::generate().unwrap();
    let ask = |csr: String, token: String| {
        let mut request = tonic::Request::new(CreateCertificateRequest {
            csr,
            validity_seconds: 3600,
        });
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    };

    let good = ca
        .create_certificate(ask(key.csr_pem(&me).unwrap(), token("weft-ca").await))
        .await
        .unwrap()
        .into_inner();
    let cert = WorkloadCert::from_pem(&good.cert_chain, &key).unwrap();
    assert_eq!(cert.identity(), &me);

    let other = Identity::new("cluster.local", "demo", "admin").unwrap();
    let err = ca
        .create_certificate(ask(key.csr_pem(&other).unwrap(), token("weft-ca").await))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    let err = ca
        .create_certificate(ask(key.csr_pem(&me).unwrap(), "not-a-token".into()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    let err = ca
        .create_certificate(ask(
            key.csr_pem(&me).unwrap(),
            token("some-other-audience").await,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    let stale_token = token_for("weft-ca", 5400).await;
    let reviewed_token = token_for("weft-ca", 7200).await;
    ca.create_certificate(ask(key.csr_pem(&me).unwrap(), reviewed_token.clone()))
        .await
        .unwrap();
    accounts
        .delete("echo", &DeleteParams::default())
        .await
        .unwrap();
    let err = ca
        .create_certificate(ask(key.csr_pem(&me).unwrap(), stale_token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    // A reviewed token is remembered until it expires, without another
    // TokenReview: the account's deletion is not seen for it.
    ca.create_certificate(ask(key.csr_pem(&me).unwrap(), reviewed_token.clone()))
        .await
        .expect("a reviewed token is served from the cache");

    // Four refusals so far from this address; at ten, it is not heard for
    // the rest of the minute, even with a good token.
    for _ in 0..6 {
        let err = ca
            .create_certificate(ask(key.csr_pem(&me).unwrap(), "not-a-token".into()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
        assert_eq!(err.message(), "token rejected", "no reviewer text echoed");
    }
    let err = ca
        .create_certificate(ask(key.csr_pem(&me).unwrap(), reviewed_token))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");

    // The certificate opens an mTLS xDS stream to the same port.
    c1.service("echo", false).await;
    c1.workload("echo", "a1", "10.1.0.5").await;
    let certs = tls::CertStore::new(&cert).unwrap();
    let mtls = tls::client_config(&certs, &bundle, vec![control_identity]).unwrap();
    let client = XdsClient::over(channel(mtls).await, BTreeMap::new()).await;
    eventually("workloads over mTLS", || async {
        client.workload("c1/demo/a1").is_some()
    })
    .await;
}

/// The install manifests applied to a lab API server whose mutating
/// admission calls this control plane's webhook.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_are_injected_through_the_webhook() {
    use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{ApiResource, DynamicObject, GroupVersionKind};

    // The lab must know where "weft-system/weft-control" listens before the
    // control plane starts: reserve a port.
    let webhook_addr = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let lab = Lab::start_with(ApiServerConfig {
        cluster_name: "c1".into(),
        webhook_services: [("weft-system/weft-control".to_string(), webhook_addr)].into(),
        ..Default::default()
    })
    .await;

    // kubectl apply -k examples/install/: the base has no patches, so
    // its resources as they are.
    let install = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/install");
    let base: serde_json::Value = serde_saphyr::from_str(
        &std::fs::read_to_string(install.join("kustomization.yaml")).unwrap(),
    )
    .unwrap();
    for file in base["resources"].as_array().unwrap() {
        let file = install.join(file.as_str().unwrap());
        apply_yaml(&lab, &std::fs::read_to_string(&file).unwrap()).await;
    }

    let mut config = Config::new("c1");
    config.webhook_addr = Some(webhook_addr);
    config.monitoring_addr = Some("127.0.0.1:0".parse().unwrap());
    let control = ControlPlane::start(config, lab.client.clone())
        .await
        .unwrap();
    let webhooks: Api<MutatingWebhookConfiguration> = Api::all(lab.client.clone());
    eventually("caBundle filled in", || async {
        webhooks
            .get("weft-sidecar-injector")
            .await
            .unwrap()
            .webhooks
            .unwrap_or_default()
            .iter()
            .all(|w| w.client_config.ca_bundle.is_some())
    })
    .await;
    let roots: Api<ConfigMap> = Api::namespaced(lab.client.clone(), "demo");
    eventually("root cert published", || async {
        roots
            .get_opt("weft-root-cert")
            .await
            .unwrap()
            .and_then(|c| c.data)
            .is_some_and(|d| d["root-cert.pem"].contains("BEGIN CERTIFICATE"))
    })
    .await;

    let namespaces: Api<Namespace> = Api::all(lab.client.clone());
    namespaces
        .patch(
            "demo",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"weft.io/injection": "enabled"}}})),
        )
        .await
        .unwrap();
    lab.namespace("plain").await;
    let containers = |pod: &Pod| -> (Vec<String>, Vec<String>) {
        let spec = pod.spec.as_ref().unwrap();
        (
            spec.containers.iter().map(|c| c.name.clone()).collect(),
            spec.init_containers
                .iter()
                .flatten()
                .map(|c| c.name.clone())
                .collect(),
        )
    };
    let make = |ns: &'static str,
                name: &'static str,
                labels: serde_json::Value,
                annotations: serde_json::Value| {
        let client = lab.client.clone();
        async move {
            let pods: Api<Pod> = Api::namespaced(client, ns);
            let pod = serde_json::from_value(json!({
                "metadata": {"name": name, "labels": labels, "annotations": annotations},
                "spec": {"containers": [{"name": "app", "image": "echo", "ports": [{"containerPort": 8080}]}]},
            }))
            .unwrap();
            pods.create(&PostParams::default(), &pod).await.unwrap()
        }
    };

    // A bare pod in a labelled namespace.
    let pod = make("demo", "bare", json!({}), json!({})).await;
    assert_eq!(
        containers(&pod),
        (
            vec!["app".into(), "weft-proxy".into()],
            vec!["weft-init".into()]
        )
    );
    assert!(
        pod.metadata
            .annotations
            .unwrap()
            .contains_key("sidecar.weft.io/status")
    );

    // A Deployment's pod template, as its ReplicaSet would create the pod.
    let deployments: Api<DynamicObject> = Api::namespaced_with(
        lab.client.clone(),
        "demo",
        &ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("apps", "v1", "Deployment"),
            "deployments",
        ),
    );
    let deployment: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "echo"},
        "spec": {"selector": {"matchLabels": {"app": "echo"}}, "template": {"metadata": {"labels": {"app": "echo"}}, "spec": {"containers": [{"name": "echo", "image": "echo"}]}}},
    }))
    .unwrap();
    let deployment = deployments
        .create(&PostParams::default(), &deployment)
        .await
        .unwrap();
    let template = deployment.data["spec"]["template"].clone();
    let pods: Api<Pod> = Api::namespaced(lab.client.clone(), "demo");
    let mut from_template: Pod = serde_json::from_value(template).unwrap();
    from_template.metadata.name = Some("echo-7d4b9c-x2x9q".into());
    let created = pods
        .create(&PostParams::default(), &from_template)
        .await
        .unwrap();
    assert_eq!(containers(&created).0, ["echo", "weft-proxy"]);

    // Opted out, or in a namespace that is not enabled: untouched.
    let (off, on, none) = (
        json!({"sidecar.weft.io/inject": "false"}),
        json!({"sidecar.weft.io/inject": "true"}),
        json!({}),
    );
    let out = make("demo", "opted-out", none.clone(), off.clone()).await;
    assert_eq!(containers(&out), (vec!["app".into()], vec![]));
    let label_out = make("demo", "label-out", off, none.clone()).await;
    assert_eq!(containers(&label_out).0, ["app"]);
    let plain = make("plain", "plain", none.clone(), none.clone()).await;
    assert_eq!(containers(&plain).0, ["app"]);
    // A pod that opts itself in, in a namespace that is not enabled.
    let opted_in = make("plain", "opted-in", on, none).await;
    assert_eq!(containers(&opted_in).0, ["app", "weft-proxy"]);

    // A malformed AdmissionReview posted straight to the webhook.
    let roots = control.ca.roots_pem();
    let name = "weft-control.weft-system.svc";
    let mut sender = weft_apiserver::testing::http1_over_tls(webhook_addr, &roots, name).await;
    let response = sender
        .send_request(
            http::Request::post("/inject")
                .header("host", "weft-control.weft-system.svc")
                .body(http_body_util::Full::new(bytes::Bytes::from_static(
                    b"{\"kind\": \"AdmissionReview\", garbage",
                )))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
}

/// The TLS port's xDS answers mesh workloads only, and the control plane's
/// own certificates rotate under open streams: each lives 2 s here, so a
/// handshake after 4 s works only with a renewed one, and a stream opened
/// before the rotations still delivers changes after them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_needs_a_mesh_certificate_and_streams_outlive_serving_cert_rotations() {
    use weft_certs::Identity;
    use weft_certs::tls::{self, CertStore, TrustBundle};

    let c1 = Lab::start("c1").await;
    c1.service("echo", false).await;
    c1.workload("echo", "a1", "10.1.0.5").await;
    let mut config = Config::new("c1");
    config.xds_tls_addr = Some("127.0.0.1:0".parse().unwrap());
    config.webhook_addr = Some("127.0.0.1:0".parse().unwrap());
    config.serving_cert_lifetime = Duration::from_secs(2);
    config.debounce = quick_debounce();
    let control = ControlPlane::start(config, c1.client.clone())
        .await
        .unwrap();
    let addr = control.xds_tls_addr.unwrap();
    let bundle = TrustBundle::from_pem(&control.ca.roots_pem()).unwrap();
    let control_identity = Identity::new("cluster.local", "weft-system", "weft-control").unwrap();

    // No client certificate: the handshake succeeds (the CA needs that),
    // the xDS stream does not.
    let anonymous =
        tls::client_config_without_certificate(&bundle, vec![control_identity.clone()]).unwrap();
    let (_requests, outbound) = mpsc::channel::<DeltaDiscoveryRequest>(1);
    let err = AggregatedDiscoveryServiceClient::new(tls_channel(addr, anonymous).await)
        .delta_aggregated_resources(ReceiverStream::new(outbound))
        .await
        .expect_err("an anonymous client gets no stream");
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    assert_eq!(control.hub.metrics.xds_refused.get(), 1);

    let me = Identity::new("cluster.local", "demo", "client").unwrap();
    let cert = weft_certs::issue_workload(&control.ca, &me, None).unwrap();
    let mtls = tls::client_config(
        &CertStore::new(&cert).unwrap(),
        &bundle,
        vec![control_identity],
    )
    .unwrap();
    let early = XdsClient::over(tls_channel(addr, mtls.clone()).await, BTreeMap::new()).await;
    eventually("the first workload", || async {
        early.workload("c1/demo/a1").is_some()
    })
    .await;

    eventually("three serving certificate rotations", || async {
        control.hub.metrics.serving_cert_rotations.get() >= 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // The first certificates expired 2 s after they were issued: new
    // handshakes see renewed ones.
    let late = XdsClient::over(tls_channel(addr, mtls).await, BTreeMap::new()).await;
    c1.workload("echo", "a2", "10.1.0.6").await;
    eventually("a change after the rotations, on both streams", || async {
        early.workload("c1/demo/a2").is_some() && late.workload("c1/demo/a2").is_some()
    })
    .await;

    // The webhook's DNS certificate is renewed too.
    let mut roots = rustls::RootCertStore::empty();
    for der in weft_certs::pem::certificates("root", &control.ca.roots_pem()).unwrap() {
        roots.add(der).unwrap();
    }
    let webhook_tls = rustls::ClientConfig::builder_with_provider(weft_certs::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(control.webhook_addr.unwrap())
        .await
        .unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(webhook_tls))
        .connect("localhost".try_into().unwrap(), tcp)
        .await
        .expect("the webhook presents a current certificate");
}

/// Without `cacerts`, the self-signed root is made once and kept in a
/// Secret: a second replica and a restarted control plane sign under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cacerts_the_root_survives_restarts_and_replicas() {
    let c1 = Lab::start("c1").await;
    let (a, b) = tokio::join!(control_plane(&c1, "c1"), control_plane(&c1, "c1"));
    let root = a.ca.roots_pem();
    assert_eq!(
        b.ca.roots_pem(),
        root,
        "two replicas started together share a root"
    );
    drop((a, b));
    let restarted = control_plane(&c1, "c1").await;
    assert_eq!(restarted.ca.roots_pem(), root, "a restart keeps the root");
    let secrets: Api<Secret> = Api::namespaced(c1.client.clone(), "weft-system");
    let stored = secrets
        .get(weft_control::ca::SELF_SIGNED_SECRET)
        .await
        .unwrap();
    assert!(stored.data.unwrap().contains_key("ca-key.pem"));
}

fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Slow and oversized clients on every port the pod network reaches leave
/// the control plane serving: heads that never finish are cut off, large
/// bodies and messages refused unread, one source's connections bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_leave_the_control_plane_serving() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use weft_certs::Identity;
    use weft_certs::tls::{self, CertStore, TrustBundle};
    use weft_xds_proto::ca::CreateCertificateRequest;
    use weft_xds_proto::ca::certificate_service_client::CertificateServiceClient;

    let c1 = Lab::start("c1").await;
    let mut config = Config::new("c1");
    config.xds_tls_addr = Some("127.0.0.1:0".parse().unwrap());
    config.webhook_addr = Some("127.0.0.1:0".parse().unwrap());
    config.monitoring_addr = Some("127.0.0.1:0".parse().unwrap());
    let control = ControlPlane::start(config, c1.client.clone())
        .await
        .unwrap();
    let (xds, webhook, monitoring) = (
        control.xds_tls_addr.unwrap(),
        control.webhook_addr.unwrap(),
        control.monitoring_addr.unwrap(),
    );
    let rss_before = resident_bytes();

    // Slowloris: 100 connections per port that send part of a head (or, on
    // the TLS ports, nothing) and then wait.
    let mut idle = Vec::new();
    for addr in [monitoring, webhook, xds] {
        for _ in 0..100 {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            if addr == monitoring {
                tcp.write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nx-slow: ")
                    .await
                    .unwrap();
            }
            idle.push((addr, tcp));
        }
    }
    // Meanwhile the ports answer others.
    assert_eq!(http_get(monitoring, "/ready").await.trim(), "ready");
    let refused = || {
        control
            .hub
            .metrics
            .encode()
            .lines()
            .find(|l| l.contains("connections_refused_total{reason=\"connections_per_peer\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    eventually(
        "xDS connections past 64 from one address refused",
        || async { refused() >= 36 },
    )
    .await;
    let bundle = TrustBundle::from_pem(&control.ca.roots_pem()).unwrap();
    let control_identity = Identity::new("cluster.local", "weft-system", "weft-control").unwrap();
    let me = Identity::new("cluster.local", "demo", "client").unwrap();
    let cert = weft_certs::issue_workload(&control.ca, &me, None).unwrap();
    let mtls = tls::client_config(
        &CertStore::new(&cert).unwrap(),
        &bundle,
        vec![control_identity.clone()],
    )
    .unwrap();
    c1.service("echo", false).await;
    c1.workload("echo", "a1", "10.1.0.5").await;
    // Another source address (loopback is a /8) is served as usual.
    let other = Some("127.0.0.2".parse().unwrap());
    let client = XdsClient::over(
        tls_channel_from(xds, mtls.clone(), other).await.unwrap(),
        BTreeMap::new(),
    )
    .await;
    eventually("xDS from another address", || async {
        client.workload("c1/demo/a1").is_some()
    })
    .await;

    // Oversized: a 64 KiB header on 15014, a 5 MiB AdmissionReview on
    // 15017, a 5 MiB certificate request on 15012.
    let mut tcp = tokio::net::TcpStream::connect(monitoring).await.unwrap();
    let huge = "a".repeat(70 * 1024);
    let _ = tcp
        .write_all(format!("GET /metrics HTTP/1.1\r\nhost: x\r\nx-big: {huge}\r\n\r\n").as_bytes())
        .await;
    let mut answer = String::new();
    let _ = tcp.read_to_string(&mut answer).await;
    assert!(
        !answer.contains("200 OK"),
        "an oversized head is not served"
    );

    let mut roots = rustls::RootCertStore::empty();
    for der in weft_certs::pem::certificates("root", &control.ca.roots_pem()).unwrap() {
        roots.add(der).unwrap();
    }
    let webhook_tls = Arc::new(
        rustls::ClientConfig::builder_with_provider(weft_certs::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    for _ in 0..4 {
        let tcp = tokio::net::TcpStream::connect(webhook).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(webhook_tls.clone())
            .connect("localhost".try_into().unwrap(), tcp)
            .await
            .unwrap();
        let body = 5 * 1024 * 1024;
        tls.write_all(
            format!("POST /inject HTTP/1.1\r\nhost: x\r\ncontent-length: {body}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let _ = tls.write_all(&vec![b'{'; body]).await;
        let mut answer = Vec::new();
        let _ = tls.read_to_end(&mut answer).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    }

    let anonymous =
        tls::client_config_without_certificate(&bundle, vec![control_identity]).unwrap();
    let mut ca =
        CertificateServiceClient::new(tls_channel_from(xds, anonymous, other).await.unwrap())
            .max_encoding_message_size(64 * 1024 * 1024);
    for _ in 0..4 {
        let err = ca
            .create_certificate(CreateCertificateRequest {
                csr: "x".repeat(5 * 1024 * 1024),
                validity_seconds: 3600,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange, "{err}");
    }
    let grown = resident_bytes().saturating_sub(rss_before);
    assert!(
        grown < 96 * 1024 * 1024,
        "memory grew by {} MiB",
        grown / (1024 * 1024)
    );

    // The slow heads and handshakes are cut off after 10 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut cut = 0;
    for (addr, tcp) in idle.iter_mut().filter(|(a, _)| *a != xds).take(10) {
        let mut buf = [0u8; 1024];
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, tcp.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    cut += 1;
                    break;
                }
                Ok(Ok(_)) => continue,
                Err(_) => panic!("a slow client on {addr} was still connected after 20 s"),
            }
        }
    }
    assert_eq!(cut, 10);
    assert_eq!(http_get(monitoring, "/ready").await.trim(), "ready");
}

/// The documents of one install manifest, by kind and name.
/// `kubectl apply -f`: server-side apply of each document of `text`.
async fn apply_yaml(lab: &Lab, text: &str) {
    use kube::api::{DynamicObject, GroupVersionKind};
    for doc in serde_saphyr::from_multiple::<serde_json::Value>(text).unwrap() {
        let api_version = doc["apiVersion"].as_str().unwrap();
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let gvk = GroupVersionKind::gvk(group, version, doc["kind"].as_str().unwrap());
        let (resource, caps) = kube::discovery::pinned_kind(&lab.client, &gvk)
            .await
            .unwrap();
        let api: Api<DynamicObject> = match (caps.scope, doc["metadata"]["namespace"].as_str()) {
            (kube::discovery::Scope::Namespaced, Some(ns)) => {
                Api::namespaced_with(lab.client.clone(), ns, &resource)
            }
            _ => Api::all_with(lab.client.clone(), &resource),
        };
        let name = doc["metadata"]["name"].as_str().unwrap().to_string();
        let object: DynamicObject = serde_json::from_value(doc).unwrap();
        api.patch(
            &name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(&object),
        )
        .await
        .unwrap();
    }
}

fn install_docs(file: &str) -> Vec<serde_json::Value> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/install")
        .join(file);
    serde_saphyr::from_multiple::<serde_json::Value>(&std::fs::read_to_string(path).unwrap())
        .unwrap()
}

fn rules_of<'a>(docs: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    &docs
        .iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))["rules"]
}

/// Other clusters read exactly what the watchers read: the reader that
/// `create-remote-secret` applies and the one in `examples/install` agree,
/// neither grants Secrets or TokenReviews, and an upgrade removes the old
/// Secret-reading Role. weft-control writes only its own ConfigMap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_roles_grant_only_what_is_read_and_written() {
    use k8s_openapi::api::rbac::v1::{ClusterRole, Role};

    let c1 = Lab::start("c1").await;
    // What an earlier version left: the reader could read Secrets here.
    let roles: Api<Role> = Api::namespaced(c1.client.clone(), "weft-system");
    let legacy = serde_json::from_value(json!({
        "metadata": {"name": "weft-reader"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch"]}],
    }))
    .unwrap();
    roles.create(&PostParams::default(), &legacy).await.unwrap();

    let manifest = weft_control::remote_secret::create(
        c1.client.clone(),
        &format!("https://{}", c1.server.addr()),
        "c1",
        "weft-system",
    )
    .await
    .unwrap();
    assert!(
        manifest.contains("# Removed the Role weft-system/weft-reader"),
        "{manifest}"
    );
    assert!(roles.get_opt("weft-reader").await.unwrap().is_none());

    let applied = Api::<ClusterRole>::all(c1.client.clone())
        .get("weft-reader")
        .await
        .unwrap();
    let applied = serde_json::to_value(applied.rules.unwrap()).unwrap();
    let reader = install_docs("15-remote-reader.yaml");
    assert_eq!(&applied, rules_of(&reader, "ClusterRole", "weft-reader"));
    assert_eq!(applied, weft_control::remote_secret::reader_rules());
    let text = serde_json::to_string(&reader).unwrap();
    for forbidden in ["secrets", "tokenreviews", "\"Role\"", "\"*\""] {
        assert!(
            !text.contains(forbidden),
            "the reader's manifest grants {forbidden}"
        );
    }
    for rule in applied.as_array().unwrap() {
        assert_eq!(rule["verbs"], json!(["get", "list", "watch"]));
    }

    let own = install_docs("10-rbac.yaml");
    let configmaps: Vec<&serde_json::Value> = rules_of(&own, "ClusterRole", "weft-control")
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["resources"] == json!(["configmaps"]))
        .collect();
    assert_eq!(configmaps.len(), 2, "{configmaps:?}");
    for rule in configmaps {
        if rule["verbs"] == json!(["create"]) {
            continue;
        }
        assert_eq!(
            rule["resourceNames"],
            json!([weft_control::publish::ROOT_CERT_CONFIGMAP])
        );
        assert_eq!(rule["verbs"], json!(["get", "update", "patch"]));
    }
    let secrets = rules_of(&own, "Role", "weft-control");
    assert_eq!(
        secrets,
        &json!([{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch", "create"]}])
    );
}

/// A TCP relay in front of `upstream` that can be frozen: connections stay
/// open and nothing moves, as when the server's process is stopped
/// (SIGSTOP) or its network blackholed.
async fn freezable(
    upstream: std::net::SocketAddr,
) -> (std::net::SocketAddr, tokio::sync::watch::Sender<bool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (frozen, watch) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            for (mut from, mut to) in [(client_read, server_write), (server_read, client_write)] {
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        if watch.wait_for(|f| !*f).await.is_err() {
                            return;
                        }
                        let n = match from.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => n,
                        };
                        if watch.wait_for(|f| !*f).await.is_err()
                            || to.write_all(&buf[..n]).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        }
    });
    (addr, frozen)
}

/// A remote API server that goes silent without closing its connections
/// is marked stale within 15 s by the liveness probe (its watches alone
/// would wait minutes), its workloads still served; when it answers
/// again, stale clears and what changed meanwhile arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_remote_is_stale_within_15_s_and_recovers() {
    let (c1, c2) = two_clusters_with_echo().await;
    let (relay, frozen) = freezable(c2.server.addr()).await;
    let kubeconfig = c2.reader_kubeconfig("reader").await.replace(
        &c2.server.addr().port().to_string(),
        &relay.port().to_string(),
    );
    let control = control_plane(&c1, "c1").await;
    remote_secret(&c1, "remote-c2", BTreeMap::from([("c2", Some(kubeconfig))])).await;
    let client = XdsClient::connect(control.xds_plain_addr.unwrap(), BTreeMap::new()).await;
    eventually("c2 synced", || async {
        client.workload("c2/demo/b1").is_some_and(|w| !w.stale)
    })
    .await;

    frozen.send_replace(true);
    let silent = std::time::Instant::now();
    eventually("c2 flagged stale", || async {
        client.workload("c2/demo/b1").is_some_and(|w| w.stale)
    })
    .await;
    let to_stale = silent.elapsed();
    assert!(client.workload("c1/demo/a1").is_some_and(|w| !w.stale));
    let status = http_get(control.monitoring_addr.unwrap(), "/debug/clusters").await;
    assert!(status.contains("did not answer"), "{status}");
    // Meanwhile c2 changes, unseen.
    c2.workload("echo", "b2", "10.2.0.6").await;

    frozen.send_replace(false);
    let back = std::time::Instant::now();
    eventually("c2 fresh again, with what changed meanwhile", || async {
        client.workload("c2/demo/b1").is_some_and(|w| !w.stale)
            && client.workload("c2/demo/b2").is_some()
    })
    .await;
    let to_recover = back.elapsed();
    println!(
        "silent remote: stale after {:.1} s, fresh {:.1} s after it answered again",
        to_stale.as_secs_f64(),
        to_recover.as_secs_f64()
    );
    assert!(
        to_stale < Duration::from_secs(15),
        "stale after {to_stale:?}"
    );
    assert!(
        to_recover < Duration::from_secs(10),
        "recovered after {to_recover:?}"
    );
}

/// The `Accepted` condition on a policy's status: (status, message).
async fn accepted(lab: &Lab, plural: &str, name: &str) -> Option<(String, String, i64)> {
    condition(lab, plural, name, "Accepted").await
}

/// A condition of a policy object in `demo`: (status, message,
/// observedGeneration). Gateway API routes keep theirs per parent.
async fn condition(
    lab: &Lab,
    plural: &str,
    name: &str,
    kind: &str,
) -> Option<(String, String, i64)> {
    use kube::api::{Api, DynamicObject};
    use weft_control::{security, traffic};
    let resource = match plural {
        "authorizationpolicies" => security::authorization_policies(),
        "peerauthentications" => security::peer_authentications(),
        "virtualservices" => traffic::virtual_services(),
        "destinationrules" => traffic::destination_rules(),
        "grpcroutes" => traffic::grpc_routes(),
        _ => traffic::http_routes(),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(lab.client.clone(), "demo", &resource);
    let object = api.get(name).await.ok()?;
    let conditions = if object.data["status"]["parents"].is_array() {
        &object.data["status"]["parents"][0]["conditions"]
    } else {
        &object.data["status"]["conditions"]
    };
    let condition = conditions
        .as_array()?
        .iter()
        .find(|c| c["type"] == kind)?
        .clone();
    Some((
        condition["status"].as_str()?.to_string(),
        condition["message"].as_str()?.to_string(),
        condition["observedGeneration"].as_i64()?,
    ))
}

/// Istio's security kinds, written as Istio users write them (v1beta1 and
/// v1), become Authorization resources and per-workload attachments over
/// xDS, within a second of a change; what weft cannot enforce goes out as
/// a deny-all, and every policy's status says which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn security_policy_reaches_proxies_and_its_status_says_what_was_refused() {
    let c1 = Lab::start("c1").await;
    apply_yaml(
        &c1,
        include_str!("../../examples/install/05-security-crds.yaml"),
    )
    .await;
    c1.service("echo", false).await;
    c1.workload("echo", "a1", "10.1.0.5").await;
    let control = control_plane(&c1, "c1").await;
    let client = XdsClient::connect(control.xds_plain_addr.unwrap(), BTreeMap::new()).await;
    eventually("initial state", || async {
        client.workload("c1/demo/a1").is_some()
    })
    .await;
    let policies = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/demo/sa/client"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: external, namespace: demo}
spec:
  action: CUSTOM
  provider: {name: opa}
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: demo}
spec:
  mtls: {mode: STRICT}
"#;
    let started = std::time::Instant::now();
    apply_yaml(&c1, policies).await;
    eventually("policy attached over xDS", || async {
        client.workload("c1/demo/a1").is_some_and(|w| {
            w.authorization_policies == ["demo/allow-client"]
                && w.inbound_mtls
                    .is_some_and(|m| m.mode == mesh::MtlsMode::Strict as i32)
        }) && client.authorization("demo/external").is_some()
    })
    .await;
    let took = started.elapsed();
    println!(
        "policy over xDS {:.0} ms after it was applied",
        took.as_secs_f64() * 1000.0
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let allow = client.authorization("demo/allow-client").unwrap();
    assert_eq!(allow.scope, mesh::AuthorizationScope::Workload as i32);
    assert_eq!(allow.rules[0].from.len(), 1);
    let refused = client.authorization("demo/external").unwrap();
    assert_eq!(refused.action, mesh::AuthorizationAction::Deny as i32);
    assert_eq!(refused.scope, mesh::AuthorizationScope::Namespace as i32);
    assert!(refused.refused.contains("CUSTOM"), "{}", refused.refused);

    eventually("statuses written", || async {
        let ok = accepted(&c1, "authorizationpolicies", "allow-client").await;
        let refused = accepted(&c1, "authorizationpolicies", "external").await;
        let strict = accepted(&c1, "peerauthentications", "strict").await;
        ok.is_some_and(|(status, _, generation)| status == "True" && generation == 1)
            && refused.is_some_and(|(status, message, _)| {
                status == "False" && message.contains("spec.action") && message.contains("CUSTOM")
            })
            && strict.is_some_and(|(status, ..)| status == "True")
    })
    .await;

    // Fixed, it is accepted: the status follows the generation.
    apply_yaml(
        &c1,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: external, namespace: demo}\nspec: {action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}\n",
    )
    .await;
    eventually("fixed policy accepted and sent as written", || async {
        let status = accepted(&c1, "authorizationpolicies", "external").await;
        status.is_some_and(|(status, _, generation)| status == "True" && generation == 2)
            && client
                .authorization("demo/external")
                .is_some_and(|a| a.refused.is_empty() && a.rules[0].to.len() == 1)
    })
    .await;
    let metrics = http_get(control.monitoring_addr.unwrap(), "/metrics").await;
    assert!(
        !metrics.contains("weft_control_xds_nacks_total 1"),
        "{metrics}"
    );
}

/// Traffic policy from the control plane's own cluster reaches proxies as
/// one resource per object; what weft refuses is not sent and its status
/// names the field; a route whose backend is missing says so.
#[tokio::test]
async fn traffic_policy_reaches_proxies_and_its_status_says_what_was_refused() {
    let c1 = Lab::start("c1").await;
    apply_yaml(&c1, include_str!("../../lab/crds/traffic.yaml")).await;
    c1.service("echo", false).await;
    c1.workload("echo", "a1", "10.1.0.5").await;
    let control = control_plane(&c1, "c1").await;
    let client = XdsClient::connect(control.xds_plain_addr.unwrap(), BTreeMap::new()).await;
    eventually("initial state", || async {
        client.workload("c1/demo/a1").is_some()
    })
    .await;
    let objects = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: demo}
spec:
  host: echo
  trafficPolicy: {connectionPool: {tcp: {tcpKeepalive: {time: 7200s}}}}
  subsets: [{name: v1, labels: {version: v1}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: demo}
spec:
  hosts: [echo]
  http:
  - route: [{destination: {host: echo, subset: v1}}]
    corsPolicy: {allowOrigins: [{exact: "*"}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules: [{backendRefs: [{name: echo, port: 80}, {name: missing, port: 80}]}]
"#;
    let started = std::time::Instant::now();
    apply_yaml(&c1, objects).await;
    eventually("routes and destination policy over xDS", || async {
        client.route_set("httproute/demo/echo").is_some()
            && client.destination("demo/echo").is_some()
    })
    .await;
    println!(
        "traffic policy over xDS {:.0} ms after it was applied",
        started.elapsed().as_secs_f64() * 1000.0
    );
    let route = client.route_set("httproute/demo/echo").unwrap();
    assert_eq!(route.hosts, ["echo.demo.svc.cluster.local"]);
    assert_eq!(route.http[0].backends.len(), 2);
    let rule = client.destination("demo/echo").unwrap();
    assert_eq!(rule.subsets[0].name, "v1");
    assert!(
        client.route_set("virtualservice/demo/echo").is_none(),
        "a refused VirtualService is not sent"
    );
    eventually("statuses written", || async {
        let vs = condition(&c1, "virtualservices", "echo", "Accepted").await;
        let dr = condition(&c1, "destinationrules", "echo", "Accepted").await;
        let route = condition(&c1, "httproutes", "echo", "Accepted").await;
        let refs = condition(&c1, "httproutes", "echo", "ResolvedRefs").await;
        vs.is_some_and(|(status, message, _)| {
            status == "False" && message.contains("spec.http[0].corsPolicy")
        }) && dr.is_some_and(|(status, message, _)| {
            status == "True" && message.contains("tcpKeepalive")
        }) && route.is_some_and(|(status, ..)| status == "True")
            && refs.is_some_and(|(status, message, _)| {
                status == "False" && message.contains("missing.demo.svc.cluster.local")
            })
    })
    .await;

    // Fixed, the VirtualService is accepted at its new generation and sent.
    apply_yaml(
        &c1,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: echo, namespace: demo}\nspec:\n  hosts: [echo]\n  http: [{route: [{destination: {host: echo, subset: v1}}], timeout: 2s}]\n",
    )
    .await;
    eventually("fixed route accepted and sent", || async {
        let status = accepted(&c1, "virtualservices", "echo").await;
        status.is_some_and(|(status, _, generation)| status == "True" && generation == 2)
            && client
                .route_set("virtualservice/demo/echo")
                .is_some_and(|r| r.http[0].timeout_ms == 2000)
    })
    .await;
    // Deleted, it is removed from proxies.
    let api: Api<kube::api::DynamicObject> = Api::namespaced_with(
        c1.client.clone(),
        "demo",
        &weft_control::traffic::virtual_services(),
    );
    api.delete("echo", &DeleteParams::default()).await.unwrap();
    eventually("deleted route removed", || async {
        client.route_set("virtualservice/demo/echo").is_none()
    })
    .await;
}

impl Lab {
    /// Puts the cluster on `network` (the label on its system namespace).
    async fn network(&self, network: &str) {
        let api: Api<Namespace> = Api::all(self.client.clone());
        api.patch(
            "weft-system",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"topology.weft.io/network": network}}})),
        )
        .await
        .unwrap();
    }

    /// An east-west gateway Service into `network`, its load balancer at
    /// `ingress` (`{"ip": ...}` or `{"hostname": ...}`).
    async fn gateway(
        &self,
        name: &str,
        network: &str,
        port: u16,
        ingress: serde_json::Value,
        annotations: serde_json::Value,
    ) {
        let api: Api<Service> = Api::namespaced(self.client.clone(), "weft-system");
        let svc = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"topology.weft.io/network": network}, "annotations": annotations},
            "spec": {"type": "LoadBalancer", "selector": {"app": name}, "ports": [{"name": "mesh", "port": port, "targetPort": 15008}]},
        }))
        .unwrap();
        api.create(&PostParams::default(), &svc).await.unwrap();
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [ingress]}}})),
        )
        .await
        .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateways_of_other_networks_are_sent_probed_and_taken_out() {
    let (c1, c2) = two_clusters_with_echo().await;
    c1.network("n1").await;
    c2.network("n2").await;
    // c2's gateway answers on a loopback port; c1's own is on c1's network.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    c2.gateway(
        "weft-eastwest-gateway",
        "n2",
        port,
        json!({"ip": "127.0.0.1"}),
        json!({}),
    )
    .await;
    c2.gateway(
        "by-name",
        "n2",
        port,
        json!({"hostname": "localhost"}),
        json!({"weft.io/gateway-service-account": "edge"}),
    )
    .await;
    c2.gateway(
        "broken",
        "n2",
        port,
        json!({"ip": "127.0.0.1"}),
        json!({"weft.io/gateway-port": "mesh"}),
    )
    .await;
    c1.gateway(
        "weft-eastwest-gateway",
        "n1",
        port,
        json!({"ip": "127.0.0.1"}),
        json!({}),
    )
    .await;

    let mut config = Config::new("c1");
    config.xds_plain_addr = Some("127.0.0.1:0".parse().unwrap());
    config.monitoring_addr = Some("127.0.0.1:0".parse().unwrap());
    config.remote_timeout = Duration::from_secs(2);
    config.debounce = quick_debounce();
    config.gateway_probe = weft_control::gateway_probe::ProbeConfig {
        period: Duration::from_millis(200),
        timeout: Duration::from_millis(200),
        failures: 2,
    };
    let detection = config.gateway_probe.detection_time();
    let control = ControlPlane::start(config, c1.client.clone())
        .await
        .unwrap();
    let reader = c2.reader_kubeconfig("reader").await;
    remote_secret(&c1, "remote-c2", BTreeMap::from([("c2", Some(reader))])).await;
    let client = XdsClient::connect(control.xds_plain_addr.unwrap(), BTreeMap::new()).await;

    const GATEWAY: &str = "c2/weft-system/weft-eastwest-gateway";
    let healthy = mesh::GatewayHealth::GatewayHealthy as i32;
    eventually("c2's gateway sent, probed healthy", || async {
        client.gateway(GATEWAY).is_some_and(|g| g.health == healthy)
    })
    .await;
    let gateway = client.gateway(GATEWAY).unwrap();
    assert_eq!(gateway.network, "n2");
    assert_eq!(gateway.cluster_id, "c2");
    assert_eq!(gateway.addresses, vec![vec![127, 0, 0, 1]]);
    assert_eq!(gateway.port, u32::from(port));
    assert_eq!(
        gateway.identities,
        vec![mesh::Identity {
            trust_domain: "cluster.local".into(),
            namespace: "weft-system".into(),
            service_account: "weft-eastwest-gateway".into(),
        }]
    );
    let by_name = client.gateway("c2/weft-system/by-name").unwrap();
    assert_eq!(
        (by_name.hostname.as_str(), by_name.addresses.len()),
        ("localhost", 0)
    );
    assert_eq!(by_name.identities[0].service_account, "edge");
    // Workloads carry the network their cluster's label names.
    assert_eq!(client.workload("c2/demo/b1").unwrap().network, "n2");
    assert_eq!(client.workload("c1/demo/a1").unwrap().network, "n1");
    // c1's own gateway and the broken one are shown, never sent.
    assert!(
        client
            .gateway("c1/weft-system/weft-eastwest-gateway")
            .is_none()
    );
    assert!(client.gateway("c2/weft-system/broken").is_none());
    let monitoring = control.monitoring_addr.unwrap();
    let debug: serde_json::Value =
        serde_json::from_str(&http_get(monitoring, "/debug/gateways").await).unwrap();
    assert_eq!(debug["network"], "n1");
    let shown = |name: &str| {
        debug["gateways"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(
        shown("c1/weft-system/weft-eastwest-gateway")["published"],
        false
    );
    assert!(
        shown("c2/weft-system/broken")["problem"]
            .as_str()
            .unwrap()
            .contains("weft.io/gateway-port")
    );
    assert!(
        shown(GATEWAY)["probe"]
            .as_str()
            .unwrap()
            .starts_with("answered in")
    );

    // The gateway dies (its cluster destroyed, say; its Service stays):
    // taken out within the detection time, and counted.
    drop(listener);
    let start = std::time::Instant::now();
    let unhealthy = mesh::GatewayHealth::GatewayUnhealthy as i32;
    eventually("c2's gateway taken out", || async {
        client
            .gateway(GATEWAY)
            .is_some_and(|g| g.health == unhealthy)
    })
    .await;
    let took = start.elapsed();
    assert!(
        took < detection + Duration::from_secs(1),
        "taken out after {took:?}; detection time {detection:?}"
    );
    let metrics = http_get(monitoring, "/metrics").await;
    assert!(
        metrics.contains(&format!(
            "weft_control_gateway_up{{gateway=\"{GATEWAY}\",network=\"n2\"}} 0"
        )),
        "{metrics}"
    );
    assert!(metrics.contains(
        "weft_control_gateway_probe_failures_total{gateway=\"c2/weft-system/weft-eastwest-gateway\""
    ));

    // It comes back on the same address: in again after one probe.
    let _listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    eventually("c2's gateway back", || async {
        client.gateway(GATEWAY).is_some_and(|g| g.health == healthy)
    })
    .await;

    // Its Service deleted: withdrawn.
    let api: Api<Service> = Api::namespaced(c2.client.clone(), "weft-system");
    api.delete("weft-eastwest-gateway", &DeleteParams::default())
        .await
        .unwrap();
    eventually("c2's gateway withdrawn", || async {
        client.gateway(GATEWAY).is_none()
    })
    .await;

    // c2 removed from the mesh: its other gateway goes with it.
    assert!(client.gateway("c2/weft-system/by-name").is_some());
    remote_secret(&c1, "remote-c2", BTreeMap::from([("c2", None)])).await;
    eventually("c2's gateways withdrawn with c2", || async {
        client.gateway("c2/weft-system/by-name").is_none()
    })
    .await;
}

/// The MCS API between two clusters, with `--mcs-cluster-local`: c2
/// exports echo first, c1 a second later with a port that disagrees. c1's
/// proxies get echo.demo.svc.clusterset.local served by both (oldest
/// export first) at a 240.241/16 VIP, while echo.demo.svc.cluster.local
/// stays c1's; c1 holds a ServiceImport with the union of ports, that VIP
/// and both clusters; c1's export says it conflicts and that c2's port
/// won. A ServiceImport weft does not manage is left alone; with the
/// exports gone, weft's is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_exports_make_clusterset_services_imports_and_conflicts() {
    use kube::api::DynamicObject;
    use weft_control::mcs;

    let (c1, c2) = two_clusters_with_echo().await;
    for lab in [&c1, &c2] {
        apply_yaml(lab, include_str!("../../lab/crds/mcs.yaml")).await;
    }
    // c2's echo also serves gRPC on 9090 and calls its port 80 "web".
    let services: Api<Service> = Api::namespaced(c2.client.clone(), "demo");
    services
        .patch(
            "echo",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"ports": [
                {"name": "web", "port": 80, "targetPort": 8080},
                {"name": "grpc", "port": 9090, "targetPort": 9090},
            ]}})),
        )
        .await
        .unwrap();
    let exports = |lab: &Lab| {
        Api::<DynamicObject>::namespaced_with(lab.client.clone(), "demo", &mcs::service_exports())
    };
    let export = |lab: &Lab| {
        let api = exports(lab);
        async move {
            let object: DynamicObject = serde_json::from_value(json!({
                "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceExport",
                "metadata": {"name": "echo", "namespace": "demo"},
            }))
            .unwrap();
            api.create(&PostParams::default(), &object).await.unwrap();
        }
    };
    export(&c2).await;
    // Creation times have whole seconds: c1's is later for sure.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    export(&c1).await;
    let imports =
        Api::<DynamicObject>::namespaced_with(c1.client.clone(), "demo", &mcs::service_imports());
    let foreign: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "multicluster.x-k8s.io/v1alpha1", "kind": "ServiceImport",
        "metadata": {"name": "someone-elses", "namespace": "demo"},
        "spec": {"type": "ClusterSetIP", "ports": [{"port": 1, "protocol": "TCP"}]},
    }))
    .unwrap();
    imports
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();

    let mut config = Config::new("c1");
    config.xds_plain_addr = Some("127.0.0.1:0".parse().unwrap());
    config.remote_timeout = Duration::from_secs(2);
    config.debounce = quick_debounce();
    config.mcs_cluster_local = true;
    let control = ControlPlane::start(config, c1.client.clone())
        .await
        .unwrap();
    remote_secret(
        &c1,
        "remote-c2",
        BTreeMap::from([("c2", Some(c2.reader_kubeconfig("reader").await))]),
    )
    .await;
    let client = XdsClient::connect(control.xds_plain_addr.unwrap(), BTreeMap::new()).await;
    const CLUSTERSET: &str = "demo/echo.demo.svc.clusterset.local";
    eventually("the clusterset service of both exports", || async {
        client
            .service(CLUSTERSET)
            .is_some_and(|s| s.clusters == ["c2", "c1"])
    })
    .await;
    let clusterset = client.service(CLUSTERSET).unwrap();
    let vip = clusterset.vips[0].address.clone();
    assert_eq!(vip[..2], [240, 241]);
    let ports: Vec<(u32, String)> = clusterset
        .ports
        .iter()
        .map(|p| (p.port, p.name.clone()))
        .collect();
    assert_eq!(ports, [(80, "web".into()), (9090, "grpc".into())]);
    assert_eq!(client.service(ECHO).unwrap().clusters, ["c1"]);
    let b1 = client.workload("c2/demo/b1").unwrap();
    assert_eq!(
        b1.services
            .iter()
            .map(|b| b.hostname.as_str())
            .collect::<Vec<_>>(),
        ["echo.demo.svc.clusterset.local"],
        "c2's pod backs the clusterset name only"
    );
    // c1's http lost to c2's web on port 80, yet c1's pod still serves 80.
    let a1 = client.workload("c1/demo/a1").unwrap();
    let binding = a1
        .services
        .iter()
        .find(|b| b.hostname == "echo.demo.svc.clusterset.local")
        .unwrap();
    let mapped: Vec<(u32, u32)> = binding
        .ports
        .iter()
        .map(|p| (p.service_port, p.target_port))
        .collect();
    assert_eq!(mapped, [(80, 8080)]);

    let vip_text = std::net::Ipv4Addr::new(vip[0], vip[1], vip[2], vip[3]).to_string();
    eventually("c1's ServiceImport", || async {
        imports
            .get_opt("echo")
            .await
            .ok()
            .flatten()
            .is_some_and(|i| {
                i.data["spec"]["ips"] == json!([vip_text])
                    && i.data["status"]["clusters"] == json!([{"cluster": "c2"}, {"cluster": "c1"}])
            })
    })
    .await;
    let import = imports.get("echo").await.unwrap();
    assert_eq!(import.data["spec"]["type"], "ClusterSetIP");
    assert_eq!(
        import.data["spec"]["ports"],
        json!([
            {"name": "web", "port": 80, "protocol": "TCP"},
            {"name": "grpc", "port": 9090, "protocol": "TCP", "appProtocol": "grpc"},
        ])
    );

    let condition = |kind: &'static str| {
        let api = exports(&c1);
        async move {
            let object = api.get("echo").await.ok()?;
            object.data["status"]["conditions"]
                .as_array()?
                .iter()
                .find(|c| c["type"] == kind)
                .cloned()
        }
    };
    eventually("c1's export reports the conflict", || async {
        condition(mcs::CONDITION_CONFLICT)
            .await
            .is_some_and(|c| c["status"] == "True")
    })
    .await;
    let conflict = condition(mcs::CONDITION_CONFLICT).await.unwrap();
    assert_eq!(conflict["reason"], "PortConflict");
    let message = conflict["message"].as_str().unwrap();
    assert!(
        message.contains("port http: c1 has http 80 (http) where c2, the oldest export, has web 80 (unspecified); c2's is used"),
        "{message}"
    );
    assert_eq!(
        condition(mcs::CONDITION_VALID).await.unwrap()["status"],
        "True"
    );

    // The exports go: the clusterset name and weft's import with them.
    for lab in [&c1, &c2] {
        exports(lab)
            .delete("echo", &DeleteParams::default())
            .await
            .unwrap();
    }
    eventually("the clusterset service removed", || async {
        client.service(CLUSTERSET).is_none()
    })
    .await;
    eventually("weft's ServiceImport deleted", || async {
        imports.get_opt("echo").await.ok().flatten().is_none()
    })
    .await;
    assert!(imports.get_opt("someone-elses").await.unwrap().is_some());
}

/// `/debug/proxies` (what `weftctl proxy-status` shows): a connected
/// proxy is SYNCED in every type; while its stream is cut (a relay that
/// stops passing bytes, the connection still open) a change leaves the
/// changed type STALE with the push unanswered; once the stream flows
/// again it is SYNCED again. A proxy that goes away is DISCONNECTED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_status_shows_a_cut_stream_stale_and_then_synced() {
    let (c1, _c2) = two_clusters_with_echo().await;
    let mut config = Config::new("c1");
    config.xds_plain_addr = Some("127.0.0.1:0".parse().unwrap());
    config.monitoring_addr = Some("127.0.0.1:0".parse().unwrap());
    config.debounce = quick_debounce();
    let control = ControlPlane::start(config, c1.client.clone())
        .await
        .unwrap();
    let monitoring = control.monitoring_addr.unwrap();
    let (relay, frozen) = freezable(control.xds_plain_addr.unwrap()).await;
    let client = XdsClient::connect(relay, BTreeMap::new()).await;
    let states = || async {
        let view: serde_json::Value =
            serde_json::from_str(&http_get(monitoring, "/debug/proxies").await).unwrap();
        view["proxies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                p["types"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(name, t)| (name.clone(), t["state"].as_str().unwrap().to_string()))
                    .collect::<BTreeMap<String, String>>()
            })
            .collect::<Vec<_>>()
    };
    let all = |wanted: &'static str| {
        move |proxies: &Vec<BTreeMap<String, String>>| {
            proxies.len() == 1 && proxies[0].len() == 6 && proxies[0].values().all(|s| s == wanted)
        }
    };
    eventually("the proxy SYNCED in every type", || async {
        all("SYNCED")(&states().await)
    })
    .await;
    assert!(client.service(ECHO).is_some());

    // A new service whose pod is already there reaches the proxy with its
    // endpoint: workloads go first, services wait for their answer.
    c1.workload("fresh", "fresh-1", "10.1.0.77").await;
    c1.service("fresh", false).await;
    eventually("the fresh service", || async {
        client
            .service("demo/fresh.demo.svc.cluster.local")
            .is_some()
    })
    .await;
    assert!(
        !client
            .seen
            .lock()
            .unwrap()
            .without_endpoints
            .contains(&"fresh.demo.svc.cluster.local".to_string()),
        "the service arrived before its endpoint"
    );

    frozen.send_replace(true);
    c1.service("added", false).await;
    eventually("Service STALE while the stream is cut", || async {
        states()
            .await
            .first()
            .is_some_and(|p| p["Service"] == "STALE")
    })
    .await;
    let view = http_get(monitoring, "/debug/proxies").await;
    assert!(
        view.contains("\"node\":\"sidecar~10.0.0.1~test.demo~demo.svc.cluster.local\""),
        "{view}"
    );
    frozen.send_replace(false);
    eventually("SYNCED again once the stream flows", || async {
        all("SYNCED")(&states().await)
    })
    .await;
    assert!(
        client
            .service("demo/added.demo.svc.cluster.local")
            .is_some()
    );
    // A second proxy subscribes, then goes away.
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "http://{}",
        control.xds_plain_addr.unwrap()
    ))
    .unwrap()
    .connect()
    .await
    .unwrap();
    let (requests, outbound) = mpsc::channel(1);
    requests
        .send(DeltaDiscoveryRequest {
            type_url: type_url::SERVICE.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let responses = AggregatedDiscoveryServiceClient::new(channel)
        .delta_aggregated_resources(ReceiverStream::new(outbound))
        .await
        .unwrap()
        .into_inner();
    eventually("the second proxy listed", || async {
        states().await.len() == 2
    })
    .await;
    drop((requests, responses));
    eventually("DISCONNECTED once it is gone", || async {
        states()
            .await
            .iter()
            .any(|p| p["Service"] == "DISCONNECTED" && p["Workload"] == "DISCONNECTED")
    })
    .await;
    assert!(
        all("SYNCED")(&states().await[..1].to_vec()),
        "the first is still SYNCED"
    );
    drop(client);
}
