//! The lab API server at scale: N objects listed and watched by W concurrent
//! watchers, and how long one update takes to reach every watcher.
//!
//! The server runs on its own runtime thread and the clients on another, so
//! the two get a core each on a two-core machine. Watchers are raw HTTP/1.1
//! watch streams over TLS, timing the arrival of each event line: the
//! measurement is the server's delivery, not a client library's decoding.
//! Latency runs from just before the update request is sent to the moment a
//! watcher reads the event, so it includes the write itself.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use weft_lab::{ApiServer, ApiServerConfig};

use crate::report;

#[derive(Clone, Debug)]
pub struct Options {
    pub objects: usize,
    pub watchers: usize,
    pub updates: usize,
    pub warmup: usize,
    /// Pause between updates, so each is measured alone.
    pub gap: Duration,
    pub target_p99_ms: f64,
}

pub struct Outcome {
    pub markdown: String,
    pub passed: bool,
}

/// A client connection to the lab API server.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    token: String,
}

impl Conn {
    async fn open(addr: std::net::SocketAddr, ca_pem: &str, token: &str) -> Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in weft_certs::pem::certificates("lab CA", ca_pem)? {
            roots.add(cert)?;
        }
        let tls = rustls::ClientConfig::builder_with_provider(weft_certs::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
            .connect(rustls_pki_types::ServerName::try_from("localhost")?, tcp)
            .await?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        Ok(Conn {
            sender,
            token: token.to_string(),
        })
    }

    async fn send(
        &mut self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<http::Response<hyper::body::Incoming>> {
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("authorization", format!("Bearer {}", self.token))
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))?;
        self.sender.ready().await?;
        Ok(self.sender.send_request(request).await?)
    }

    async fn json(
        &mut self,
        method: &str,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Value> {
        let response = self.send(method, path, content_type, body).await?;
        let status = response.status();
        let bytes = response.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!(
                "{method} {path}: {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        Ok(serde_json::from_slice(&bytes)?)
    }
}

/// A pod of a realistic size (about 1 KiB of JSON).
fn pod(i: usize) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("echo-{i:05}"),
            "labels": {"app": "echo", "version": format!("v{}", i % 3), "pod-template-hash": "5d8f9c7b6"},
            "annotations": {"sidecar.weft.io/status": "{\"version\":\"1\",\"initContainers\":[\"weft-init\"],\"containers\":[\"weft-proxy\"]}"},
        },
        "spec": {
            "serviceAccountName": "echo",
            "containers": [
                {"name": "echo", "image": "weft/echo:0.1", "ports": [{"containerPort": 8080, "name": "http"}],
                 "env": [{"name": "CLUSTER", "value": "c1"}, {"name": "VERSION", "value": "v1"}]},
                {"name": "weft-proxy", "image": "weft/proxy:0.1", "args": ["proxy", "sidecar"],
                 "ports": [{"containerPort": 15008, "name": "hbone"}, {"containerPort": 15021, "name": "health"}]},
            ],
        },
    })
}

/// Reads one watch stream and reports (resourceVersion, arrival) per event.
async fn watch(
    mut conn: Conn,
    path: String,
    arrivals: mpsc::UnboundedSender<(u64, Instant)>,
) -> Result<()> {
    let response = conn
        .send("GET", &path, "application/json", Vec::new())
        .await?;
    if !response.status().is_success() {
        bail!("watch {path}: {}", response.status());
    }
    let mut body = response.into_body();
    let mut buffer: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let now = Instant::now();
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        buffer.extend_from_slice(&data);
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            if let Some(rv) = resource_version(&line) {
                // The coordinator may have finished; nothing to do then.
                let _ = arrivals.send((rv, now));
            }
        }
    }
    Ok(())
}

/// The first `"resourceVersion":"N"` in a line, without parsing the JSON.
fn resource_version(line: &[u8]) -> Option<u64> {
    const KEY: &[u8] = b"\"resourceVersion\":\"";
    let start = line.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let digits = &line[start..];
    let end = digits.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&digits[..end]).ok()?.parse().ok()
}

/// Marks a created pod running and ready at `ip`, as its kubelet would.
pub async fn mark_running(
    pods: &kube::Api<k8s_openapi::api::core::v1::Pod>,
    name: &str,
    ip: &str,
) -> Result<()> {
    let ready = [serde_json::json!({"type": "Ready", "status": "True"})];
    let status = serde_json::json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "conditions": ready}});
    let patch = kube::api::Patch::Merge(status);
    pods.patch_status(name, &Default::default(), &patch).await?;
    Ok(())
}

