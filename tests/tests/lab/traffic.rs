//! Traffic policy in the lab, with real proxies and real requests: each
//! scenario written as an Istio VirtualService (with a DestinationRule's
//! subsets) and as a Gateway API route (with one Service per version), and
//! both measured the same way. echo-v1 runs in c1, echo-v2 in c2; the
//! caller is the client pod in c1.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use weft_lab::lab::Lab;
use weft_lab::runner::{Network, pod_dir};
use weft_lab::traffic::{Answer, PodClient};

use super::{apply, delete, wait_ready};

const SUBSETS: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: demo}
spec:
  host: echo
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
  - {name: in-c2, labels: {topology.istio.io/cluster: c2}}
"#;

fn virtual_service(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: echo, namespace: demo}}\nspec:\n  hosts: [echo]\n  http:\n{http}"
    )
}

fn http_route(rules: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: echo, namespace: demo}}\nspec:\n  parentRefs:\n  - {{group: \"\", kind: Service, name: echo, port: 80}}\n  rules:\n{rules}"
    )
}

fn vs_split(v1: u32, v2: u32) -> String {
    virtual_service(&format!(
        r#"  - match: [{{headers: {{x-canary: {{exact: "yes"}}}}}}]
    route: [{{destination: {{host: echo, subset: v2}}}}]
  - route:
    - {{destination: {{host: echo, subset: v1}}, weight: {v1}}}
    - {{destination: {{host: echo, subset: v2}}, weight: {v2}}}
"#
    ))
}

fn route_split(v1: u32, v2: u32) -> String {
    http_route(&format!(
        r#"  - matches: [{{headers: [{{name: x-canary, value: "yes"}}]}}]
    backendRefs: [{{name: echo-v2, port: 80}}]
  - backendRefs:
    - {{name: echo-v1, port: 80, weight: {v1}}}
    - {{name: echo-v2, port: 80, weight: {v2}}}
"#
    ))
}

/// Sends `n` GETs of `path` from eight callers at once; counts answers by
/// version, failures by their status line.
async fn measure(
    caller: &PodClient,
    n: usize,
    path: &str,
    headers: &[(&str, &str)],
) -> BTreeMap<String, usize> {
    measure_with(8, caller, n, path, headers).await
}

async fn measure_with(
    workers: usize,
    caller: &PodClient,
    n: usize,
    path: &str,
    headers: &[(&str, &str)],
) -> BTreeMap<String, usize> {
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..workers {
        let caller = caller.clone();
        let path = path.to_string();
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let share = n / workers + usize::from(worker < n % workers);
        tasks.spawn(async move {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect();
            let mut answers = Vec::with_capacity(share);
            for _ in 0..share {
                answers.push(caller.get(&path, &headers).await);
            }
            answers
        });
    }
    let mut counts = BTreeMap::new();
    while let Some(answers) = tasks.join_next().await {
        for answer in answers.unwrap() {
            *counts.entry(label(&answer)).or_default() += 1;
        }
    }
    counts
}

fn label(answer: &Answer) -> String {
    match answer {
        Ok(fields) => fields.get("version").cloned().unwrap_or_default(),
        Err(why) => why.split(':').next().unwrap_or("").to_string(),
    }
}

