//! The control plane at scale: three lab clusters of N workloads each, one
//! `weft-control` process (so that its memory is its own), and P simulated
//! proxies on delta xDS streams. An EndpointSlice change in a remote cluster
//! is timed from just before the write to its arrival at every proxy; the
//! bytes pushed per change come from the control plane's own metrics.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use hdrhistogram::Histogram;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_lab::{ApiServer, ApiServerConfig};
use weft_xds_proto::discovery::aggregated_discovery_service_server::SERVICE_NAME;
use weft_xds_proto::discovery::{DeltaDiscoveryRequest, Resource};
use weft_xds_proto::prost::Message;
use weft_xds_proto::type_url;

use crate::report;

#[derive(Clone, Debug)]
pub struct Options {
    pub clusters: usize,
    pub workloads_per_cluster: usize,
    pub pods_per_service: usize,
    pub proxies: usize,
    pub proxies_per_connection: usize,
    pub changes: usize,
    pub target_p99_ms: f64,
    pub target_rss_mb: f64,
    /// Every proxy holds every workload this long after they connect.
    pub target_sync_s: f64,
}

pub use crate::apiserver::Outcome;

async fn client_for(server: &ApiServer) -> Result<kube::Client> {
    Ok(server.client().await?)
}

fn ip(cluster: usize, n: usize) -> String {
    format!("10.{}.{}.{}", 10 + cluster, n / 250, 1 + n % 250)
}

