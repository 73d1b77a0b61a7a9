//! Three lab clusters, each on a network of its own with no route between
//! pod networks, joined by east-west gateways: a client in c1 (network
//! n1), echo twice in c2 (n2) and once in c3 (n3). Calls cross through the
//! gateways with the client's identity end to end, split by endpoint
//! count, and fail over when a gateway dies.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use weft_lab::lab::{Lab, LabOptions};
use weft_lab::mesh::Binaries;
use weft_lab::runner::{Network, pod_dir};
use weft_lab::traffic::{Held, by_cluster};

use super::{CLIENT, apply, echo_caller, wait_ready};

/// The lab's probe (`ProbeConfig::detection_time` of its flags): a second
/// apart, taken out after two failures, the first a period after the
/// death at worst, the last by a 0.5 s timeout at worst.
const DETECTION: Duration = Duration::from_millis(2500);

fn echo(name: &str, cluster: &str) -> String {
    include_str!("../../../examples/lab/echo-c2.yaml")
        .replace("name: echo-v2", &format!("name: {name}"))
        .replace("value: c2", &format!("value: {cluster}"))
}

pub async fn scenario(binaries: Binaries, dir: PathBuf) {
    let lab = Lab::up(LabOptions {
        clusters: 3,
        multi_network: true,
        ..LabOptions::two_clusters(Network::Namespaces, dir.clone(), binaries)
    })
    .await
    .unwrap();
    let common = include_str!("../../../examples/lab/demo-common.yaml");
    for cluster in ["c1", "c2", "c3"] {
        apply(&lab, cluster, common).await;
    }
    apply(
        &lab,
        "c1",
        include_str!("../../../examples/lab/client.yaml"),
    )
    .await;
    apply(
        &lab,
        "c1",
        include_str!("../../../examples/lab/outsider.yaml"),
    )
    .await;
    apply(&lab, "c2", &echo("echo-a", "c2")).await;
    apply(&lab, "c2", &echo("echo-b", "c2")).await;
    apply(&lab, "c3", &echo("echo-c", "c3")).await;
    let c1 = lab.cluster("c1").unwrap().client.clone();
    wait_ready(&c1, &["client", "outsider"]).await;
    wait_ready(&lab.cluster("c2").unwrap().client, &["echo-a", "echo-b"]).await;
    wait_ready(&lab.cluster("c3").unwrap().client, &["echo-c"]).await;
    for gateway in ["c2", "c3"] {
        lab.wait_gateway("c1", gateway, "healthy", Duration::from_secs(60))
            .await
            .unwrap();
    }
    let caller = echo_caller(&lab, &dir).await;

    // Through the gateways, with the caller's own identity at the server,
    // split by the endpoints behind each gateway: 2 to 1.
    let answers = caller.batch(600).await;
    let counts = by_cluster(&answers);
    let failed = answers.iter().filter(|a| a.is_err()).count();
    assert_eq!(failed, 0, "{counts:?}");
    for answer in &answers {
        assert_eq!(answer.as_ref().unwrap()["peer"], CLIENT);
    }
    let share = *counts.get("c2").unwrap_or(&0) as f64 / 600.0;
    println!("across networks: {counts:?} (c2's share {share:.3}, expected 0.667)");
    assert!(
        // 2/3 ± 3.5 standard deviations of 600 draws.
        (0.60..0.73).contains(&share),
        "c2 has two endpoints to c3's one: {counts:?}"
    );

    // Isolation: a pod without a sidecar cannot reach another network's
    // pods, only its gateways' load balancers.
    let outsider = pod_dir(&dir, "c1", "demo", "outsider");
    let echo_c: std::net::IpAddr =
        std::fs::read_to_string(pod_dir(&dir, "c3", "demo", "echo-c").join("ip"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
    let direct = Held::from_pod(&outsider, std::net::SocketAddr::new(echo_c, 8080)).await;
    assert!(direct.is_err(), "a pod of n1 reached a pod of n3 directly");
    let lb = std::net::SocketAddr::from((weft_lab::load_balancer::address(3, 1), 15008));
    assert!(
        Held::from_pod(&outsider, lb).await.is_ok(),
        "c3's gateway is reachable from n1"
    );

    // c2's gateway dies (its pod gone at once): traffic moves to c3
    // within the probe's detection time and a second, counting what
    // failed on the way.
    let gateways: Api<Pod> =
        Api::namespaced(lab.cluster("c2").unwrap().client.clone(), "weft-system");
    let killed = Instant::now();
    gateways
        .delete(
            "weft-eastwest-gateway",
            &DeleteParams::default().grace_period(0),
        )
        .await
        .unwrap();
    let settled = caller
        .until_stable("c3", Duration::from_secs(30))
        .await
        .unwrap();
    println!(
        "c2's gateway killed: traffic on c3 after {:.2} s, {} failed requests (probe detection time {:.1} s)",
        settled.after.as_secs_f64(),
        settled.errors,
        DETECTION.as_secs_f64()
    );
    assert!(
        settled.after < DETECTION + Duration::from_secs(1),
        "failover took {:?}",
        settled.after
    );
    let left = (DETECTION + Duration::from_secs(1)).saturating_sub(killed.elapsed());
    lab.wait_gateway("c1", "c2", "unhealthy", left)
        .await
        .unwrap();
    println!(
        "c2's gateway taken out by c1's probe {:.2} s after it died",
        killed.elapsed().as_secs_f64()
    );
    let answers = caller.batch(20).await;
    assert_eq!(by_cluster(&answers).get("c3"), Some(&20), "{answers:?}");

    // It comes back: traffic returns to c2.
    let restored = Instant::now();
    lab.deploy_gateway("c2").await.unwrap();
    caller
        .until(Duration::from_secs(60), |a| {
            a.as_ref()
                .is_ok_and(|f| f.get("cluster").map(String::as_str) == Some("c2"))
        })
        .await
        .unwrap();
    println!(
        "c2's gateway restored: traffic back on c2 {:.2} s after it was re-applied",
        restored.elapsed().as_secs_f64()
    );

    affinity_none_follows_the_karmada_division(&lab, &caller).await;
    lab.down().await;
}

/// The replicas per cluster Karmada gives examples/karmada/echo.yaml's
/// Deployment: divided by its static weights (Karmada's `Divided`,
/// `Weighted`, the remainder to the heaviest).
fn karmada_division() -> Vec<(String, usize)> {
    let docs =
        weft_lab::apply::documents(include_str!("../../../examples/karmada/echo.yaml")).unwrap();
    let find = |kind: &str| docs.iter().find(|d| d["kind"] == kind).unwrap().clone();
    let replicas = find("Deployment")["spec"]["replicas"].as_u64().unwrap() as usize;
    let policy = find("PropagationPolicy");
    let weights: Vec<(String, usize)> =
        policy["spec"]["placement"]["replicaScheduling"]["weightPreference"]["staticWeightList"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| {
                (
                    w["targetCluster"]["clusterNames"][0]
                        .as_str()
                        .unwrap()
                        .to_string(),
                    w["weight"].as_u64().unwrap() as usize,
                )
            })
            .collect();
    let total: usize = weights.iter().map(|(_, w)| w).sum();
    let mut division: Vec<(String, usize)> = weights
        .iter()
        .map(|(c, w)| (c.clone(), replicas * w / total))
        .collect();
    let given: usize = division.iter().map(|(_, n)| n).sum();
    if let Some(heaviest) = division.iter_mut().max_by_key(|(_, n)| *n) {
        heaviest.1 += replicas - given;
    }
    assert_eq!(
        find("Service")["metadata"]["annotations"]["weft.io/affinity"],
        "none"
    );
    division
}

/// `weft.io/affinity: none` with replicas divided 2:1:1 across three
/// clusters (the Karmada case): 2,000 requests split in proportion, each
/// cluster within 5 points of its share.
async fn affinity_none_follows_the_karmada_division(
    lab: &Lab,
    caller: &weft_lab::traffic::PodClient,
) {
    let division = karmada_division();
    assert_eq!(
        division,
        [
            ("c1".to_string(), 2),
            ("c2".to_string(), 1),
            ("c3".to_string(), 1)
        ]
    );
    // c2 has echo-a and echo-b, c3 echo-c: c2 gives one up, c1 gets two.
    let pods: Api<Pod> = Api::namespaced(lab.cluster("c2").unwrap().client.clone(), "demo");
    pods.delete("echo-b", &DeleteParams::default())
        .await
        .unwrap();
    apply(lab, "c1", &echo("echo-x", "c1")).await;
    apply(lab, "c1", &echo("echo-y", "c1")).await;
    let c1 = lab.cluster("c1").unwrap().client.clone();
    wait_ready(&c1, &["echo-x", "echo-y"]).await;
    super::scope::annotate_echo(lab, "c1", &[("weft.io/affinity", Some("none"))]).await;
    // In force once c2 and c3 answer again next to c1.
    for cluster in ["c2", "c3"] {
        caller
            .until(Duration::from_secs(30), |a| {
                a.as_ref()
                    .is_ok_and(|f| f.get("cluster").map(String::as_str) == Some(cluster))
            })
            .await
            .unwrap();
    }
    // echo-b's endpoint leaves c1's view through c2's control plane.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let n = 2000;
    let answers = caller.batch(n).await;
    let counts = by_cluster(&answers);
    let failed = answers.iter().filter(|a| a.is_err()).count();
    println!(
        "affinity none, replicas 2:1:1 (examples/karmada/echo.yaml): {counts:?} over {n}, {failed} failed"
    );
    assert_eq!(failed, 0);
    for (cluster, replicas) in division {
        let share = *counts.get(&cluster).unwrap_or(&0) as f64 / n as f64;
        let expected = replicas as f64 / 4.0;
        assert!(
            (share - expected).abs() <= 0.05,
            "{cluster}: {share:.3} of the requests, expected {expected:.2}: {counts:?}"
        );
    }
}
