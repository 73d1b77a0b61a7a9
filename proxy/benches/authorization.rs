//! What authorization costs per request, without the noise of a loaded
//! machine: the bench scenario's 20 rules (a DENY of ten the request
//! misses, an ALLOW of ten whose last admits it) checked against one
//! request, timed over many runs, and the allocations each check makes
//! counted by the allocator (the target is none).
//!
//! `cargo bench -p weft-proxy --bench authorization`

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use http::HeaderMap;
use weft_proxy::authorization::{HttpAttributes, InboundPolicy, Policy, normalize_path};
use weft_proxy::authorize::{self, Caller};
use weft_proxy::metrics::{Metrics, Peer, TrafficLabels};
use weft_xds_proto::mesh::{self, condition, string_match};

#[path = "support/counting.rs"]
mod counting;
use counting::ALLOCATIONS;

fn text(kind: string_match::Kind) -> mesh::StringMatch {
    mesh::StringMatch { kind: Some(kind) }
}

fn exact(t: &str) -> mesh::StringMatch {
    text(string_match::Kind::Exact(t.into()))
}

fn prefix(t: &str) -> mesh::StringMatch {
    text(string_match::Kind::Prefix(t.into()))
}

/// The same 20 rules as `weft-perf bench`'s authorization scenario.
fn policies() -> Vec<Arc<Policy>> {
    let mut deny = Vec::new();
    let mut allow = Vec::new();
    for i in 0..10 {
        deny.push(mesh::Rule {
            to: vec![mesh::Operation {
                paths: vec![prefix(&format!("/admin{i}"))],
                methods: vec![exact("DELETE"), exact("PUT")],
                ..Default::default()
            }],
            when: vec![mesh::Condition {
                key: condition::Key::RequestHeader as i32,
                header: format!("x-block-{i}"),
                values: vec![text(string_match::Kind::Present(true))],
                ..Default::default()
            }],
            ..Default::default()
        });
        let principal = if i == 9 {
            "cluster.local/ns/bench/sa/client".to_string()
        } else {
            format!("cluster.local/ns/team-{i}/sa/caller")
        };
        allow.push(mesh::Rule {
            from: vec![mesh::Source {
                principals: vec![exact(&principal)],
                not_ip_blocks: vec![mesh::Cidr {
                    address: vec![192, 0, 2, i],
                    prefix_len: 32,
                }],
                ..Default::default()
            }],
            to: vec![mesh::Operation {
                methods: vec![exact("GET"), exact("POST")],
                paths: vec![prefix("/")],
                ports: vec![8080],
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    [
        ("bench-deny", mesh::AuthorizationAction::Deny, deny),
        ("bench-allow", mesh::AuthorizationAction::Allow, allow),
    ]
    .into_iter()
    .map(|(name, action, rules)| {
        let resource = mesh::Authorization {
            name: name.into(),
            namespace: "bench".into(),
            scope: mesh::AuthorizationScope::Workload as i32,
            action: action as i32,
            rules,
            ..Default::default()
        };
        Arc::new(Policy::compile(&format!("bench/{name}"), &resource).expect("valid"))
    })
    .collect()
}

/// Runs `f` `n` times; returns nanoseconds and allocations per run.
fn measure(n: u32, mut f: impl FnMut()) -> (f64, f64) {
    for _ in 0..n / 10 {
        f();
    }
    let allocations = ALLOCATIONS.load(Ordering::Relaxed);
    let started = Instant::now();
    for _ in 0..n {
        f();
    }
    let elapsed = started.elapsed();
    let allocated = ALLOCATIONS.load(Ordering::Relaxed) - allocations;
    (
        elapsed.as_nanos() as f64 / f64::from(n),
        allocated as f64 / f64::from(n),
    )
}

fn main() {
    let policy = InboundPolicy::new(policies());
    let identity = weft_certs::Identity::new("cluster.local", "bench", "client").expect("valid");
    let caller = Caller::new(Some(identity), "10.0.0.2".parse::<IpAddr>().expect("valid"));
    let headers = HeaderMap::new();
    let path = "/echo?n=1";
    let n = 1_000_000;

    let metrics = Metrics::default();
    let me = Peer::default();
    let target = "10.0.0.3:8080".parse().expect("valid");
    let labels = TrafficLabels::new("destination", caller.peer(), &Default::default(), &me);
    // One request's check, counted in metrics when `counted`.
    let decide = |counted: bool| {
        let path = normalize_path(path);
        let http = HttpAttributes {
            method: "POST",
            host: "echo.bench.svc.cluster.local:80",
            path: &path,
            headers: &headers,
        };
        let attributes = caller.attributes(8080, Some(http));
        let decision = if counted {
            authorize::check(&policy, &attributes, target, &metrics, &labels)
        } else {
            policy.check(&attributes)
        };
        assert!(decision.allowed());
    };
    let (check_ns, check_allocs) = measure(n, || decide(false));
    let (full_ns, full_allocs) = measure(n, || decide(true));
    let (labels_ns, labels_allocs) = measure(n, || {
        std::hint::black_box(TrafficLabels::new(
            "destination",
            caller.peer(),
            &Default::default(),
            &me,
        ));
    });
    println!("20 rules (10 DENY missed, 10 ALLOW, the last admits), one HTTP request, {n} runs:");
    println!(
        "  check:                    {check_ns:>7.0} ns, {check_allocs:.2} allocations per request"
    );
    println!(
        "  check, counted in metrics: {full_ns:>6.0} ns, {full_allocs:.2} allocations per request"
    );
    println!(
        "  the request's metric labels, made once per request for both counts: {labels_ns:.0} ns, {labels_allocs:.2} allocations"
    );
}