/// Services of `pods_per_service` ready pods each, with their slices.
async fn populate(client: &kube::Client, cluster: usize, options: &Options) -> Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in ["weft-system", "bench"] {
        namespaces
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
            )
            .await?;
    }
    let services: Api<Service> = Api::namespaced(client.clone(), "bench");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "bench");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "bench");
    let service_count = options
        .workloads_per_cluster
        .div_ceil(options.pods_per_service);
    for s in 0..service_count {
        let svc = json!({"metadata": {"name": format!("svc-{s}")}, "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}});
        services
            .create(&PostParams::default(), &serde_json::from_value(svc)?)
            .await?;
    }
    let results: Vec<Result<()>> = futures::stream::iter(0..options.workloads_per_cluster)
        .map(|n| {
            let pods = pods.clone();
            async move {
                let name = format!("pod-{n}");
                let pod = json!({
                    "metadata": {"name": name, "labels": {"app": format!("svc-{}", n / options.pods_per_service)}, "annotations": {"sidecar.weft.io/status": "{}"}},
                    "spec": {"serviceAccountName": "bench", "nodeName": "node-1", "containers": [{"name": "app", "image": "bench"}]},
                });
                pods.create(&PostParams::default(), &serde_json::from_value(pod)?).await?;
                crate::apiserver::mark_running(&pods, &name, &ip(cluster, n)).await
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect::<Result<()>>()?;
    for s in 0..service_count {
        let members = (s * options.pods_per_service)
            ..((s + 1) * options.pods_per_service).min(options.workloads_per_cluster);
        slices
            .create(
                &PostParams::default(),
                &serde_json::from_value(slice(cluster, s, members, None))?,
            )
            .await?;
    }
    Ok(())
}

/// The slice of service `s`; `not_ready` marks one member unready.
fn slice(
    cluster: usize,
    s: usize,
    members: std::ops::Range<usize>,
    not_ready: Option<usize>,
) -> serde_json::Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": format!("svc-{s}-slice"), "namespace": "bench", "labels": {"kubernetes.io/service-name": format!("svc-{s}")}},
        "addressType": "IPv4",
        "endpoints": members.map(|n| json!({
            "addresses": [ip(cluster, n)],
            "conditions": {"ready": Some(n) != not_ready},
            "targetRef": {"kind": "Pod", "name": format!("pod-{n}"), "namespace": "bench"},
        })).collect::<Vec<_>>(),
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    })
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = String::new();
    tcp.read_to_string(&mut out).await?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Whether simulated proxies keep the resources they receive, to read
/// their names, or only count them. They count during the initial sync, so
/// that a thousand of them sharing the control plane's two cores spend
/// those on the transport rather than on parsing what each real sidecar
/// parses on its own machine; they keep names while changes are measured.
static KEEP_RESOURCES: AtomicBool = AtomicBool::new(false);

/// What a simulated proxy reads of a delta response (Envoy's
/// `DeltaDiscoveryResponse` on the wire): its type and nonce, how many
/// resources it carries, and those resources, still encoded, while
/// `KEEP_RESOURCES` is set. Received only, never sent.
#[derive(Default)]
struct Received {
    type_url: String,
    nonce: String,
    count: usize,
    kept: Vec<bytes::Bytes>,
}

impl Message for Received {
    fn encode_raw(&self, _buf: &mut impl bytes::BufMut) {
        // Never sent: the simulated proxies send `DeltaDiscoveryRequest`s.
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        use prost::encoding::{bytes as field_bytes, skip_field, string};
        match tag {
            2 => {
                self.count += 1;
                if KEEP_RESOURCES.load(Ordering::Relaxed) {
                    let mut resource = bytes::Bytes::new();
                    field_bytes::merge(wire_type, &mut resource, buf, ctx)?;
                    self.kept.push(resource);
                    Ok(())
                } else {
                    skip_field(wire_type, tag, buf, ctx)
                }
            }
            4 => string::merge(wire_type, &mut self.type_url, buf, ctx),
            5 => string::merge(wire_type, &mut self.nonce, buf, ctx),
            _ => skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        0
    }

    fn clear(&mut self) {
        *self = Received::default();
    }
}

/// A simulated proxy: subscribes to both types, ACKs everything, counts
/// workloads, and while measuring reports when each workload arrives.
async fn proxy(
    channel: tonic::transport::Channel,
    id: usize,
    counts: Arc<Vec<AtomicUsize>>,
    measuring: Arc<AtomicBool>,
    probes: mpsc::UnboundedSender<(String, Instant)>,
) -> Result<()> {
    let (requests, outbound) = mpsc::channel(8);
    for url in [type_url::SERVICE, type_url::WORKLOAD] {
        requests
            .send(DeltaDiscoveryRequest {
                node: Some(weft_xds_proto::envoy::config::core::v3::Node {
                    id: format!("sidecar~10.200.0.1~proxy-{id}.bench~bench.svc.cluster.local"),
                    ..Default::default()
                }),
                type_url: url.into(),
                ..Default::default()
            })
            .await?;
    }
    let mut client = tonic::client::Grpc::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    client
        .ready()
        .await
        .map_err(|e| anyhow::anyhow!("xDS connection: {e}"))?;
    let path = format!("/{SERVICE_NAME}/DeltaAggregatedResources");
    let mut responses = client
        .streaming(
            tonic::Request::new(ReceiverStream::new(outbound)),
            http::uri::PathAndQuery::try_from(path)?,
            tonic_prost::ProstCodec::<DeltaDiscoveryRequest, Received>::default(),
        )
        .await?
        .into_inner();
    while let Some(response) = responses.message().await? {
        let now = Instant::now();
        if response.type_url == type_url::WORKLOAD {
            counts[id].fetch_add(response.count, Ordering::Relaxed);
            if measuring.load(Ordering::Relaxed) {
                for resource in response.kept {
                    let name = Resource::decode(resource)
                        .map(|r| r.name)
                        .unwrap_or_default();
                    let _ = probes.send((name, now));
                }
            }
        }
        let ack = DeltaDiscoveryRequest {
            type_url: response.type_url,
            response_nonce: response.nonce,
            ..Default::default()
        };
        if requests.send(ack).await.is_err() {
            break;
        }
    }
    Ok(())
}

pub fn run(options: &Options, command: &str) -> Result<Outcome> {
    report::block_on(drive(options, command))
}

async fn drive(options: &Options, command: &str) -> Result<Outcome> {
    let binary = std::env::current_exe()?
        .parent()
        .map(|d| d.join("weft-control"))
        .context("locating weft-control")?;
    if !binary.exists() {
        bail!(
            "{} is missing: build it with `cargo build --release -p weft-control -p weft-perf`",
            binary.display()
        );
    }
    let work = std::env::temp_dir().join(format!("weft-perf-control-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;

    // Clusters.
    let setup = Instant::now();
    let mut servers = Vec::new();
    let mut clients = Vec::new();
    for c in 0..options.clusters {
        let server = ApiServer::start(ApiServerConfig {
            cluster_name: format!("c{}", c + 1),
            history_limit: 50_000,
            ..Default::default()
        })
        .await?;
        let client = client_for(&server).await?;
        populate(&client, c, options)
            .await
            .with_context(|| format!("populating c{}", c + 1))?;
        clients.push(client);
        servers.push(server);
    }
    let populated = setup.elapsed();

    // The control plane, as its own process.
    let kubeconfig: PathBuf = work.join("c1.kubeconfig");
    std::fs::write(&kubeconfig, servers[0].kubeconfig())?;
    let xds: std::net::SocketAddr = free_addr()?;
    let monitoring: std::net::SocketAddr = free_addr()?;
    let tls: std::net::SocketAddr = free_addr()?;
    let mut control = tokio::process::Command::new(&binary)
        .args(["--cluster-id", "c1", "--kubeconfig"])
        .arg(&kubeconfig)
        .args([
            "--xds-plain-addr",
            &xds.to_string(),
            "--xds-addr",
            &tls.to_string(),
            "--monitoring-addr",
            &monitoring.to_string(),
        ])
        .env("RUST_LOG", "warn")
        // Its log on standard error: standard output is the report.
        .stdout(std::io::stderr())
        .kill_on_drop(true)
        .spawn()
        .context("starting weft-control")?;
    let pid = control.id().context("weft-control has no pid")?;
    let secrets: Api<Secret> = Api::namespaced(clients[0].clone(), "weft-system");
    for (c, server) in servers.iter().enumerate().skip(1) {
        let id = format!("c{}", c + 1);
        let secret = json!({
            "metadata": {"name": format!("remote-{id}"), "labels": {"weft.io/multicluster": "true"}},
            "stringData": {id: server.kubeconfig()},
        });
        secrets
            .create(&PostParams::default(), &serde_json::from_value(secret)?)
            .await?;
    }
    let total = options.clusters * options.workloads_per_cluster;
    let synced_at = Instant::now();
    loop {
        let clusters = http_get(monitoring, "/debug/clusters")
            .await
            .unwrap_or_default();
        let synced = clusters.matches("\"synced\":true").count();
        if synced == options.clusters {
            break;
        }
        if synced_at.elapsed() > Duration::from_secs(120) {
            bail!("the control plane did not sync all clusters: {clusters}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let control_synced = synced_at.elapsed();
    let rss_synced = report::proc_bytes(pid, "VmRSS:");

    // Proxies.
    let counts: Arc<Vec<AtomicUsize>> =
        Arc::new((0..options.proxies).map(|_| AtomicUsize::new(0)).collect());
    let (probe_tx, mut probes) = mpsc::unbounded_channel();
    let measuring = Arc::new(AtomicBool::new(false));
    // Set before the control plane is stopped, when streams ending is expected.
    let finished = Arc::new(AtomicBool::new(false));
    let connections = options.proxies.div_ceil(options.proxies_per_connection);
    // Counting only, whatever a run before this one in the process left.
    KEEP_RESOURCES.store(false, Ordering::Relaxed);
    let cpu_before_sync = report::proc_cpu_seconds(pid);
    let sync_started = Instant::now();
    // Connected together, as proxies starting together do: one after the
    // other, the last would wait behind the first ones' sync.
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{xds}"))?
        .initial_connection_window_size(Some(4 * 1024 * 1024))
        .initial_stream_window_size(Some(1024 * 1024))
        .max_frame_size(weft_proxy::channel::MAX_FRAME_SIZE);
    let channels =
        futures::future::try_join_all((0..connections).map(|_| endpoint.connect())).await?;
    for (conn, channel) in channels.into_iter().enumerate() {
        for p in 0..options.proxies_per_connection {
            let id = conn * options.proxies_per_connection + p;
            if id >= options.proxies {
                break;
            }
            let (channel, counts, probes) = (channel.clone(), counts.clone(), probe_tx.clone());
            let (measuring, finished) = (measuring.clone(), finished.clone());
            tokio::spawn(async move {
                let result = proxy(channel, id, counts, measuring, probes).await;
                if let Err(err) = result
                    && !finished.load(Ordering::Relaxed)
                {
                    eprintln!("proxy {id} ended early: {err:#}");
                }
            });
        }
    }
    drop(probe_tx);
    loop {
        let done = counts
            .iter()
            .filter(|c| c.load(Ordering::Relaxed) >= total)
            .count();
        if done == options.proxies {
            break;
        }
        if sync_started.elapsed() > Duration::from_secs(600) {
            bail!(
                "only {done} of {} proxies synced in 10 minutes",
                options.proxies
            );
        }
        // Finely, as this wait ends the initial sync's measurement.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let initial_sync = sync_started.elapsed();
    let cpu_sync = report::proc_cpu_seconds(pid) - cpu_before_sync;
    let rss_after_sync = report::proc_bytes(pid, "VmRSS:");
    KEEP_RESOURCES.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(500)).await;
    measuring.store(true, Ordering::Relaxed);

    // Changes: one endpoint of one service in c2 turns unready, then ready.
    let metrics_before = http_get(monitoring, "/metrics").await?;
    let cpu_before = report::proc_cpu_seconds(pid);
    let slices: Api<EndpointSlice> = Api::namespaced(clients[1].clone(), "bench");
    let mut reach_all = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut reach_one = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut missing = 0usize;
    for k in 0..options.changes {
        // Changes come in pairs on the same pod: unready, then ready again.
        let service = (k / 2) % (options.workloads_per_cluster / options.pods_per_service).max(1);
        let members =
            (service * options.pods_per_service)..((service + 1) * options.pods_per_service);
        let target = members.start + (k / 2) % options.pods_per_service;
        let not_ready = (k % 2 == 0).then_some(target);
        let uid = format!("c2/bench/pod-{target}");
        let t0 = Instant::now();
        slices
            .patch(
                &format!("svc-{service}-slice"),
                &PatchParams::default(),
                &Patch::Merge(slice(1, service, members, not_ready)),
            )
            .await?;
        let mut got = 0usize;
        let mut worst = 0u64;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while got < options.proxies {
            match tokio::time::timeout_at(deadline, probes.recv()).await {
                Ok(Some((name, at))) if name == uid => {
                    let us = at.saturating_duration_since(t0).as_micros().max(1) as u64;
                    reach_one.record(us)?;
                    worst = worst.max(us);
                    got += 1;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        missing += options.proxies - got;
        if got == options.proxies {
            reach_all.record(worst)?;
        }
        // Let the control plane's debounce settle between changes.
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let metrics_after = http_get(monitoring, "/metrics").await?;
    let cpu_changes = report::proc_cpu_seconds(pid) - cpu_before;
    let rss_end = report::proc_bytes(pid, "VmRSS:");
    let rss_peak = report::proc_bytes(pid, "VmHWM:");
    let bytes = metric(&metrics_after, "weft_control_xds_pushed_bytes_total")
        - metric(&metrics_before, "weft_control_xds_pushed_bytes_total");
    let resources = metric(&metrics_after, "weft_control_xds_pushed_resources_total")
        - metric(&metrics_before, "weft_control_xds_pushed_resources_total");
    let deliveries = (options.changes * options.proxies) as f64;
    finished.store(true, Ordering::Relaxed);
    let _ = control.kill().await;
    let _ = std::fs::remove_dir_all(&work);
    for server in servers {
        server.stop().await;
    }

    let all = report::percentiles_ms(&reach_all);
    let one = report::percentiles_ms(&reach_one);
    let mib = |b: u64| b as f64 / 1048576.0;
    let synced_in_time = initial_sync.as_secs_f64() <= options.target_sync_s;
    let passed = missing == 0
        && all[2] < options.target_p99_ms
        && mib(rss_peak) < options.target_rss_mb
        && synced_in_time;
    let markdown = format!(
        "# Control plane: {clusters} clusters × {per} workloads, {proxies} proxies\n\n\
         {header}\n\
         `weft-control` runs as its own process with the default debounce (100 ms quiet, 10 s max). \
         The lab API servers and the {proxies} simulated proxies (delta xDS over plain gRPC, \
         {per_conn} streams per HTTP/2 connection, every response ACKed; resources counted \
         without being decoded during the initial sync, their names read while changes are \
         measured) share another process. \
         Each change is a merge patch of one EndpointSlice in remote cluster c2 that turns one \
         endpoint unready or ready again; latency runs from just before the patch to the arrival \
         of the changed Workload at a proxy, debounce included.\n\n\
         ## Change to proxies\n\n\
         | measure | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | samples |\n|---|---|---|---|---|---|---|\n\
         | change reaches all {proxies} proxies | {all_cells} |\n\
         | change reaches one proxy | {one_cells} |\n\n\
         Deliveries missing after 10 s: {missing}.\n\n\
         ## Cost\n\n\
         | measure | value |\n|---|---|\n\
         | resources pushed per proxy per change | {res_per:.2} |\n\
         | bytes pushed per proxy per change | {bytes_per:.0} B |\n\
         | a service's endpoints ({pps} pods), if resent whole as EDS does | {pps} endpoints |\n\
         | control plane CPU during the {changes} changes | {cpu:.2} s |\n\
         | control plane RSS: synced, no proxies / after proxies synced / end / peak | {r1:.1} / {r2:.1} / {r3:.1} / {r4:.1} MiB |\n\
         | clusters populated (lab API servers) | {populated:.1} s |\n\
         | control plane synced all clusters | {control_synced:.1} s |\n\
         | control plane memory per proxy (RSS after the proxies synced, less before them, per proxy) | {per_proxy:.0} KiB (istiod: about 1,300 KiB, 25,000 sidecars per 32 GB) |\n\
         | initial sync of {total} workloads to {proxies} proxies | {initial:.2} s |\n\
         | control plane CPU during the initial sync | {cpu_sync:.2} s |\n\n\
         **Targets:** p99 change-to-all-proxies under {tp99} ms: **{v1}** ({a2:.1} ms); \
         initial sync in {tsync} s at most (the efficiency issue's, for 15,000 workloads to \
         1,000 proxies): **{v3}** ({initial:.2} s); \
         control plane memory under {trss} MB: **{v2}** (peak {r4:.1} MiB).\n",
        clusters = options.clusters,
        per = options.workloads_per_cluster,
        proxies = options.proxies,
        per_conn = options.proxies_per_connection,
        header = report::header(command),
        all_cells = report::cells(&all, 1),
        one_cells = report::cells(&one, 1),
        a2 = all[2],
        res_per = resources / deliveries,
        bytes_per = bytes / deliveries,
        pps = options.pods_per_service,
        changes = options.changes,
        cpu = cpu_changes,
        r1 = mib(rss_synced),
        r2 = mib(rss_after_sync),
        r3 = mib(rss_end),
        r4 = mib(rss_peak),
        per_proxy = rss_after_sync.saturating_sub(rss_synced) as f64
            / 1024.0
            / options.proxies.max(1) as f64,
        populated = populated.as_secs_f64(),
        control_synced = control_synced.as_secs_f64(),
        total = total,
        initial = initial_sync.as_secs_f64(),
        cpu_sync = cpu_sync,
        tp99 = options.target_p99_ms,
        trss = options.target_rss_mb,
        tsync = options.target_sync_s,
        v3 = if synced_in_time { "met" } else { "NOT met" },
        v1 = if all[2] < options.target_p99_ms && missing == 0 {
            "met"
        } else {
            "NOT met"
        },
        v2 = if mib(rss_peak) < options.target_rss_mb {
            "met"
        } else {
            "NOT met"
        },
    );
    Ok(Outcome { markdown, passed })
}

fn free_addr() -> Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}