pub fn run(options: &Options, command: &str) -> Result<Outcome> {
    // The server gets a runtime (and so a core) of its own.
    let server_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("lab-apiserver")
        .enable_all()
        .build()?;
    let server = server_runtime
        .block_on(ApiServer::start(ApiServerConfig {
            history_limit: options.objects.max(10_000),
            ..ApiServerConfig::default()
        }))
        .context("starting the lab API server")?;
    let client_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("bench-clients")
        .enable_all()
        .build()?;
    let outcome = client_runtime.block_on(drive(&server, options, command));
    server_runtime.block_on(server.stop());
    outcome
}

async fn drive(server: &ApiServer, options: &Options, command: &str) -> Result<Outcome> {
    let addr = server.addr();
    let ca = server.ca_pem().to_string();
    let token = server.admin_token().to_string();
    let mut admin = Conn::open(addr, &ca, &token).await?;
    admin
        .json(
            "POST",
            "/api/v1/namespaces",
            "application/json",
            serde_json::to_vec(&json!({"metadata": {"name": "bench"}}))?,
        )
        .await?;

    // Load.
    let rss_before = report::rss_bytes();
    let json_bytes = serde_json::to_vec(&pod(0))?.len();
    let started = Instant::now();
    let writers = 8usize;
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut conn = Conn::open(addr, &ca, &token).await?;
        let range: Vec<usize> = (0..options.objects).filter(|i| i % writers == w).collect();
        tasks.push(tokio::spawn(async move {
            for i in range {
                conn.json(
                    "POST",
                    "/api/v1/namespaces/bench/pods",
                    "application/json",
                    serde_json::to_vec(&pod(i))?,
                )
                .await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let load_time = started.elapsed();
    let rss_loaded = report::rss_bytes();
    let per_object = rss_loaded.saturating_sub(rss_before) as f64 / options.objects as f64;

    // Every watcher lists everything, then watches from the list's version.
    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel();
    let mut list_times = Histogram::<u64>::new(3)?;
    let list_started = Instant::now();
    let mut listers = Vec::new();
    for _ in 0..options.watchers {
        let mut conn = Conn::open(addr, &ca, &token).await?;
        let arrivals = arrivals_tx.clone();
        listers.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let list = conn.json("GET", "/api/v1/namespaces/bench/pods", "application/json", Vec::new()).await?;
            let took = t0.elapsed();
            let items = list["items"].as_array().map_or(0, Vec::len);
            let rv = list["metadata"]["resourceVersion"].as_str().unwrap_or("0").to_string();
            let path = format!("/api/v1/namespaces/bench/pods?watch=true&resourceVersion={rv}&allowWatchBookmarks=true&timeoutSeconds=3600");
            tokio::spawn(async move {
                if let Err(err) = watch(conn, path, arrivals).await {
                    eprintln!("watcher ended: {err:#}");
                }
            });
            anyhow::Ok((took, items))
        }));
    }
    drop(arrivals_tx);
    for lister in listers {
        let (took, items) = lister.await??;
        if items != options.objects {
            bail!(
                "a watcher listed {items} objects, expected {}",
                options.objects
            );
        }
        list_times.record(took.as_micros() as u64)?;
    }
    let all_listed = list_started.elapsed();
    // Let the watch requests reach the server before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    while arrivals.try_recv().is_ok() {}

    let mut delivery = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut slowest = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut missing = 0usize;
    let mut early: HashMap<u64, Vec<Instant>> = HashMap::new();
    for n in 0..(options.warmup + options.updates) {
        let name = format!("echo-{:05}", n % options.objects);
        let patch =
            serde_json::to_vec(&json!({"metadata": {"labels": {"bench-seq": n.to_string()}}}))?;
        let t0 = Instant::now();
        let updated = admin
            .json(
                "PATCH",
                &format!("/api/v1/namespaces/bench/pods/{name}"),
                "application/merge-patch+json",
                patch,
            )
            .await?;
        let rv: u64 = updated["metadata"]["resourceVersion"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .context("the update returned no resourceVersion")?;
        let mut got = early.remove(&rv).unwrap_or_default();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while got.len() < options.watchers {
            match tokio::time::timeout_at(deadline, arrivals.recv()).await {
                Ok(Some((event_rv, at))) if event_rv == rv => got.push(at),
                Ok(Some((event_rv, at))) if event_rv > rv => {
                    early.entry(event_rv).or_default().push(at)
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        if n < options.warmup {
            continue;
        }
        missing += options.watchers - got.len();
        let mut worst = 0u64;
        for at in &got {
            let us = at.saturating_duration_since(t0).as_micros().max(1) as u64;
            delivery.record(us)?;
            worst = worst.max(us);
        }
        if got.len() == options.watchers {
            slowest.record(worst)?;
        }
        tokio::time::sleep(options.gap).await;
    }
    let rss_end = report::rss_bytes();

    let d = report::percentiles_ms(&delivery);
    let s = report::percentiles_ms(&slowest);
    let l = report::percentiles_ms(&list_times);
    let passed = missing == 0 && d[2] < options.target_p99_ms;
    let markdown = format!(
        "# Lab API server: {objects} objects, {watchers} watchers\n\n\
         {header}\n\
         The server runs on one runtime thread, the {watchers} watchers and the writer on another, \
         in one process. Each watcher lists all objects, then watches from the list's \
         resourceVersion over its own HTTP/1.1 TLS connection. Updates are JSON merge patches \
         of one pod's labels, one at a time, {gap} ms apart, after {warmup} warm-up updates. \
         Latency runs from just before the PATCH is sent to the arrival of the event line at a watcher.\n\n\
         ## Update to watchers\n\n\
         | measure | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | samples |\n|---|---|---|---|---|---|---|\n\
         | update reaches one watcher | {one} |\n\
         | update reaches all {watchers} watchers | {all} |\n\n\
         Events not delivered within 5 s: {missing}.\n\n\
         **Target:** p99 of an update reaching a watcher under {target} ms: **{verdict}** ({d2:.3} ms).\n\n\
         ## Load and list\n\n\
         | measure | value |\n|---|---|\n\
         | objects created (8 concurrent writers) | {objects} in {load:.2} s ({rate:.0}/s) |\n\
         | JSON size of one object | {json_bytes} B |\n\
         | memory per stored object (RSS growth / objects) | {per_object:.0} B |\n\
         | RSS after load / at end | {rss_loaded_mb:.1} MiB / {rss_end_mb:.1} MiB |\n\
         | one full list, p50 / p99 / max | {l0:.1} / {l2:.1} / {l4:.1} ms |\n\
         | {watchers} concurrent full lists, all done | {all_listed:.2} s |\n",
        objects = options.objects,
        watchers = options.watchers,
        header = report::header(command),
        gap = options.gap.as_millis(),
        warmup = options.warmup,
        one = report::cells(&d, 3),
        all = report::cells(&s, 3),
        d2 = d[2],
        target = options.target_p99_ms,
        verdict = if passed { "met" } else { "NOT met" },
        load = load_time.as_secs_f64(),
        rate = options.objects as f64 / load_time.as_secs_f64(),
        rss_loaded_mb = rss_loaded as f64 / 1048576.0,
        rss_end_mb = rss_end as f64 / 1048576.0,
        l0 = l[0],
        l2 = l[2],
        l4 = l[4],
        all_listed = all_listed.as_secs_f64(),
    );
    Ok(Outcome { markdown, passed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_resource_version_in_an_event_line() {
        let line =
            br#"{"type":"MODIFIED","object":{"metadata":{"name":"a","resourceVersion":"1234"}}}"#;
        assert_eq!(resource_version(line), Some(1234));
        assert_eq!(resource_version(b"{}"), None);
    }

    /// The scenario end to end at a small size: every update reaches every
    /// watcher. (Timing targets are checked by the benchmark run, not here.)
    #[test]
    fn small_run_delivers_every_update_to_every_watcher() {
        let options = Options {
            objects: 50,
            watchers: 4,
            updates: 10,
            warmup: 2,
            gap: Duration::from_millis(1),
            target_p99_ms: f64::INFINITY,
        };
        let outcome = run(&options, "test").unwrap();
        assert!(
            outcome
                .markdown
                .contains("Events not delivered within 5 s: 0."),
            "{}",
            outcome.markdown
        );
        assert!(outcome.passed);
    }
}
