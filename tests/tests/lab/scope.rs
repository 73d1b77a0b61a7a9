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
    let client_dir = pod_dir(dir, "c1", "demo", "client");
    let server: std::net::SocketAddr = match network {
        Network::Namespaces => "10.96.0.53:53".parse().unwrap(),
        Network::Loopback => {
            let ip = std::fs::read_to_string(client_dir.join("ip")).unwrap();
            format!("{}:15053", ip.trim()).parse().unwrap()
        }
    };
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
        Ok(vec![echo_vip])
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
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let far = loop {
        if let Ok(found) = resolve("far.demo.svc.cluster.local").await
            && let Some(ip) = found.first()
        {
            break *ip;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "far never resolved in c1"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(far.octets()[..2], [240, 240], "{far}");
    if network == Network::Namespaces {
        let answer = weft_lab::traffic::send_from_pod(
            &client_dir,
            std::net::SocketAddr::from((far, 80)),
            "GET / HTTP/1.1\r\nhost: far.demo.svc.cluster.local\r\nconnection: close\r\n\r\n",
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

async fn lab_apply(lab: &Lab, cluster: &str, text: &str) {
    weft_lab::apply::apply_all(&lab.cluster(cluster).unwrap().client, text)
        .await
        .unwrap();
}
