//! Service scope in the lab: Cilium's annotations decide which clusters
//! serve; draining a cluster moves its traffic away with nothing failing,
//! and undraining brings it back.

use std::time::Duration;

use weft_lab::lab::Lab;
use weft_lab::runner::{Network, pod_dir};
use weft_lab::traffic::{PodClient, by_cluster};

/// What c1's control plane says of cluster `id`: draining or not.
async fn draining_seen(lab: &Lab, id: &str) -> bool {
    let parsed = lab.control_debug("c1", "/debug/clusters").await;
    parsed["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| c["id"] == id && c["draining"] == true)
}

/// The caller in c1 is answered by c1 (local first). Drain c1 under its
/// steady traffic (a request every 50 ms): traffic moves to c2 with no
/// request failing; undrain: back to c1, again with none failing.
pub async fn draining_moves_traffic_and_fails_nothing(lab: &Lab, caller: &PodClient) {
    caller
        .until_stable("c1", Duration::from_secs(10))
        .await
        .unwrap();
    lab.drain("c1", true).await.unwrap();
    let moved = caller
        .until_stable("c2", Duration::from_secs(30))
        .await
        .unwrap();
    println!(
        "c1 drained: traffic on c2 after {:.2} s, {} failed requests",
        moved.after.as_secs_f64(),
        moved.errors
    );
    assert_eq!(moved.errors, 0, "requests failed while c1 was drained");
    assert!(
        draining_seen(lab, "c1").await,
        "c1's control plane does not show the drain"
    );
    lab.drain("c1", false).await.unwrap();
    let back = caller
        .until_stable("c1", Duration::from_secs(30))
        .await
        .unwrap();
    println!(
        "c1 undrained: traffic back on c1 after {:.2} s, {} failed requests",
        back.after.as_secs_f64(),
        back.errors
    );
    assert_eq!(back.errors, 0, "requests failed while c1 was undrained");
    assert!(!draining_seen(lab, "c1").await);
}

/// Sets scope annotations on echo's Service in `cluster` (`None`
/// removes one).
pub async fn annotate_echo(lab: &Lab, cluster: &str, annotations: &[(&str, Option<&str>)]) {
    use k8s_openapi::api::core::v1::Service;
    use kube::api::{Api, Patch, PatchParams};
    let map: serde_json::Map<String, serde_json::Value> = annotations
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::json!(v)))
        .collect();
    Api::<Service>::namespaced(lab.cluster(cluster).unwrap().client.clone(), "demo")
        .patch(
            "echo",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"annotations": map}})),
        )
        .await
        .unwrap();
}

/// Cilium's scope annotations, one echo pod in each of c1 and c2, the
/// caller in c1: `affinity: remote` sends it to c2, `none` splits, and
/// `shared: "false"` in c2 or `global: "false"` in c1 keeps it in c1.
pub async fn scope_annotations_decide_which_clusters_serve(lab: &Lab, caller: &PodClient) {
    let settle = |cluster: &'static str| async move {
        caller
            .until_stable(cluster, Duration::from_secs(15))
            .await
            .unwrap_or_else(|e| panic!("{cluster}: {e:#}"))
    };
    annotate_echo(lab, "c1", &[("weft.io/affinity", Some("remote"))]).await;
    settle("c2").await;
    let answers = caller.batch(20).await;
    assert_eq!(
        by_cluster(&answers).get("c2"),
        Some(&20),
        "affinity: remote"
    );

    annotate_echo(lab, "c1", &[("weft.io/affinity", Some("none"))]).await;
    caller
        .until(Duration::from_secs(15), |a| {
            a.as_ref()
                .is_ok_and(|f| f.get("cluster").map(String::as_str) == Some("c1"))
        })
        .await
        .unwrap();
    let answers = caller.batch(200).await;
    let counts = by_cluster(&answers);
    let c1 = *counts.get("c1").unwrap_or(&0);
    println!("scope: affinity none over one endpoint each: {counts:?}");
    assert!(
        (70..=130).contains(&c1),
        "affinity: none splits: {counts:?}"
    );

    // c2 keeps its endpoint to itself: invisible from c1, whatever the
    // affinity.
    annotate_echo(lab, "c1", &[("weft.io/affinity", Some("remote"))]).await;
    settle("c2").await;
    annotate_echo(lab, "c2", &[("weft.io/shared", Some("false"))]).await;
    settle("c1").await;
    annotate_echo(lab, "c2", &[("weft.io/shared", None)]).await;
    settle("c2").await;
    // c1 keeps echo local: c2's endpoint is not used either.
    annotate_echo(lab, "c1", &[("weft.io/global", Some("false"))]).await;
    settle("c1").await;
    println!(
        "scope: affinity remote, shared false and global false each decided which cluster served"
    );
    annotate_echo(
        lab,
        "c1",
        &[("weft.io/global", None), ("weft.io/affinity", None)],
    )
    .await;
    settle("c1").await;
}

