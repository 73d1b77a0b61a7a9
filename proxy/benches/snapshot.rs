//! What a large mesh costs the sidecar in memory, counted by the allocator
//! rather than read off RSS: bytes held per workload by the decoded
//! resources and by the snapshot's indexes, and the peak while an initial
//! sync is applied. Repeatable to the byte for the same code.
//!
//! Then traffic policy at the same size: one VirtualService (three rules)
//! and one DestinationRule (two subsets) per service, and the bytes each
//! costs on the wire and in the snapshot.
//!
//! `cargo bench -p weft-proxy --bench snapshot [-- SERVICES WORKLOADS]`

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use prost::Message;
use weft_proxy::xds::Resources;
use weft_xds_proto::discovery::{DeltaDiscoveryResponse, Resource};
use weft_xds_proto::{mesh, testing, type_url};

/// The system allocator, counting live bytes and their high-water mark.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(now, Ordering::Relaxed);
        // SAFETY: forwarded as received.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded as received.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// A workload as the control plane describes a pod of `service`.
fn workload(n: usize, service: usize) -> mesh::Workload {
    let name = format!("pod-{n}");
    mesh::Workload {
        uid: format!("c1/scale/{name}"),
        name,
        namespace: "scale".into(),
        cluster_id: "c1".into(),
        network: "lab".into(),
        addresses: vec![vec![
            10,
            100 + (n / 62500) as u8,
            (n / 250 % 250) as u8,
            (1 + n % 250) as u8,
        ]],
        locality: Some(testing::locality("lab", "c1-a")),
        identity: Some(testing::identity("scale", "scale")),
        services: vec![testing::binding(
            "scale",
            &format!("svc-{service}.scale.svc.cluster.local"),
            &[(80, 8080)],
        )],
        tunnel_protocol: mesh::TunnelProtocol::Hbone as i32,
        node: "lab-node-c1".into(),
        canonical_name: format!("svc-{service}"),
        ..Default::default()
    }
}

fn service(n: usize) -> mesh::Service {
    mesh::Service {
        name: format!("svc-{n}"),
        namespace: "scale".into(),
        hostname: format!("svc-{n}.scale.svc.cluster.local"),
        vips: vec![mesh::ClusterVip {
            cluster_id: "c1".into(),
            network: "lab".into(),
            address: vec![10, 96, (n / 250) as u8, (1 + n % 250) as u8],
        }],
        ports: vec![mesh::ServicePort {
            port: 80,
            name: "http".into(),
            app_protocol: mesh::AppProtocol::Http as i32,
            target_port: 8080,
        }],
        clusters: vec!["c1".into()],
        ..Default::default()
    }
}

