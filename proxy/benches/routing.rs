//! What traffic policy costs per request, without the noise of a loaded
//! machine: the bench scenario's ten routes (nine the request misses, the
//! last to a subset) and its DestinationRule, looked up and applied for
//! one request as the outbound side does, over many runs. The allocations
//! each decision makes are counted by the allocator (the target is none).
//!
//! `cargo bench -p weft-proxy --bench routing`

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use http::HeaderMap;
use prost::Message;
use weft_proxy::resources::Interner;
use weft_proxy::routes::{RequestView, decode_destination, decode_route_set, weighted};
use weft_proxy::state::{Local, Snapshot};
use weft_xds_proto::mesh::{self, value_match};
use weft_xds_proto::testing;

#[path = "support/counting.rs"]
mod counting;
use counting::ALLOCATIONS;

const HOST: &str = "echo.bench.svc.cluster.local";

fn value(kind: value_match::Kind) -> Option<mesh::ValueMatch> {
    Some(mesh::ValueMatch {
        kind: Some(kind),
        invert: false,
    })
}

fn named(name: &str, kind: value_match::Kind) -> mesh::NamedMatch {
    mesh::NamedMatch {
        name: name.into(),
        value: value(kind),
    }
}

/// The same ten routes as `weft-perf bench`'s routing scenario.
fn route_set() -> mesh::RouteSet {
    use value_match::Kind;
    let to_all = vec![mesh::Backend {
        host: HOST.into(),
        subset: "all".into(),
        weight: 100,
        ..Default::default()
    }];
    let mut http: Vec<mesh::HttpRoute> = (0..9)
        .map(|i| {
            let matched = match i % 3 {
                0 => mesh::RouteMatch {
                    headers: vec![named(
                        &format!("x-bench-route-{i}"),
                        Kind::Exact("yes".into()),
                    )],
                    ..Default::default()
                },
                1 => mesh::RouteMatch {
                    path: value(Kind::Prefix(format!("/api/v{i}/"))),
                    headers: vec![named(":method", Kind::Exact("POST".into()))],
                    ..Default::default()
                },
                _ => mesh::RouteMatch {
                    path: value(Kind::Regex("/items/[0-9]+".into())),
                    query_params: vec![named("variant", Kind::Exact(i.to_string()))],
                    ..Default::default()
                },
            };
            mesh::HttpRoute {
                matches: vec![matched],
                backends: to_all.clone(),
                ..Default::default()
            }
        })
        .collect();
    http.push(mesh::HttpRoute {
        backends: to_all,
        timeout_ms: 10_000,
        retries: Some(mesh::RetryPolicy {
            attempts: 2,
            retry_on: vec![
                "connect-failure".into(),
                "refused-stream".into(),
                "retriable-status-codes".into(),
            ],
            codes: vec![503],
            set: true,
            ..Default::default()
        }),
        ..Default::default()
    });
    mesh::RouteSet {
        name: "virtualservice/bench/bench-routes".into(),
        namespace: "bench".into(),
        hosts: vec![HOST.into()],
        export_to: vec!["*".into()],
        http,
        ..Default::default()
    }
}

fn destination() -> mesh::DestinationPolicy {
    mesh::DestinationPolicy {
        name: "bench/bench-echo".into(),
        namespace: "bench".into(),
        host: HOST.into(),
        export_to: vec!["*".into()],
        policy: Some(mesh::TrafficPolicy {
            simple: mesh::LoadBalancerSimple::LeastRequest as i32,
            has_lb: true,
            pool: Some(mesh::ConnectionPool {
                max_requests: 100_000,
                ..Default::default()
            }),
            has_pool: true,
            outlier: Some(mesh::OutlierPolicy {
                consecutive_5xx: 5,
                base_ejection_ms: 30_000,
                max_ejection_percent: 50,
                ..Default::default()
            }),
            has_outlier: true,
            ..Default::default()
        }),
        subsets: vec![mesh::Subset {
            name: "all".into(),
            labels: [("app".to_string(), "echo".to_string())].into(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn main() {
    let service = testing::service(
        "bench",
        "echo",
        [10, 96, 0, 10],
        vec![testing::port(80, "http", mesh::AppProtocol::Http, 8080)],
    );
    let workloads: Vec<mesh::Workload> = (0..10u8)
        .map(|n| mesh::Workload {
            labels: [("app".to_string(), "echo".to_string())].into(),
            ..testing::workload(
                &format!("c1/bench/echo-{n}"),
                vec![10, 1, 0, n + 1],
                "echo",
                vec![testing::binding("bench", HOST, &[(80, 8080)])],
            )
        })
        .collect();
    let names = &mut Interner::default();
    let routes = Arc::new(decode_route_set("r", &route_set().encode_to_vec(), names).unwrap());
    let rule = Arc::new(decode_destination("d", &destination().encode_to_vec(), names).unwrap());
    let snapshot = Snapshot::from_messages(&[service], &workloads)
        .unwrap()
        .with_traffic([routes], [rule], &Local::default());
    let request = http::Request::post("http://echo.bench.svc.cluster.local/")
        .header("content-type", "application/octet-stream")
        .header("user-agent", "weft-perf")
        .body(())
        .unwrap();
    let (parts, ()) = request.into_parts();
    let headers: &HeaderMap = &parts.headers;

    // One routing decision, as `outbound::l7` and `outbound` make it.
    let decide = |path: &str, query: Option<&str>| {
        let service = snapshot.service(HOST, 80).expect("service");
        let routes = snapshot.routes_for(&service.hostname).expect("routes");
        let view = RequestView {
            method: parts.method.as_str(),
            authority: HOST,
            scheme: "http",
            path,
            query,
            headers,
            port: 80,
        };
        let entry = routes.route(&view).expect("a route matches");
        let backend = weighted(&entry.rule.backends, entry.rule.total_weight).expect("a backend");
        let rule = snapshot.destination_for(&backend.host).expect("a rule");
        let policy = rule.policy(&backend.subset, 80).expect("a policy");
        let subset = rule.subset(&backend.subset).expect("the subset");
        let candidates = snapshot
            .endpoints(service)
            .iter()
            .filter(|w| subset.selects(w))
            .count();
        std::hint::black_box((entry.rule.timeout, policy.pool.as_ref(), candidates))
    };
    // The bench scenario's request misses nine routes and takes the
    // last; the second request takes the third, the first whose path is
    // a regex, which it must match.
    let cases = [
        (
            "the request takes the last",
            parts.uri.path(),
            parts.uri.query(),
        ),
        (
            "the request takes the third, by its regex",
            "/items/20261201",
            Some("variant=2"),
        ),
    ];
    for (taken, path, query) in cases {
        for _ in 0..10_000 {
            decide(path, query);
        }
        let rounds = 1_000_000u32;
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        let started = Instant::now();
        for _ in 0..rounds {
            decide(path, query);
        }
        let elapsed = started.elapsed();
        let allocations = ALLOCATIONS.load(Ordering::Relaxed) - before;
        println!(
            "routing: 10 routes ({taken}) and a DestinationRule with a subset over 10 endpoints: {:.0} ns per decision, {:.2} allocations per decision (mean of {rounds})",
            elapsed.as_nanos() as f64 / f64::from(rounds),
            allocations as f64 / f64::from(rounds)
        );
    }
}
