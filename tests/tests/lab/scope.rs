//! Service scope in the lab: Cilium's annotations decide which clusters
//! serve; draining a cluster moves its traffic away with nothing failing,
//! and undraining brings it back.

use std::time::Duration;

use weft_lab::lab::Lab;
use weft_lab::traffic::{PodClient, by_cluster};

/// Marks `id` draining (or not) in every lab cluster, as `weftctl cluster
/// drain` does.
async fn mark(lab: &Lab, id: &str, drain: bool) {
    for cluster in &lab.clusters {
        weft_control::drain::mark(&cluster.client, "weft-system", id, drain)
            .await
            .unwrap();
    }
}

/// What c1's control plane says of cluster `id`: draining or not.
async fn draining_seen(lab: &Lab, id: &str) -> bool {
    let monitoring = lab.cluster("c1").unwrap().monitoring_addr;
    let Ok((200, body)) = weft_lab::mesh::http_get(monitoring, "/debug/clusters").await else {
        return false;
    };
    let parsed: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
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
    mark(lab, "c1", true).await;
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
    mark(lab, "c1", false).await;
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