/// Applies `config` and sends requests until ten in a row are answered
/// as `done` says (the proxies have it).
async fn settle(
    lab: &Lab,
    caller: &PodClient,
    config: &str,
    path: &str,
    headers: &[(&str, &str)],
    done: impl Fn(&Answer) -> bool,
) {
    apply(lab, "c1", config).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if done(&caller.get(path, headers).await) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the config did not take effect:\n{config}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A route's request headers that tag its answers, to tell when it is in
/// force.
fn tagged(tag: &str) -> String {
    format!("    headers: {{request: {{set: {{x-echo-tag: {tag}}}}}}}\n")
}

fn tag(answer: &Answer, wanted: &str) -> bool {
    matches!(answer, Ok(fields) if fields.get("tag").map(String::as_str) == Some(wanted))
}

fn version(answer: &Answer, wanted: &str) -> bool {
    matches!(answer, Ok(fields) if fields.get("version").map(String::as_str) == Some(wanted))
}

/// Canary 90/10 and header routing, as measured for one API.
async fn canary_and_header(caller: &PodClient, api: &str) -> (f64, BTreeMap<String, usize>) {
    let split = measure(caller, 2000, "/", &[]).await;
    let v2 = *split.get("v2").unwrap_or(&0) as f64 / 2000.0;
    println!(
        "{api}: 90/10 canary over 2000 requests: {split:?} ({:.1}% to v2)",
        v2 * 100.0
    );
    assert_eq!(
        split.get("v1").unwrap_or(&0) + split.get("v2").unwrap_or(&0),
        2000,
        "{api}: {split:?}"
    );
    assert!(
        (v2 - 0.10).abs() <= 0.03,
        "{api}: {:.1}% to v2, not 10 ± 3",
        v2 * 100.0
    );
    let canary = measure(caller, 100, "/", &[("x-canary", "yes")]).await;
    assert_eq!(
        canary.get("v2"),
        Some(&100),
        "{api}: header routing {canary:?}"
    );
    (v2, canary)
}

/// Changes the split from all-v1 to all-v2 under steady traffic: how long
/// until every answer is v2, and how many requests failed meanwhile.
async fn shift(lab: &Lab, caller: &PodClient, to_v2: &str) -> (Duration, usize) {
    let steady = caller.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let traffic = tokio::spawn(async move {
        let mut answers = Vec::new();
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
            let answer = steady.once().await;
            answers.push((Instant::now(), answer));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        answers
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let changed = Instant::now();
    apply(lab, "c1", to_v2).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let answers = traffic.await.unwrap();
    let failed = answers.iter().filter(|(_, a)| a.is_err()).count();
    let last_v1 = answers
        .iter()
        .filter(|(_, a)| version(a, "v1"))
        .map(|(at, _)| *at)
        .max()
        .unwrap_or(changed);
    (last_v1.saturating_duration_since(changed), failed)
}

/// Sums the `weft_proxy_requests_total` series a pod's sidecar reports as
/// the destination.
async fn served(dir: &std::path::Path, cluster: &str, pod: &str) -> u64 {
    let ip = std::fs::read_to_string(pod_dir(dir, cluster, "demo", pod).join("ip")).unwrap();
    let addr = std::net::SocketAddr::new(ip.trim().parse().unwrap(), 15090);
    let metrics = weft_lab::apiserver::testing::http1(addr, "GET", "/stats/prometheus").await;
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("weft_proxy_requests_total{") && l.contains("reporter=\"destination\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

const ECHO_V1B: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: echo-v1b
  namespace: demo
  labels: {app: echo, version: v1}
spec:
  serviceAccountName: echo
  containers:
  - name: echo
    image: ghcr.io/weft-mesh/weft-echo:0.1.0
    args: ["--http", "0.0.0.0:8080", "--grpc", "0.0.0.0:9090"]
    env:
    - {name: CLUSTER_ID, value: c1}
    - {name: APP_VERSION, value: v1}
    - name: POD_NAME
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
    ports:
    - {name: http, containerPort: 8080}
    - {name: grpc, containerPort: 9090}
    readinessProbe:
      httpGet: {path: /healthz, port: 8080}
      periodSeconds: 1
"#;

async fn condition(
    lab: &Lab,
    resource: &kube::api::ApiResource,
    name: &str,
    parents: bool,
) -> serde_json::Value {
    let api: kube::Api<kube::api::DynamicObject> =
        kube::Api::namespaced_with(lab.cluster("c1").unwrap().client.clone(), "demo", resource);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let object = serde_json::to_value(api.get(name).await.unwrap()).unwrap();
        let conditions = if parents {
            object["status"]["parents"][0]["conditions"].clone()
        } else {
            object["status"]["conditions"].clone()
        };
        let generation = object["metadata"]["generation"].as_i64();
        let current = conditions.as_array().is_some_and(|c| {
            c.iter()
                .all(|c| c["observedGeneration"].as_i64() == generation)
                && !c.is_empty()
        });
        if current {
            return conditions;
        }
        assert!(
            Instant::now() < deadline,
            "no current status on {name}: {object}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn find<'a>(conditions: &'a serde_json::Value, kind: &str) -> &'a serde_json::Value {
    conditions
        .as_array()
        .and_then(|c| c.iter().find(|c| c["type"] == kind))
        .unwrap_or(&serde_json::Value::Null)
}

pub(super) async fn traffic_policy_is_applied(
    lab: &Lab,
    dir: &std::path::Path,
    network: Network,
    caller: &PodClient,
) {
    use weft_control::traffic;

    // ---- The same canary and header routing, once per API ----
    apply(lab, "c1", SUBSETS).await;
    settle(
        lab,
        caller,
        &vs_split(90, 10),
        "/",
        &[("x-canary", "yes")],
        |a| version(a, "v2"),
    )
    .await;
    let (vs_share, _) = canary_and_header(caller, "VirtualService").await;
    delete(lab, "c1", &vs_split(90, 10)).await;
    settle(
        lab,
        caller,
        &route_split(90, 10),
        "/",
        &[("x-canary", "yes")],
        |a| version(a, "v2"),
    )
    .await;
    let (route_share, _) = canary_and_header(caller, "HTTPRoute").await;
    println!(
        "traffic: the same canary measured {:.1}% (VirtualService) and {:.1}% (HTTPRoute) to v2",
        vs_share * 100.0,
        route_share * 100.0
    );
    assert!(
        (vs_share - route_share).abs() <= 0.04,
        "the two APIs disagree"
    );
    let status = condition(lab, &traffic::http_routes(), "echo", true).await;
    assert_eq!(find(&status, "Accepted")["status"], "True", "{status}");
    assert_eq!(find(&status, "ResolvedRefs")["status"], "True", "{status}");

    // A weight change takes effect within a second, failing nothing.
    apply(lab, "c1", &route_split(100, 0)).await;
    settle(lab, caller, &route_split(100, 0), "/", &[], |a| {
        version(a, "v1")
    })
    .await;
    let (took, failed) = shift(lab, caller, &route_split(0, 100)).await;
    println!(
        "traffic: HTTPRoute weight 100/0 → 0/100: last v1 answer {:.0} ms after the change, {failed} failed",
        took.as_secs_f64() * 1000.0
    );
    assert_eq!(failed, 0);
    assert!(took < Duration::from_secs(1), "took {took:?}");
    delete(lab, "c1", &route_split(0, 100)).await;

    // ---- Retries, timeouts and faults, once per API ----
    let vs_retry = virtual_service(
        "  - match: [{uri: {exact: /flaky}}]\n    route: [{destination: {host: echo, subset: v1}}]\n    retries: {attempts: 2, retryOn: 5xx}\n  - match: [{uri: {prefix: /delay}}]\n    route: [{destination: {host: echo, subset: v1}}]\n    timeout: 200ms\n  - route: [{destination: {host: echo, subset: v1}}]\n",
    );
    let route_retry = http_route(
        "  - matches: [{path: {type: Exact, value: /flaky}}]\n    backendRefs: [{name: echo-v1, port: 80}]\n    retry: {codes: [503], attempts: 2}\n  - matches: [{path: {type: PathPrefix, value: /delay}}]\n    backendRefs: [{name: echo-v1, port: 80}]\n    timeouts: {request: 200ms}\n  - backendRefs: [{name: echo-v1, port: 80}]\n",
    );
    let no_retry = virtual_service(&format!(
        "  - route: [{{destination: {{host: echo, subset: v1}}}}]\n{}",
        tagged("no-retry")
    ));
    settle(lab, caller, &no_retry, "/", &[], |a| tag(a, "no-retry")).await;
    // One at a time: /flaky alternates per request it sees, so a retry
    // meets the other half of the alternation only without others between.
    let flaky = measure_with(1, caller, 40, "/flaky", &[]).await;
    println!("traffic: /flaky without a retry policy: {flaky:?}");
    assert!(
        flaky
            .get("HTTP/1.1 503 Service Unavailable")
            .copied()
            .unwrap_or(0)
            >= 10,
        "the backend is not flaky: {flaky:?}"
    );
    for (api, config, kind) in [
        ("VirtualService", &vs_retry, traffic::virtual_services()),
        ("HTTPRoute", &route_retry, traffic::http_routes()),
    ] {
        if api == "HTTPRoute" {
            delete(lab, "c1", &no_retry).await;
        }
        settle(
            lab,
            caller,
            config,
            "/delay/500",
            &[],
            |a| matches!(a, Err(why) if why.starts_with("HTTP/1.1 504")),
        )
        .await;
        let retried = measure_with(1, caller, 40, "/flaky", &[]).await;
        println!("traffic: /flaky with {api} retries: {retried:?}");
        assert_eq!(retried.get("v1"), Some(&40), "{api}: {retried:?}");
        let started = Instant::now();
        let late = caller.get("/delay/500", &[]).await;
        let waited = started.elapsed();
        println!(
            "traffic: {api} timeout 200 ms on a 500 ms answer: {late:?} after {:.0} ms",
            waited.as_secs_f64() * 1000.0
        );
        assert!(
            matches!(&late, Err(why) if why.starts_with("HTTP/1.1 504") && why.contains("upstream request timeout")),
            "{late:?}"
        );
        assert!(waited < Duration::from_millis(450), "{waited:?}");
        let status = condition(lab, &kind, "echo", api == "HTTPRoute").await;
        assert_eq!(find(&status, "Accepted")["status"], "True", "{status}");
        delete(lab, "c1", config).await;
    }

    let fault = virtual_service(&format!(
        "  - route: [{{destination: {{host: echo, subset: v1}}}}]\n    fault: {{abort: {{httpStatus: 418, percentage: {{value: 30}}}}}}\n{}",
        tagged("fault")
    ));
    settle(lab, caller, &fault, "/", &[], |a| {
        tag(a, "fault") || matches!(a, Err(why) if why.starts_with("HTTP/1.1 418"))
    })
    .await;
    let aborted = measure(caller, 1000, "/", &[]).await;
    let share = *aborted.get("HTTP/1.1 418 I'm a teapot").unwrap_or(&0) as f64 / 1000.0;
    println!(
        "traffic: fault abort 418 at 30%: {aborted:?} ({:.1}%)",
        share * 100.0
    );
    assert!((share - 0.30).abs() <= 0.05, "{aborted:?}");

    // ---- Mirroring: v2 sees the copies, the caller only v1's answers ----
    let mirror = virtual_service(&format!(
        "  - route: [{{destination: {{host: echo, subset: v1}}}}]\n    mirror: {{host: echo, subset: v2}}\n    mirrorPercentage: {{value: 100}}\n{}",
        tagged("mirror")
    ));
    settle(lab, caller, &mirror, "/", &[], |a| tag(a, "mirror")).await;
    let before = served(dir, "c2", "echo-v2").await;
    let mirrored = measure(caller, 50, "/", &[]).await;
    assert_eq!(mirrored.get("v1"), Some(&50), "{mirrored:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut copies = 0;
    while Instant::now() < deadline {
        copies = served(dir, "c2", "echo-v2").await - before;
        if copies >= 50 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "traffic: 50 requests mirrored to v2 in c2: it served {copies}, the caller saw only v1"
    );
    assert!(copies >= 50, "the mirror served {copies}");

    // ---- A route pinned to the c2 cluster ----
    let pinned = virtual_service("  - route: [{destination: {host: echo, subset: in-c2}}]\n");
    settle(
        lab,
        caller,
        &pinned,
        "/",
        &[],
        |a| matches!(a, Ok(f) if f["cluster"] == "c2"),
    )
    .await;
    let answers = caller.batch(50).await;
    assert!(
        answers
            .iter()
            .all(|a| matches!(a, Ok(f) if f["cluster"] == "c2")),
        "{answers:?}"
    );
    println!("traffic: subset topology.istio.io/cluster=c2: 50 of 50 in c2");

    // ---- A route to a subset nobody defined: the status says so ----
    let dangling = virtual_service("  - route: [{destination: {host: echo, subset: v9}}]\n");
    apply(lab, "c1", &dangling).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = condition(lab, &traffic::virtual_services(), "echo", false).await;
        if find(&status, "ResolvedRefs")["reason"] == "SubsetNotFound" {
            assert!(
                find(&status, "ResolvedRefs")["message"]
                    .as_str()
                    .unwrap()
                    .contains("v9"),
                "{status}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // ---- Consistent hash on a header: one key, one endpoint ----
    apply(lab, "c1", ECHO_V1B).await;
    wait_ready(&lab.cluster("c1").unwrap().client, &["echo-v1b"]).await;
    let hashed = format!(
        "{SUBSETS}  trafficPolicy:\n    loadBalancer:\n      consistentHash: {{httpHeaderName: x-user}}\n"
    );
    apply(lab, "c1", &hashed).await;
    let to_v1 = virtual_service(&format!(
        "  - route: [{{destination: {{host: echo, subset: v1}}}}]\n{}",
        tagged("hashed")
    ));
    settle(lab, caller, &to_v1, "/", &[], |a| tag(a, "hashed")).await;
    // Both c1 pods serve once the new endpoint is known everywhere.
    let seen = |answers: &[Answer]| -> std::collections::BTreeSet<String> {
        answers
            .iter()
            .filter_map(|a| a.as_ref().ok()?.get("pod").cloned())
            .collect()
    };
    // Both c1 pods known to the caller's sidecar first: a new endpoint
    // takes over the keys it wins, by design.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut both = std::collections::BTreeSet::new();
    for user in 0.. {
        let answer = caller
            .get("/", &[("x-user", &format!("probe-{user}"))])
            .await;
        both.extend(answer.ok().and_then(|f| f.get("pod").cloned()));
        if both.len() >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "echo-v1b never served: {both:?}");
    }
    let mut pods = std::collections::BTreeSet::new();
    for user in 0..12 {
        let name = format!("user-{user}");
        let mut answers = Vec::new();
        for _ in 0..10 {
            answers.push(caller.get("/", &[("x-user", &name)]).await);
        }
        let by = seen(&answers);
        assert_eq!(by.len(), 1, "{name} went to {by:?}");
        pods.extend(by);
    }
    println!(
        "traffic: consistentHash on x-user: 12 users × 10 requests, each user on one pod, {} pods used",
        pods.len()
    );
    assert!(pods.len() >= 2, "the keys did not spread: {pods:?}");
    delete(lab, "c1", ECHO_V1B).await;
    delete(lab, "c1", &to_v1).await;

    // ---- GRPCRoute: by service and method ----
    let grpc = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo-grpc, namespace: demo}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 90}]
  rules:
  - matches: [{method: {service: weft.echo.v1.Echo, method: Echo}}]
    backendRefs: [{name: echo-v2, port: 90}]
  - matches: [{method: {service: weft.echo.v1.Echo}}]
    backendRefs: [{name: echo-v1, port: 90}]
"#;
    match network {
        Network::Namespaces => {
            apply(lab, "c1", grpc).await;
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let unary = caller.grpc(90, false).await.unwrap();
                let stream = caller.grpc(90, true).await.unwrap();
                if unary.as_deref() == Ok("c2/v2") && stream.as_deref() == Ok("c1/v1") {
                    println!(
                        "traffic: GRPCRoute: Echo → {}, Stream → {}",
                        unary.unwrap(),
                        stream.unwrap()
                    );
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "GRPCRoute: Echo → {unary:?}, Stream → {stream:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            delete(lab, "c1", grpc).await;
        }
        Network::Loopback => println!(
            "loopback lab: no captured ClusterIP for a gRPC client, GRPCRoute not exercised here"
        ),
    }
    delete(lab, "c1", &dangling).await;
    delete(lab, "c1", &hashed).await;
    caller
        .until(Duration::from_secs(10), |a| a.is_ok())
        .await
        .unwrap();
}