fn response(url: &str, resources: Vec<(String, Vec<u8>)>) -> DeltaDiscoveryResponse {
    DeltaDiscoveryResponse {
        type_url: url.into(),
        nonce: "1".into(),
        resources: resources
            .into_iter()
            .map(|(name, value)| Resource {
                version: format!("{:016x}", value.len() * 7919),
                name,
                resource: Some(prost_types::Any {
                    type_url: url.into(),
                    value,
                }),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let services = args.first().copied().unwrap_or(1_000);
    let workloads = args.get(1).copied().unwrap_or(10_000);
    let per = workloads.div_ceil(services.max(1));

    // The updates as they arrive: services in one response, workloads in
    // chunks of 1,000 (as weft-control sends an initial sync).
    let service_update = response(
        type_url::SERVICE,
        (0..services)
            .map(|n| {
                let s = service(n);
                (format!("scale/{}", s.hostname), s.encode_to_vec())
            })
            .collect(),
    );
    let workload_updates: Vec<DeltaDiscoveryResponse> = (0..workloads)
        .collect::<Vec<_>>()
        .chunks(1_000)
        .map(|chunk| {
            response(
                type_url::WORKLOAD,
                chunk
                    .iter()
                    .map(|&n| {
                        let w = workload(n, n / per);
                        (w.uid.clone(), w.encode_to_vec())
                    })
                    .collect(),
            )
        })
        .collect();

    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let mut resources = Resources::default();
    resources.apply(&service_update).expect("valid services");
    let mut snapshot = resources.snapshot(&Default::default());
    for update in &workload_updates {
        resources.apply(update).expect("valid workloads");
        // As the client does: the new snapshot replaces the old one.
        snapshot = resources.snapshot(&Default::default());
    }
    let peak = PEAK.load(Ordering::Relaxed) - before;
    let with_snapshot = LIVE.load(Ordering::Relaxed) - before;
    drop(snapshot);
    let held = LIVE.load(Ordering::Relaxed) - before;
    let indexes = with_snapshot - held;

    // What one more update costs once the mesh is large: the resources
    // are shared, the indexes rebuilt.
    let one_pod = response(
        type_url::WORKLOAD,
        vec![{
            let w = workload(0, 0);
            (w.uid.clone(), w.encode_to_vec())
        }],
    );
    let rounds = 200u32;
    let mut slowest = std::time::Duration::ZERO;
    let started = std::time::Instant::now();
    for _ in 0..rounds {
        let one = std::time::Instant::now();
        resources.apply(&one_pod).expect("valid workload");
        drop(resources.snapshot(&Default::default()));
        slowest = slowest.max(one.elapsed());
    }
    let per_update = started.elapsed() / rounds;

    let kib = |b: usize| b as f64 / 1024.0;
    let each = |b: usize| b as f64 / workloads.max(1) as f64;
    println!("{services} services, {workloads} workloads ({per} per service)");
    println!(
        "  resources held, with the workloads' indexes: {:>9.1} KiB  ({:.0} B per workload)",
        kib(held),
        each(held)
    );
    println!(
        "  a snapshot on top (the services' indexes): {:>9.1} KiB  ({:.0} B per workload)",
        kib(indexes),
        each(indexes)
    );
    println!(
        "  total:            {:>9.1} KiB  ({:.0} B per workload)",
        kib(with_snapshot),
        each(with_snapshot)
    );
    println!(
        "  peak while syncing (updates in memory excluded): {:.1} KiB",
        kib(peak)
    );
    println!(
        "  one pod changed at this size: {:.3} ms to apply it and publish a snapshot (mean of {rounds}; slowest {:.3} ms; target 0.2 ms)",
        per_update.as_secs_f64() * 1000.0,
        slowest.as_secs_f64() * 1000.0
    );

    routes(&mut resources, services);
}

/// A canary VirtualService for service `n`: a header match, a prefix
/// match with a retry policy and a timeout, and a 90/10 split.
fn route_set(n: usize) -> mesh::RouteSet {
    use mesh::value_match::Kind;
    let host = format!("svc-{n}.scale.svc.cluster.local");
    let to = |subset: &str, weight| mesh::Backend {
        host: host.clone(),
        subset: subset.into(),
        weight,
        ..Default::default()
    };
    let matched = |m: mesh::RouteMatch, backends| mesh::HttpRoute {
        matches: vec![m],
        backends,
        ..Default::default()
    };
    mesh::RouteSet {
        name: format!("svc-{n}"),
        namespace: "scale".into(),
        hosts: vec![host.clone()],
        export_to: vec!["*".into()],
        http: vec![
            matched(
                mesh::RouteMatch {
                    headers: vec![mesh::NamedMatch {
                        name: "x-canary".into(),
                        value: Some(mesh::ValueMatch {
                            kind: Some(Kind::Exact("yes".into())),
                            invert: false,
                        }),
                    }],
                    ..Default::default()
                },
                vec![to("v2", 100)],
            ),
            mesh::HttpRoute {
                timeout_ms: 2000,
                retries: Some(mesh::RetryPolicy {
                    attempts: 3,
                    retry_on: vec!["5xx".into()],
                    set: true,
                    ..Default::default()
                }),
                ..matched(
                    mesh::RouteMatch {
                        path: Some(mesh::ValueMatch {
                            kind: Some(Kind::Prefix("/api/".into())),
                            invert: false,
                        }),
                        ..Default::default()
                    },
                    vec![to("v1", 100)],
                )
            },
            mesh::HttpRoute {
                backends: vec![to("v1", 90), to("v2", 10)],
                ..Default::default()
            },
        ],
        ..Default::default()
    }
}

fn destination(n: usize) -> mesh::DestinationPolicy {
    let subset = |name: &str| mesh::Subset {
        name: name.into(),
        labels: [("version".to_string(), name.to_string())].into(),
        ..Default::default()
    };
    mesh::DestinationPolicy {
        name: format!("scale/svc-{n}"),
        namespace: "scale".into(),
        host: format!("svc-{n}.scale.svc.cluster.local"),
        subsets: vec![subset("v1"), subset("v2")],
        export_to: vec!["*".into()],
        ..Default::default()
    }
}

/// What traffic policy for every service costs in the snapshot.
fn routes(resources: &mut Resources, services: usize) {
    let routes: Vec<(String, Vec<u8>)> = (0..services)
        .map(|n| {
            (
                format!("virtualservice/scale/svc-{n}"),
                route_set(n).encode_to_vec(),
            )
        })
        .collect();
    let rules: Vec<(String, Vec<u8>)> = (0..services)
        .map(|n| (format!("scale/svc-{n}"), destination(n).encode_to_vec()))
        .collect();
    let wire_routes: usize = routes.iter().map(|(_, b)| b.len()).sum();
    let wire_rules: usize = rules.iter().map(|(_, b)| b.len()).sum();
    let before = LIVE.load(Ordering::Relaxed);
    let without = resources.snapshot(&Default::default());
    let base = LIVE.load(Ordering::Relaxed) - before;
    drop(without);
    let routes = response(type_url::ROUTE_SET, routes);
    let rules = response(type_url::DESTINATION_POLICY, rules);
    let before = LIVE.load(Ordering::Relaxed);
    resources.apply(&routes).expect("valid routes");
    let held_routes = LIVE.load(Ordering::Relaxed) - before;
    resources.apply(&rules).expect("valid destination policies");
    let held = LIVE.load(Ordering::Relaxed) - before;
    let held_rules = held - held_routes;
    let snapshot = resources.snapshot(&Default::default());
    let with = LIVE.load(Ordering::Relaxed) - before - held;
    let started = std::time::Instant::now();
    let rounds = 20u32;
    for _ in 0..rounds {
        drop(resources.snapshot(&Default::default()));
    }
    let rebuild = started.elapsed() / rounds;
    drop(snapshot);
    let each = |b: usize| b as f64 / services.max(1) as f64;
    println!(
        "traffic policy: a VirtualService (3 rules) and a DestinationRule (2 subsets) per service"
    );
    println!(
        "  on the wire:      {:.0} B per route set ({:.0} B per rule), {:.0} B per destination policy",
        each(wire_routes),
        each(wire_routes) / 3.0,
        each(wire_rules)
    );
    println!(
        "  held, compiled:   {:.0} B per route set ({:.0} B per rule), {:.0} B per destination policy",
        each(held_routes),
        each(held_routes) / 3.0,
        each(held_rules)
    );
    println!(
        "  snapshot indexes: {:.0} B per host more than without policy",
        each(with.saturating_sub(base))
    );
    println!(
        "  snapshot rebuild with policy for every service, the policy unchanged (reused): {:.2} ms (mean of {rounds})",
        rebuild.as_secs_f64() * 1000.0
    );
}