/// Names, as the client pod's applications ask for them (a query to any
/// address on port 53 is captured into its sidecar; on a loopback lab,
/// the sidecar's own DNS address): a mesh name is its VIP here, a name
/// outside the mesh goes to the lab's resolver, and a service that exists
/// only in c2 resolves to a VIP c1 allocated and is reached by it.
pub async fn names_resolve_in_the_sidecar(lab: &Lab, dir: &std::path::Path, network: Network) {
    use k8s_openapi::api::core::v1::Service;
    use kube::api::{Api, DeleteParams};
    let (client_dir, server) = client_resolver(dir, network);
    let resolve = |name: &'static str| {
        let client_dir = client_dir.clone();
        async move { weft_lab::dns::resolve_from_pod(&client_dir, server, name).await }
    };
    let c1 = lab.cluster("c1").unwrap().client.clone();
    let echo_vip: std::net::Ipv4Addr = Api::<Service>::namespaced(c1, "demo")
        .get("echo")
        .await
        .unwrap()
        .spec
        .and_then(|s| s.cluster_ip)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        resolve("echo.demo.svc.cluster.local").await,
        Ok(vec![echo_vip])
    );
    assert_eq!(
        resolve("echo.demo.svc.clusterset.local").await,
        Err("NameError".to_string()),
        "not exported: no clusterset name (its lab resolver knows none)"
    );
    assert_eq!(
        resolve("www.example.lab").await,
        Ok(vec![weft_lab::dns::ZONE_ADDRESS]),
        "a name outside the mesh, from the upstream resolver"
    );
    assert_eq!(
        resolve("nope.example.com").await,
        Err("NameError".to_string())
    );

    // A service only c2 has.
    lab_apply(
        lab,
        "c2",
        "apiVersion: v1\nkind: Service\nmetadata: {name: far, namespace: demo}\nspec:\n  selector: {app: echo, version: v2}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
    )
    .await;
    let far = weft_lab::dns::resolve_until(
        &client_dir,
        server,
        "far.demo.svc.cluster.local",
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    assert_eq!(far.octets()[..2], [240, 240], "{far}");
    if network == Network::Namespaces {
        let answer = weft_lab::traffic::get_from_pod_until_ok(
            &client_dir,
            std::net::SocketAddr::from((far, 80)),
            "far.demo.svc.cluster.local",
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert!(answer.contains("cluster=c2"), "{answer}");
    }
    println!(
        "names: echo.demo.svc.cluster.local is {echo_vip}, www.example.lab came from upstream, far (only in c2) is {far} here"
    );
    Api::<Service>::namespaced(lab.cluster("c2").unwrap().client.clone(), "demo")
        .delete("far", &DeleteParams::default())
        .await
        .unwrap();
}

/// The client pod's directory, and where its DNS queries go: any
/// address on port 53 is captured into its sidecar; on a loopback lab,
/// the sidecar's own DNS address.
fn client_resolver(
    dir: &std::path::Path,
    network: Network,
) -> (std::path::PathBuf, std::net::SocketAddr) {
    let client_dir = pod_dir(dir, "c1", "demo", "client");
    let server = match network {
        Network::Namespaces => "10.96.0.53:53".parse().unwrap(),
        Network::Loopback => {
            let ip = std::fs::read_to_string(client_dir.join("ip")).unwrap();
            format!("{}:15053", ip.trim()).parse().unwrap()
        }
    };
    (client_dir, server)
}

/// The MCS API in the lab. c2 exports echo, c1 does not: from c1,
/// echo.demo.svc.clusterset.local resolves to a clusterset VIP (240.241/16)
/// that reaches only c2, while echo.demo.svc.cluster.local stays c1's
/// (local first); c1 holds a ServiceImport naming c2. Then `conflicted`,
/// exported from both clusters with port 80 as HTTP in one and gRPC in the
/// other: both exports say Conflict, each written by its own cluster's
/// control plane. With the exports deleted the import goes.
pub async fn service_exports_serve_clusterset_names(
    lab: &Lab,
    dir: &std::path::Path,
    network: Network,
    caller: &PodClient,
) {
    use kube::api::{Api, DeleteParams, DynamicObject};
    use weft_control::mcs;
    let (client_dir, server) = client_resolver(dir, network);
    let exports = |cluster: &str| {
        Api::<DynamicObject>::namespaced_with(
            lab.cluster(cluster).unwrap().client.clone(),
            "demo",
            &mcs::service_exports(),
        )
    };
    let export = |name: &str| {
        format!(
            "apiVersion: multicluster.x-k8s.io/v1alpha1\nkind: ServiceExport\nmetadata: {{name: {name}, namespace: demo}}\n"
        )
    };
    lab_apply(
        lab,
        "c2",
        include_str!("../../../examples/lab/service-export.yaml"),
    )
    .await;
    let vip = weft_lab::dns::resolve_until(
        &client_dir,
        server,
        "echo.demo.svc.clusterset.local",
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    assert_eq!(vip.octets()[..2], [240, 241], "{vip}");
    if network == Network::Namespaces {
        for _ in 0..10 {
            let answer = weft_lab::traffic::get_from_pod_until_ok(
                &client_dir,
                std::net::SocketAddr::from((vip, 80)),
                "echo.demo.svc.clusterset.local",
                Duration::from_secs(10),
            )
            .await
            .unwrap();
            assert!(answer.contains("cluster=c2"), "only c2 exports: {answer}");
        }
    }
    let local = caller.batch(10).await;
    assert_eq!(
        by_cluster(&local).get("c1"),
        Some(&10),
        "cluster.local: {local:?}"
    );
    let imports = Api::<DynamicObject>::namespaced_with(
        lab.cluster("c1").unwrap().client.clone(),
        "demo",
        &mcs::service_imports(),
    );
    let import = imports.get("echo").await.unwrap();
    assert_eq!(
        import.data["spec"]["ips"],
        serde_json::json!([vip.to_string()])
    );
    assert_eq!(
        import.data["status"]["clusters"],
        serde_json::json!([{"cluster": "c2"}])
    );

    for (cluster, protocol) in [("c1", "http"), ("c2", "grpc")] {
        lab_apply(
            lab,
            cluster,
            &format!("apiVersion: v1\nkind: Service\nmetadata: {{name: conflicted, namespace: demo}}\nspec:\n  selector: {{app: nothing}}\n  ports: [{{name: api, port: 80, appProtocol: {protocol}}}]\n---\n{}", export("conflicted")),
        )
        .await;
    }
    for cluster in ["c1", "c2"] {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let conflict = loop {
            let found = exports(cluster).get("conflicted").await.ok().and_then(|e| {
                e.data["status"]["conditions"]
                    .as_array()?
                    .iter()
                    .find(|c| c["type"] == "Conflict" && c["status"] == "True")
                    .cloned()
            });
            if let Some(found) = found {
                break found;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{cluster}'s export never said Conflict"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        println!(
            "mcs: {cluster}'s export of conflicted: {}",
            conflict["message"]
        );
        assert_eq!(conflict["reason"], "PortConflict");
    }
    println!("mcs: echo.demo.svc.clusterset.local is {vip} in c1 and reaches c2, the one exporter");

    for (cluster, name) in [("c2", "echo"), ("c1", "conflicted"), ("c2", "conflicted")] {
        exports(cluster)
            .delete(name, &DeleteParams::default())
            .await
            .unwrap();
    }
    for cluster in ["c1", "c2"] {
        Api::<k8s_openapi::api::core::v1::Service>::namespaced(
            lab.cluster(cluster).unwrap().client.clone(),
            "demo",
        )
        .delete("conflicted", &DeleteParams::default())
        .await
        .unwrap();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while imports.get_opt("echo").await.unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "c1's ServiceImport outlived the export"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn lab_apply(lab: &Lab, cluster: &str, text: &str) {
    weft_lab::apply::apply_all(&lab.cluster(cluster).unwrap().client, text)
        .await
        .unwrap();
}
