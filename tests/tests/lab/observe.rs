//! What the mesh shows of one request: both sidecars' JSON access-log
//! lines, and the trace both hops continue.

use std::path::Path;
use std::time::{Duration, Instant};

use weft_lab::runner::pod_dir;
use weft_lab::traffic::PodClient;

/// The JSON line of `pod`'s sidecar log that `wanted` picks, once written.
async fn logged(
    dir: &Path,
    pod: &str,
    wanted: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let pod_dir = pod_dir(dir, "c1", "demo", pod);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let found = weft_lab::traffic::access_log_lines(&pod_dir)
            .into_iter()
            .find(|l| wanted(l));
        if let Some(line) = found {
            return line;
        }
        assert!(
            Instant::now() < deadline,
            "no access log line from {pod}'s sidecar"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The client sends a request with a `traceparent` and an
/// `x-request-id`: echo receives the same trace id, from the span of its
/// own sidecar, whose parent is the client sidecar's span, whose parent
/// is the client's. Each sidecar (both pods have access logs on by
/// annotation) wrote one JSON line for it with Envoy's field names, the
/// workload that served, both identities and the trace ids.
pub async fn access_logs_and_traces_follow_a_request(dir: &Path, caller: &PodClient, client: &str) {
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let from_app = "00f067aa0ba902b7";
    let request_id = format!("lab-{}", std::process::id());
    let answer = caller
        .get(
            "/observed?q=1",
            &[
                ("traceparent", &format!("00-{trace}-{from_app}-01")),
                ("x-request-id", &request_id),
            ],
        )
        .await
        .unwrap();
    assert_eq!(answer["trace"], trace, "{answer:?}");
    let ours = |direction: &'static str| {
        let request_id = request_id.clone();
        move |l: &serde_json::Value| {
            l["request_id"] == request_id.as_str() && l["direction"] == direction
        }
    };
    let out = logged(dir, "client", ours("outbound")).await;
    let inn = logged(dir, "echo-v1", ours("inbound")).await;
    println!("access log, client's sidecar: {out}");
    println!("access log, echo's sidecar: {inn}");
    for line in [&out, &inn] {
        for field in [
            "start_time",
            "duration",
            "method",
            "authority",
            "path",
            "protocol",
            "response_code",
            "bytes_sent",
            "upstream_cluster",
            "upstream_host",
            "source_identity",
            "destination_identity",
            "request_id",
            "trace_id",
            "span_id",
        ] {
            assert!(!line[field].is_null(), "{field} missing: {line}");
        }
        assert_eq!(line["method"], "GET");
        assert_eq!(line["path"], "/observed?q=1");
        assert_eq!(line["response_code"], 200);
        assert_eq!(line["trace_id"], trace);
        assert!(line["bytes_sent"].as_u64().unwrap() > 0, "{line}");
        assert_eq!(line["source_identity"], client);
        assert_eq!(
            line["destination_identity"],
            "spiffe://cluster.local/ns/demo/sa/echo"
        );
    }
    assert_eq!(out["upstream_workload"], "c1/demo/echo-v1");
    assert!(
        out["upstream_cluster"]
            .as_str()
            .unwrap()
            .starts_with("outbound|"),
        "{out}"
    );
    assert!(
        inn["upstream_cluster"]
            .as_str()
            .unwrap()
            .starts_with("inbound|8080"),
        "{inn}"
    );
    // The chain of spans: the app's, the client sidecar's, echo's sidecar's.
    assert_eq!(out["parent_span_id"], from_app);
    assert_eq!(inn["parent_span_id"], out["span_id"]);
    assert_eq!(answer["parent"], inn["span_id"].as_str().unwrap());
}

/// The metric names a Prometheus text exposition has samples of.
fn sample_names(exposition: &str) -> std::collections::BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_string)
        .collect()
}

/// A sidecar's `/stats/prometheus`, asked from inside its pod's network
/// (or at its address on a loopback lab).
async fn scrape_sidecar(dir: &Path, pod: &str) -> String {
    let pod_dir = pod_dir(dir, "c1", "demo", pod);
    let addr = weft_lab::traffic::sidecar_port(&pod_dir, 15090).unwrap();
    let answer = weft_lab::traffic::send_from_pod(
        &pod_dir,
        addr,
        "GET /stats/prometheus HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    answer.split_once("\r\n\r\n").unwrap().1.to_string()
}

/// Every metric the Grafana dashboard (examples/grafana/weft-mesh.json)
/// queries is exported by the running client and echo sidecars or c1's
/// control plane, and every metric they export is in docs/metrics.md.
pub async fn the_dashboard_and_the_reference_match_what_is_exported(
    lab: &weft_lab::lab::Lab,
    dir: &Path,
) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut exported = std::collections::BTreeSet::new();
    for pod in ["client", "echo-v1"] {
        exported.extend(sample_names(&scrape_sidecar(dir, pod).await));
    }
    let monitoring = lab.cluster("c1").unwrap().monitoring_addr;
    let (status, control) = weft_lab::mesh::http_get(monitoring, "/metrics")
        .await
        .unwrap();
    assert_eq!(status, 200);
    exported.extend(sample_names(&control));
    assert!(
        exported.contains("weft_proxy_requests_total"),
        "{exported:?}"
    );
    assert!(
        exported.contains("weft_control_connected_proxies"),
        "{exported:?}"
    );

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("examples/grafana/weft-mesh.json")).unwrap(),
    )
    .unwrap();
    let mut queried = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let mut rest = expr;
            while let Some(at) = rest.find("weft_") {
                let name: String = rest[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[at + name.len()..];
                queried.insert(name);
            }
        }
    }
    assert!(queried.len() >= 10, "{queried:?}");
    let missing: Vec<&String> = queried.iter().filter(|q| !exported.contains(*q)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics nothing exports: {missing:?}"
    );

    let reference = std::fs::read_to_string(root.join("docs/metrics.md")).unwrap();
    let undocumented: Vec<&String> = exported
        .iter()
        .filter(|name| {
            let family = ["_bucket", "_sum", "_count", "_created"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            !reference.contains(&format!("`{family}`"))
                && !reference.contains(&format!("`{family}`,"))
        })
        .collect();
    assert!(
        undocumented.is_empty(),
        "exported but not in docs/metrics.md: {undocumented:?}"
    );
    println!(
        "dashboard: {} metrics queried, all exported; {} exported, all documented",
        queried.len(),
        exported.len()
    );
}
