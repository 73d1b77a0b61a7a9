//! `weft-perf bench`: the data-path benchmark, all scenarios in one run so
//! that every ratio compares figures taken on the same machine at the same
//! time.
//!
//! - `direct`: load generator → echo server.
//! - `weft`: load → client `weft-proxy` (explicit mode) → mTLS HTTP/2 →
//!   server `weft-proxy` → echo. Both sidecars are real processes
//!   configured by a real `weft-control` from a lab API server.
//! - `weft cross-cluster`: the same with the echo server and its sidecar
//!   in a second lab cluster, found through a remote secret.
//! - `weft cross-network`: the same in a third cluster on a network of its
//!   own, through its east-west gateway (`networks`), with the cost of new
//!   and reused mesh connections each way.
//! - `nginx`, `HAProxy`: the same shape, two processes each (client side
//!   and server side), TLS 1.3 with client certificates between them,
//!   keep-alive upstream connections. Installed from Debian when missing
//!   and possible; skipped with the reason otherwise.
//! - `relay`: the floor. Two HAProxy processes in TCP mode, plaintext,
//!   relaying bytes without parsing them: what any two user-space proxies
//!   in series cost on this machine before doing any work of their own
//!   (process wake-ups, loopback TCP), to read the other figures against.
//!
//! Per scenario: latency at fixed rates (open loop, coordinated omission
//! corrected), maximum throughput (closed loop), CPU per 1,000 req/s and
//! peak RSS of each proxy process (from /proc). Then `wrk` against the echo
//! server directly, for the load generator's own overhead, and the client
//! sidecar's RSS with 1,000 services and 10,000 workloads in its snapshot.
//!
//! Every proxy runs with one worker (thread or process), so figures are
//! per core.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use tokio::process::{Child, Command};
use weft_lab::mesh::{self, Binaries, Cluster, ClusterOptions, MeshRoot, SidecarSpec, create};

use crate::apiserver::Outcome;
use crate::load::{self, Protocol, Summary};
use crate::networks;
use crate::report::{self, Machine, Resident};
use crate::targets::Figures;

#[derive(Clone, Debug)]
pub struct Options {
    pub rates: Vec<u64>,
    pub duration: Duration,
    pub warmup: Duration,
    pub payload: usize,
    /// Connections for the fixed-rate runs.
    pub connections: usize,
    /// Connections for the maximum-throughput runs.
    pub max_connections: usize,
    pub baselines: bool,
    pub cross_cluster: bool,
    pub snapshot_services: usize,
    pub snapshot_workloads: usize,
    /// Runtime threads per weft sidecar.
    pub proxy_threads: usize,
    /// Alternating runs with and without the 20 authorization rules.
    pub authz_pairs: usize,
    /// Alternating runs with and without 10 routes and a DestinationRule.
    pub route_pairs: usize,
    /// Also the stack's floor (`floor`), its link in HTTP/2 and in HTTP/1.1,
    /// and the floor of an HTTP/1.1 codec of weft's own.
    pub stack_floor: bool,
    /// Where plots go (next to the report); `None`: nowhere (`--no-write`).
    pub results: Option<PathBuf>,
}

const NS: &str = "bench";

fn ip(last: [u8; 2]) -> IpAddr {
    IpAddr::from([127, 77, last[0], last[1]])
}

/// A process measured from /proc.
#[derive(Clone, Debug)]
struct Measured {
    label: String,
    pid: u32,
}

/// One load run and what the proxies spent on it.
#[derive(Clone, Debug)]
struct Run {
    summary: Summary,
    proxies: Vec<ProxyCost>,
}

/// What one proxy spent during the measured part of a run.
#[derive(Clone, Debug)]
struct ProxyCost {
    label: String,
    cpu: report::CpuUse,
    peak_rss: u64,
}

impl Run {
    /// vCPU per 1,000 req/s for one proxy.
    fn vcpu_per_k(&self, cpu: f64) -> f64 {
        let rate = self.summary.achieved_rate.max(1.0);
        cpu / self.summary.seconds / (rate / 1000.0)
    }

    /// vCPU per 1,000 req/s of the proxy that spent the most.
    fn busiest_vcpu_per_k(&self) -> f64 {
        self.busiest()
            .map_or(0.0, |p| self.vcpu_per_k(p.cpu.total()))
    }

    /// The proxy that spent the most.
    fn busiest(&self) -> Option<&ProxyCost> {
        self.proxies
            .iter()
            .max_by(|a, b| a.cpu.total().total_cmp(&b.cpu.total()))
    }
}

async fn measure(options: &load::Options, proxies: &[Measured]) -> Result<Run> {
    // CPU is read across the warm-up too: the warm-up is short and steady.
    let before: Vec<report::CpuUse> = proxies.iter().map(|p| report::CpuUse::of(p.pid)).collect();
    let started = std::time::Instant::now();
    let summary = load::run(options).await?;
    let elapsed = started.elapsed().as_secs_f64();
    let share = summary.seconds / elapsed.max(summary.seconds);
    let proxies = proxies
        .iter()
        .zip(before)
        .map(|(p, b)| ProxyCost {
            label: p.label.clone(),
            cpu: report::CpuUse::of(p.pid).since(&b, share),
            peak_rss: report::proc_bytes(p.pid, "VmHWM:"),
        })
        .collect();
    Ok(Run { summary, proxies })
}

struct Scenario {
    name: String,
    /// What the load generator talks to.
    target: String,
    proxy: Option<SocketAddr>,
    grpc_target: Option<String>,
    measured: Vec<Measured>,
}

#[derive(Default)]
struct Results {
    /// scenario → runs (fixed rates in order, then max).
    fixed: BTreeMap<String, Vec<Run>>,
    max: BTreeMap<String, Run>,
    /// One connection, closed loop: each request waits for the last answer.
    single: BTreeMap<String, Run>,
    /// wrk's figures for the same one-connection run (`wrk -t1 -c1`).
    wrk_single: BTreeMap<String, WrkFigures>,
    grpc: BTreeMap<String, Run>,
    order: Vec<String>,
    skipped: Vec<String>,
    /// Where wrk's script goes, when wrk is there to cross-check with.
    wrk_dir: Option<PathBuf>,
}

async fn run_scenario(options: &Options, scenario: &Scenario, results: &mut Results) -> Result<()> {
    eprintln!("== {}", scenario.name);
    let base = load::Options {
        protocol: Protocol::Http1,
        target: scenario.target.clone(),
        proxy: scenario.proxy,
        connections: options.connections,
        duration: options.duration,
        warmup: options.warmup,
        payload: options.payload,
        ..Default::default()
    };
    let mut fixed = Vec::new();
    for rate in &options.rates {
        let run = measure(
            &load::Options {
                rate: *rate,
                ..base.clone()
            },
            &scenario.measured,
        )
        .await?;
        eprintln!("   {rate}/s: {}", run.summary.line());
        fixed.push(run);
    }
    let max = measure(
        &load::Options {
            rate: 0,
            connections: options.max_connections,
            ..base.clone()
        },
        &scenario.measured,
    )
    .await?;
    eprintln!("   max: {}", max.summary.line());
    // One connection, closed loop: the round trip a request pays when
    // nothing else is in flight (wake-ups, hand-offs, flushes per hop).
    let single = measure(
        &load::Options {
            rate: 0,
            connections: 1,
            ..base.clone()
        },
        &scenario.measured,
    )
    .await?;
    eprintln!("   one connection: {}", single.summary.line());
    if let Some(dir) = &results.wrk_dir {
        let figures = wrk(dir, scenario, 1, options).await?;
        eprintln!(
            "   wrk, one connection: {:.0}/s, p50 {:.3} ms",
            figures.rate, figures.p50_ms
        );
        results.wrk_single.insert(scenario.name.clone(), figures);
    }
    if let Some(grpc) = &scenario.grpc_target {
        let run = measure(
            &load::Options {
                protocol: Protocol::Grpc,
                target: grpc.clone(),
                rate: options.rates[0],
                ..base.clone()
            },
            &scenario.measured,
        )
        .await?;
        eprintln!("   gRPC {}/s: {}", options.rates[0], run.summary.line());
        results.grpc.insert(scenario.name.clone(), run);
    }
    results.order.push(scenario.name.clone());
    results.fixed.insert(scenario.name.clone(), fixed);
    results.max.insert(scenario.name.clone(), max);
    results.single.insert(scenario.name.clone(), single);
    Ok(())
}

async fn spawn_echo(
    binaries: &Binaries,
    dir: &Path,
    at: IpAddr,
    cluster: &str,
    pod: &str,
) -> Result<Child> {
    let log = std::fs::File::create(dir.join(format!("echo-{at}.log")))?;
    let child = Command::new(&binaries.echo)
        .args([
            "--http",
            &format!("{at}:8080"),
            "--grpc",
            &format!("{at}:9090"),
            "--tcp",
            &format!("{at}:9000"),
        ])
        .args(["--cluster", cluster, "--pod", pod])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .context("starting weft-echo")?;
    mesh::wait_http_ok(
        SocketAddr::new(at, 8080),
        "/healthz",
        Duration::from_secs(10),
    )
    .await?;
    Ok(child)
}

/// The echo Service (in every cluster, as multi-primary wants) and, where
/// `pod` is given, a ready pod behind it with a sidecar.
async fn deploy(cluster: &Cluster, service: &str, pod: Option<(&str, &str, IpAddr)>) -> Result<()> {
    create(
        &Api::<Namespace>::all(cluster.client.clone()),
        json!({"metadata": {"name": NS}}),
    )
    .await?;
    create(
        &Api::<Service>::namespaced(cluster.client.clone(), NS),
        json!({"metadata": {"name": service}, "spec": {"selector": {"app": service}, "ports": [
            {"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"},
            {"name": "grpc", "port": 90, "targetPort": 9090, "appProtocol": "grpc"},
            {"name": "tcp", "port": 9000, "targetPort": 9000},
        ]}}),
    )
    .await?;
    if let Some((name, sa, at)) = pod {
        add_pod(cluster, name, sa, service, at).await?;
    }
    weft_lab::endpoints::reconcile(&cluster.client).await?;
    Ok(())
}

async fn add_pod(cluster: &Cluster, name: &str, sa: &str, app: &str, at: IpAddr) -> Result<()> {
    let pods = Api::<Pod>::namespaced(cluster.client.clone(), NS);
    create(
        &pods,
        json!({"metadata": {"name": name, "labels": {"app": app}, "annotations": {"sidecar.weft.io/status": "{}"}},
               "spec": {"serviceAccountName": sa, "nodeName": cluster.node_name(), "containers": [{"name": "app", "image": "weft-echo"}]}}),
    )
    .await?;
    let status = json!({"status": {"phase": "Running", "podIP": at.to_string(), "podIPs": [{"ip": at.to_string()}],
                        "conditions": [{"type": "Ready", "status": "True"}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await?;
    Ok(())
}

async fn sidecar(
    cluster: &Cluster,
    root: &MeshRoot,
    (name, sa, at): (&str, &str, IpAddr),
    threads: usize,
) -> Result<Child> {
    let spec = SidecarSpec {
        pod_name: name.into(),
        namespace: NS.into(),
        service_account: sa.into(),
        pod_ip: at,
        listen_on_pod_ip: true,
        env: vec![("WEFT_WORKER_THREADS".into(), threads.to_string())],
        gateway: false,
    };
    mesh::spawn_ready_sidecar(cluster, &root.root_pem(), &spec).await
}

/// Waits until the sidecar at `at` holds at least `workloads` workloads.
async fn wait_workloads(at: IpAddr, workloads: usize, timeout: Duration) -> Result<()> {
    wait_gauge(at, "weft_proxy_workloads", workloads, timeout).await
}

/// Waits until the sidecar at `at` reports `gauge` at `value` (at least,
/// or exactly when 0).
async fn wait_gauge(at: IpAddr, gauge: &str, value: usize, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    let prefix = format!("{gauge} ");
    loop {
        if let Ok((200, text)) =
            mesh::http_get(SocketAddr::new(at, 15090), "/stats/prometheus").await
        {
            let held = text
                .lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(0.0) as usize;
            if held >= value && (value > 0 || held == 0) {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the sidecar at {at} did not reach {gauge} {value} within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The gauge that says how many policies a sidecar holds.
const POLICIES: &str = "weft_proxy_authorization_policies";

/// The runs with authorization on the server side, and plain weft again
/// after each (the first plain run is the `weft` scenario's).
fn authz_name(pair: usize) -> String {
    format!("weft + 20 authz rules #{pair}")
}

fn plain_name(pair: usize) -> String {
    if pair == 0 {
        "weft".into()
    } else {
        format!("weft, rules removed #{pair}")
    }
}

/// The gauge that says how many route objects a sidecar holds.
const ROUTE_SETS: &str = "weft_proxy_route_sets";

/// The runs with traffic policy on the client side, and plain weft again
/// after each (the first plain run is the last of the authorization
/// pairs', or the `weft` scenario's).
fn routes_name(pair: usize) -> String {
    format!("weft + 10 routes and a DestinationRule #{pair}")
}

fn routes_plain_name(options: &Options, pair: usize) -> String {
    if pair == 0 {
        plain_name(options.authz_pairs)
    } else {
        format!("weft, routes removed #{pair}")
    }
}

/// 10 routes on echo for the client's sidecar, the one the bench's
/// traffic takes last, so every request is matched against all: nine
/// that look at headers, paths, query parameters and the method, then a
/// route to a subset with a retry policy and a timeout; and a
/// DestinationRule whose subset, balancing, outlier detection and
/// connection-pool limit every request goes through.
fn traffic_rules() -> String {
    let mut rules = String::new();
    for i in 0..9 {
        let matched = match i % 3 {
            0 => format!("{{headers: {{x-bench-route-{i}: {{exact: \"yes\"}}}}}}"),
            1 => format!("{{uri: {{prefix: /api/v{i}/}}, method: {{exact: POST}}}}"),
            _ => format!(
                "{{queryParams: {{variant: {{exact: \"{i}\"}}}}, uri: {{regex: \"/items/[0-9]+\"}}}}"
            ),
        };
        rules += &format!(
            "  - match: [{matched}]\n    route: [{{destination: {{host: echo, subset: all}}}}]\n"
        );
    }
    rules += "  - route: [{destination: {host: echo, subset: all}}]\n    retries: {attempts: 2, retryOn: \"connect-failure,refused-stream,503\"}\n    timeout: 10s\n";
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: bench-routes, namespace: {NS}}}\nspec:\n  hosts: [echo]\n  http:\n{rules}---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: bench-echo, namespace: {NS}}}\nspec:\n  host: echo\n  trafficPolicy:\n    loadBalancer: {{simple: LEAST_REQUEST}}\n    connectionPool: {{http: {{http2MaxRequests: 100000}}}}\n    outlierDetection: {{consecutive5xxErrors: 5, baseEjectionTime: 30s, maxEjectionPercent: 50}}\n  subsets:\n  - {{name: all, labels: {{app: echo}}}}\n"
    )
}

/// 20 rules on the echo workload, none of which the bench's traffic
/// escapes: a DENY of ten rules it matches none of (so all are tried),
/// and an ALLOW of ten whose last admits it, as a policy that lists
/// callers one by one would.
fn authorization_rules() -> String {
    let mut deny = String::new();
    let mut allow = String::new();
    for i in 0..10 {
        deny += &format!(
            "  - to: [{{operation: {{paths: [\"/admin{i}*\"], methods: [DELETE, PUT]}}}}]\n    when: [{{key: \"request.headers[x-block-{i}]\", values: [\"*\"]}}]\n"
        );
        let principal = if i == 9 {
            format!("cluster.local/ns/{NS}/sa/client")
        } else {
            format!("cluster.local/ns/team-{i}/sa/caller")
        };
        allow += &format!(
            "  - from: [{{source: {{principals: [\"{principal}\"], notIpBlocks: [\"192.0.2.{i}/32\"]}}}}]\n    to: [{{operation: {{methods: [GET, POST], paths: [\"/*\"], ports: [\"8080\"]}}}}]\n"
        );
    }
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: bench-deny, namespace: {NS}}}\nspec:\n  selector: {{matchLabels: {{app: echo}}}}\n  action: DENY\n  rules:\n{deny}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: bench-allow, namespace: {NS}}}\nspec:\n  selector: {{matchLabels: {{app: echo}}}}\n  rules:\n{allow}"
    )
}

/// Makes sure nginx, HAProxy and wrk are there: installs them from Debian
/// when running as root with apt, else says why they are skipped.
fn ensure_tools() -> Vec<String> {
    let have = |tool: &str| {
        ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).is_file())
    };
    let missing: Vec<(&str, &str)> = [
        ("nginx", "nginx-light"),
        ("haproxy", "haproxy"),
        ("wrk", "wrk"),
    ]
    .into_iter()
    .filter(|(tool, _)| !have(tool))
    .collect();
    if missing.is_empty() {
        return Vec::new();
    }
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if root && have("apt-get") {
        eprintln!(
            "installing {:?} from Debian",
            missing.iter().map(|m| m.1).collect::<Vec<_>>()
        );
        let _ = std::process::Command::new("apt-get")
            .args(["install", "-y", "-q"])
            .args(missing.iter().map(|m| m.1))
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status();
    }
    missing
        .into_iter()
        .filter(|(tool, _)| !have(tool))
        .map(|(tool, package)| format!("{tool}: not installed (Debian package {package}; installing needs root and apt-get)"))
        .collect()
}

/// Certificates for the nginx and HAProxy baselines: a server certificate
/// for `server.mesh` and a client certificate, from one root.
pub(crate) fn baseline_certs(dir: &Path) -> Result<()> {
    let ca = weft_certs::CertificateAuthority::generate_root(
        "cluster.local",
        &weft_certs::CaParams::valid_for("bench baseline root", Duration::from_secs(86400)),
    )?;
    let (server_chain, server_key) =
        ca.issue_serving(&["server.mesh"], &[], Duration::from_secs(86400))?;
    let client = weft_certs::issue_workload(
        &ca,
        &weft_certs::Identity::new("cluster.local", NS, "client")?,
        None,
    )?;
    std::fs::write(dir.join("root.pem"), ca.roots_pem())?;
    std::fs::write(dir.join("server.pem"), server_chain)?;
    std::fs::write(dir.join("server.key"), server_key)?;
    std::fs::write(dir.join("client.pem"), client.chain_pem())?;
    std::fs::write(dir.join("client.key"), client.key_pem())?;
    // HAProxy wants certificate and key in one file.
    std::fs::write(
        dir.join("server.both.pem"),
        std::fs::read_to_string(dir.join("server.pem"))?
            + &std::fs::read_to_string(dir.join("server.key"))?,
    )?;
    std::fs::write(
        dir.join("client.both.pem"),
        client.chain_pem() + &client.key_pem(),
    )?;
    let floor = weft_certs::issue_workload(&ca, &crate::floor::server_identity(NS)?, None)?;
    std::fs::write(dir.join(crate::floor::SERVER_CERT.0), floor.chain_pem())?;
    std::fs::write(dir.join(crate::floor::SERVER_CERT.1), floor.key_pem())?;
    Ok(())
}

fn nginx_conf(dir: &Path, side: &str, listen: SocketAddr, upstream: SocketAddr) -> String {
    let d = dir.display();
    let common = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx-{side}.pid;\nerror_log {d}/nginx-{side}.err warn;\n\
         events {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/tmp-{side};\n  proxy_temp_path {d}/tmp-{side};\n"
    );
    match side {
        "client" => format!(
            "{common}  upstream mesh {{ server {upstream}; keepalive 64; }}\n  server {{\n    listen {listen};\n    location / {{\n      proxy_pass https://mesh;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_ssl_certificate {d}/client.pem;\n      proxy_ssl_certificate_key {d}/client.key;\n      proxy_ssl_trusted_certificate {d}/root.pem;\n      proxy_ssl_verify on;\n      proxy_ssl_name server.mesh;\n      proxy_ssl_server_name on;\n      proxy_ssl_protocols TLSv1.3;\n      proxy_ssl_session_reuse on;\n    }}\n  }}\n}}\n"
        ),
        _ => format!(
            "{common}  upstream app {{ server {upstream}; keepalive 64; }}\n  server {{\n    listen {listen} ssl;\n    ssl_certificate {d}/server.pem;\n    ssl_certificate_key {d}/server.key;\n    ssl_client_certificate {d}/root.pem;\n    ssl_verify_client on;\n    ssl_protocols TLSv1.3;\n    location / {{\n      proxy_pass http://app;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
        ),
    }
}

fn haproxy_conf(dir: &Path, side: &str, listen: SocketAddr, upstream: SocketAddr) -> String {
    let d = dir.display();
    if side.starts_with("relay") {
        return format!(
            "global\n  nbthread 1\n  maxconn 4000\n  log stderr format raw local0 warning\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\nfrontend in\n  bind {listen}\n  default_backend next\nbackend next\n  server next1 {upstream}\n"
        );
    }
    let common = "global\n  nbthread 1\n  maxconn 4000\n  log stderr format raw local0 warning\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n  http-reuse always\n";
    match side {
        "client" => format!(
            "{common}frontend in\n  bind {listen}\n  default_backend mesh\nbackend mesh\n  server s1 {upstream} ssl verify required ca-file {d}/root.pem crt {d}/client.both.pem sni str(server.mesh) verifyhost server.mesh ssl-min-ver TLSv1.3\n"
        ),
        _ => format!(
            "{common}frontend in\n  bind {listen} ssl crt {d}/server.both.pem ca-file {d}/root.pem verify required ssl-min-ver TLSv1.3\n  default_backend app\nbackend app\n  server app1 {upstream}\n"
        ),
    }
}

/// Starts a baseline proxy pair; returns the processes.
async fn baseline(
    kind: &str,
    dir: &Path,
    app: SocketAddr,
    client_at: IpAddr,
    server_at: IpAddr,
) -> Result<(Vec<Child>, Vec<Measured>, SocketAddr)> {
    let front = SocketAddr::new(client_at, 8080);
    let middle = SocketAddr::new(server_at, 8443);
    let mut children = Vec::new();
    let mut measured = Vec::new();
    for (side, listen, upstream) in [("server", middle, app), ("client", front, middle)] {
        let log = std::fs::File::create(dir.join(format!("{kind}-{side}.log")))?;
        let mut command = match kind {
            "nginx" => {
                std::fs::create_dir_all(dir.join(format!("tmp-{side}")))?;
                let conf = dir.join(format!("nginx-{side}.conf"));
                std::fs::write(&conf, nginx_conf(dir, side, listen, upstream))?;
                let mut c = Command::new("nginx");
                c.arg("-c").arg(&conf).arg("-p").arg(dir);
                c
            }
            "floor-h2" | "floor-h1" | "floor-own" => {
                let mut c = Command::new(std::env::current_exe()?);
                c.arg("floor")
                    .args(["--side", side, "--link", &kind["floor-".len()..]])
                    .arg("--listen")
                    .arg(listen.to_string())
                    .arg("--upstream")
                    .arg(upstream.to_string())
                    .arg("--certs")
                    .arg(dir);
                c
            }
            _ => {
                // The floor relays plaintext, so both of its sides are alike.
                let side = if kind == "relay" {
                    format!("relay-{side}")
                } else {
                    side.to_string()
                };
                let conf = dir.join(format!("haproxy-{side}.cfg"));
                std::fs::write(&conf, haproxy_conf(dir, &side, listen, upstream))?;
                let mut c = Command::new("haproxy");
                c.arg("-db").arg("-f").arg(&conf);
                c
            }
        };
        let child = command
            .stdout(Stdio::from(log.try_clone()?))
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {kind}"))?;
        let pid = child.id().context("no pid")?;
        children.push(child);
        // nginx's master forks one worker: the worker does the work.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let worker = loop {
            let children_of: Vec<u32> =
                std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
                    .unwrap_or_default()
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect();
            if kind != "nginx" {
                break pid;
            }
            if let Some(w) = children_of.first() {
                break *w;
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "nginx ({side}) started no worker; see {}",
                    dir.join(format!("{kind}-{side}.log")).display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        measured.push(Measured {
            label: format!("{kind} {side}"),
            pid: worker,
        });
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(listen).await.is_err() {
            if tokio::time::Instant::now() > deadline {
                let log = std::fs::read_to_string(dir.join(format!("{kind}-{side}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(3).collect();
                bail!(
                    "{kind} ({side}) is not listening on {listen}: {}",
                    tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    measured.reverse();
    Ok((children, measured, front))
}

/// What `wrk` reported for one run.
#[derive(Clone, Debug, Default)]
struct WrkFigures {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// `wrk` closed loop against a scenario with `connections` connections,
/// the same payload; through an explicit proxy it sends absolute-form
/// requests to it, as a new user measuring weft would.
async fn wrk(
    dir: &Path,
    scenario: &Scenario,
    connections: usize,
    options: &Options,
) -> Result<WrkFigures> {
    let (connect, path) = match scenario.proxy {
        Some(proxy) => (format!("http://{proxy}"), scenario.target.clone()),
        None => (
            scenario.target.trim_end_matches('/').to_string(),
            "/".into(),
        ),
    };
    let script = dir.join("post.lua");
    std::fs::write(
        &script,
        format!(
            "wrk.method = \"POST\"\nwrk.path = \"{path}\"\nwrk.body = string.rep(\"x\", {})\n",
            options.payload
        ),
    )?;
    let out = Command::new("wrk")
        .args(["-t1", &format!("-c{connections}")])
        .arg(format!("-d{}s", options.duration.as_secs().max(1)))
        .arg("--latency")
        .arg("-s")
        .arg(&script)
        .arg(format!("{connect}/"))
        .output()
        .await
        .context("running wrk")?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(WrkFigures {
        rate: wrk_rate(&text),
        p50_ms: wrk_percentile_ms(&text, "50%").unwrap_or(f64::NAN),
        p99_ms: wrk_percentile_ms(&text, "99%").unwrap_or(f64::NAN),
    })
}

fn wrk_rate(text: &str) -> f64 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// A latency percentile of wrk's `--latency` table (`50%  123.00us`), in ms.
fn wrk_percentile_ms(text: &str, p: &str) -> Option<f64> {
    let value = text
        .lines()
        .find_map(|l| l.trim().strip_prefix(p).map(|v| v.trim().to_string()))?;
    let split = value.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = value.split_at(split);
    let number: f64 = number.trim().parse().ok()?;
    let factor = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        _ => return None,
    };
    Some(number * factor)
}

/// Services and workloads for the snapshot-size measurement: `services`
/// services over `workloads` pods (with sidecars), in their own namespace.
async fn populate(cluster: &Cluster, services: usize, workloads: usize) -> Result<()> {
    let client = cluster.client.clone();
    create(
        &Api::<Namespace>::all(client.clone()),
        json!({"metadata": {"name": "scale"}}),
    )
    .await?;
    let per = workloads.div_ceil(services.max(1));
    let svc_api = Api::<Service>::namespaced(client.clone(), "scale");
    let results: Vec<Result<()>> = futures::stream::iter(0..services)
        .map(|s| {
            let svc_api = svc_api.clone();
            async move {
                create(&svc_api, json!({"metadata": {"name": format!("svc-{s}")}, "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}})).await
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect::<Result<()>>()?;
    let pods = Api::<Pod>::namespaced(client.clone(), "scale");
    let ip_of = |n: usize| format!("10.{}.{}.{}", 100 + n / 62500, (n / 250) % 250, 1 + n % 250);
    let node = cluster.node_name();
    let results: Vec<Result<()>> = futures::stream::iter(0..workloads)
        .map(|n| {
            let (pods, node) = (pods.clone(), node.clone());
            async move {
                let name = format!("pod-{n}");
                create(&pods, json!({"metadata": {"name": name, "labels": {"app": format!("svc-{}", n / per)}, "annotations": {"sidecar.weft.io/status": "{}"}},
                    "spec": {"serviceAccountName": "scale", "nodeName": node, "containers": [{"name": "app", "image": "x"}]}})).await?;
                crate::apiserver::mark_running(&pods, &name, &ip_of(n)).await
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    results.into_iter().collect::<Result<()>>()?;
    let slices = Api::<EndpointSlice>::namespaced(client.clone(), "scale");
    for s in 0..services {
        let members = (s * per)..((s + 1) * per).min(workloads);
        let slice = json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": format!("svc-{s}-x"), "labels": {"kubernetes.io/service-name": format!("svc-{s}")}},
            "addressType": "IPv4",
            "endpoints": members.map(|n| json!({"addresses": [ip_of(n)], "conditions": {"ready": true},
                "targetRef": {"kind": "Pod", "name": format!("pod-{n}"), "namespace": "scale"}})).collect::<Vec<_>>(),
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        });
        create(&slices, slice).await?;
    }
    Ok(())
}

pub fn run(options: &Options, command: &str) -> Result<Outcome> {
    report::block_on(drive(options, command))
}

async fn drive(options: &Options, command: &str) -> Result<Outcome> {
    if options.rates.is_empty() {
        bail!("--rates needs at least one rate");
    }
    let binaries = Binaries::locate()?;
    let dir = std::env::temp_dir().join(format!("weft-perf-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut results = Results::default();
    let mut children: Vec<Child> = Vec::new();
    if options.baselines {
        results.skipped.extend(ensure_tools());
        if !results.skipped.iter().any(|s| s.starts_with("wrk")) {
            results.wrk_dir = Some(dir.clone());
        }
    }

    // The echo server the scenarios share, and the direct baseline.
    let app_ip = ip([0, 3]);
    let app = SocketAddr::new(app_ip, 8080);
    children.push(spawn_echo(&binaries, &dir, app_ip, "c1", "echo-1").await?);
    run_scenario(
        options,
        &Scenario {
            name: "direct".into(),
            target: format!("http://{app}/"),
            proxy: None,
            grpc_target: Some(format!("http://{app_ip}:9090")),
            measured: vec![],
        },
        &mut results,
    )
    .await?;

    // weft: a lab cluster, its control plane, two sidecars.
    let root = MeshRoot::generate("cluster.local")?;
    let mut c1 = Cluster::start(
        ClusterOptions {
            log: "warn".into(),
            ..ClusterOptions::new("c1", &dir)
        },
        &root,
        &binaries,
    )
    .await?;
    let client_ip = ip([0, 2]);
    deploy(&c1, "echo", Some(("echo-1", "echo", app_ip))).await?;
    add_pod(&c1, "client-1", "client", "client", client_ip).await?;
    let server_sidecar = sidecar(
        &c1,
        &root,
        ("echo-1", "echo", app_ip),
        options.proxy_threads,
    )
    .await?;
    let client_sidecar = sidecar(
        &c1,
        &root,
        ("client-1", "client", client_ip),
        options.proxy_threads,
    )
    .await?;
    let weft_measured = vec![
        Measured {
            label: "weft client".into(),
            pid: client_sidecar.id().context("pid")?,
        },
        Measured {
            label: "weft server".into(),
            pid: server_sidecar.id().context("pid")?,
        },
    ];
    wait_workloads(client_ip, 2, Duration::from_secs(30)).await?;
    let fresh = Resident::of(weft_measured[0].pid);
    run_scenario(
        options,
        &Scenario {
            name: "weft".into(),
            target: format!("http://echo.{NS}.svc.cluster.local:80/"),
            proxy: Some(SocketAddr::new(client_ip, 15001)),
            grpc_target: Some(format!("http://echo.{NS}.svc.cluster.local:90")),
            measured: weft_measured.clone(),
        },
        &mut results,
    )
    .await?;

    // weft with authorization on the server side: 20 rules, the one that
    // admits the bench's client last, so every request goes through all.
    // Runs with and without alternate, so that each ratio compares runs
    // minutes apart at most, and the spread of several shows the noise.
    let weft_scenario = |name: String| Scenario {
        name,
        target: format!("http://echo.{NS}.svc.cluster.local:80/"),
        proxy: Some(SocketAddr::new(client_ip, 15001)),
        grpc_target: None,
        measured: weft_measured.clone(),
    };
    for pair in 1..=options.authz_pairs {
        weft_lab::apply::apply_all(&c1.client, &authorization_rules()).await?;
        wait_gauge(app_ip, POLICIES, 2, Duration::from_secs(30)).await?;
        run_scenario(options, &weft_scenario(authz_name(pair)), &mut results).await?;
        weft_lab::apply::delete_all(&c1.client, &authorization_rules()).await?;
        wait_gauge(app_ip, POLICIES, 0, Duration::from_secs(30)).await?;
        run_scenario(options, &weft_scenario(plain_name(pair)), &mut results).await?;
    }

    // weft with traffic policy on the client side, alternating likewise.
    for pair in 1..=options.route_pairs {
        weft_lab::apply::apply_all(&c1.client, &traffic_rules()).await?;
        wait_gauge(client_ip, ROUTE_SETS, 1, Duration::from_secs(30)).await?;
        run_scenario(options, &weft_scenario(routes_name(pair)), &mut results).await?;
        weft_lab::apply::delete_all(&c1.client, &traffic_rules()).await?;
        wait_gauge(client_ip, ROUTE_SETS, 0, Duration::from_secs(30)).await?;
        run_scenario(
            options,
            &weft_scenario(routes_plain_name(options, pair)),
            &mut results,
        )
        .await?;
    }

    // weft across clusters: the echo pod and its sidecar in c2.
    let mut c2 = None;
    let mut c3 = None;
    let mut setup = None;
    if options.cross_cluster {
        let cluster = Cluster::start(
            ClusterOptions {
                log: "warn".into(),
                zone: "c2-a".into(),
                ..ClusterOptions::new("c2", &dir)
            },
            &root,
            &binaries,
        )
        .await?;
        let far_ip = ip([1, 3]);
        children.push(spawn_echo(&binaries, &dir, far_ip, "c2", "far-echo-1").await?);
        deploy(&c1, "far-echo", None).await?;
        deploy(&cluster, "far-echo", Some(("far-echo-1", "echo", far_ip))).await?;
        c1.add_remote(&cluster).await?;
        cluster.add_remote(&c1).await?;
        let far_sidecar = sidecar(
            &cluster,
            &root,
            ("far-echo-1", "echo", far_ip),
            options.proxy_threads,
        )
        .await?;
        wait_workloads(client_ip, 3, Duration::from_secs(30)).await?;
        let measured = vec![
            weft_measured[0].clone(),
            Measured {
                label: "weft server (c2)".into(),
                pid: far_sidecar.id().context("pid")?,
            },
        ];
        run_scenario(
            options,
            &Scenario {
                name: CROSS_CLUSTER.into(),
                target: format!("http://far-echo.{NS}.svc.cluster.local:80/"),
                proxy: Some(SocketAddr::new(client_ip, 15001)),
                grpc_target: None,
                measured,
            },
            &mut results,
        )
        .await?;
        children.push(far_sidecar);
        c2 = Some(cluster);

        // weft across networks: a third cluster on a network of its own,
        // its echo reached only through its east-west gateway.
        let cluster = Cluster::start(
            ClusterOptions {
                log: "warn".into(),
                zone: "c3-a".into(),
                network: "n3".into(),
                ..ClusterOptions::new("c3", &dir)
            },
            &root,
            &binaries,
        )
        .await?;
        let (net_ip, gateway_ip) = (ip([2, 3]), ip([2, 4]));
        children.push(spawn_echo(&binaries, &dir, net_ip, "c3", "net-echo-1").await?);
        deploy(&c1, "net-echo", None).await?;
        deploy(&cluster, "net-echo", Some(("net-echo-1", "echo", net_ip))).await?;
        // The gateway's own pod, so that it knows its network.
        add_pod(
            &cluster,
            "gateway-1",
            "weft-eastwest-gateway",
            "weft-eastwest-gateway",
            gateway_ip,
        )
        .await?;
        networks::announce_gateway(&cluster, NS, "n3", gateway_ip).await?;
        c1.add_remote(&cluster).await?;
        cluster.add_remote(&c1).await?;
        let net_sidecar = sidecar(
            &cluster,
            &root,
            ("net-echo-1", "echo", net_ip),
            options.proxy_threads,
        )
        .await?;
        let gateway = networks::spawn_gateway(&cluster, &root, NS, gateway_ip).await?;
        networks::wait_gateway(client_ip, Duration::from_secs(30)).await?;
        let measured = vec![
            weft_measured[0].clone(),
            Measured {
                label: "weft gateway (c3)".into(),
                pid: gateway.id().context("pid")?,
            },
            Measured {
                label: "weft server (c3)".into(),
                pid: net_sidecar.id().context("pid")?,
            },
        ];
        run_scenario(
            options,
            &Scenario {
                name: CROSS_NETWORK.into(),
                target: format!("http://net-echo.{NS}.svc.cluster.local:80/"),
                proxy: Some(SocketAddr::new(client_ip, 15001)),
                grpc_target: None,
                measured,
            },
            &mut results,
        )
        .await?;
        eprintln!("== mesh connections: new and reused, same network and through the gateway");
        let echo = weft_certs::Identity::new("cluster.local", NS, "echo")?;
        let direct = networks::Peer {
            sidecar: SocketAddr::new(far_ip, weft_proxy::pool::HBONE_PORT),
            identity: echo.clone(),
            target: SocketAddr::new(far_ip, 9000),
            via: None,
        };
        let through = networks::Peer {
            sidecar: SocketAddr::new(net_ip, weft_proxy::pool::HBONE_PORT),
            identity: echo,
            target: SocketAddr::new(net_ip, 9000),
            via: Some(networks::gateway_at(gateway_ip, NS)?),
        };
        let client = weft_certs::Identity::new("cluster.local", NS, "client")?;
        setup = Some(networks::measure_setup(&root, &client, &direct, &through, 300, 2000).await?);
        children.push(gateway);
        children.push(net_sidecar);
        c3 = Some(cluster);
    }

    // Baselines.
    let mut wrk_direct = None;
    if options.baselines {
        baseline_certs(&dir)?;
        for (kind, client_at, server_at) in [
            ("nginx", ip([0, 4]), ip([0, 5])),
            ("haproxy", ip([0, 6]), ip([0, 7])),
            ("relay", ip([0, 8]), ip([0, 9])),
            ("floor-h2", ip([0, 10]), ip([0, 11])),
            ("floor-h1", ip([0, 12]), ip([0, 13])),
            ("floor-own", ip([0, 14]), ip([0, 15])),
        ] {
            if kind.starts_with("floor") && !options.stack_floor {
                continue;
            }
            let tool = if kind == "relay" { "haproxy" } else { kind };
            if results.skipped.iter().any(|s| s.starts_with(tool)) {
                continue;
            }
            match baseline(kind, &dir, app, client_at, server_at).await {
                Ok((procs, measured, front)) => {
                    run_scenario(
                        options,
                        &Scenario {
                            name: kind.into(),
                            target: format!("http://{front}/"),
                            proxy: None,
                            grpc_target: None,
                            measured,
                        },
                        &mut results,
                    )
                    .await?;
                    for p in procs {
                        mesh::stop(p, Duration::from_secs(2)).await;
                    }
                }
                Err(err) => results.skipped.push(format!("{kind}: {err:#}")),
            }
        }
        if let Some(dir) = &results.wrk_dir {
            let direct = Scenario {
                name: "direct".into(),
                target: format!("http://{app}/"),
                proxy: None,
                grpc_target: None,
                measured: vec![],
            };
            wrk_direct = Some(wrk(dir, &direct, options.max_connections, options).await?);
        }
    }

    // The client sidecar's memory with a large mesh in its snapshot.
    let after_traffic = Resident::of(weft_measured[0].pid);
    eprintln!(
        "== snapshot: {} services, {} workloads",
        options.snapshot_services, options.snapshot_workloads
    );
    let populate_start = std::time::Instant::now();
    populate(&c1, options.snapshot_services, options.snapshot_workloads).await?;
    wait_workloads(
        client_ip,
        options.snapshot_workloads + 2,
        Duration::from_secs(300),
    )
    .await?;
    let synced_in = populate_start.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let memory = Memory {
        fresh,
        after_traffic,
        large: Resident::of(weft_measured[0].pid),
        large_peak: report::proc_bytes(weft_measured[0].pid, "VmHWM:"),
        synced_in,
    };

    let markdown = render(
        options,
        command,
        &results,
        wrk_direct.as_ref(),
        &memory,
        setup.as_ref(),
    )?;

    drop(client_sidecar);
    drop(server_sidecar);
    for child in children {
        mesh::stop(child, Duration::from_secs(2)).await;
    }
    for cluster in [c2, c3].into_iter().flatten() {
        cluster.stop().await;
    }
    c1.stop_control().await;
    c1.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Outcome {
        markdown,
        passed: true,
    })
}

/// The one-connection closed-loop table: each scenario's round trip when
/// nothing else is in flight, by our generator and by wrk.
fn one_connection(results: &Results) -> String {
    let Some(direct) = results.single.get("direct") else {
        return String::new();
    };
    let wrk_direct = results.wrk_single.get("direct");
    let mut md = String::from(
        "\n## One connection, closed loop\n\nEach request sent when the previous answer arrived, on one keep-alive connection: the cost of one round trip through each path when nothing else is in flight. wrk (`-t1 -c1`, through an explicit proxy with absolute-form requests) measures the same paths as a cross-check.\n\n\
         | scenario | req/s | p50 ms | p99 ms | added p50 ms | wrk req/s | wrk p50 ms | wrk added p50 ms |\n|---|---|---|---|---|---|---|---|\n",
    );
    for name in &results.order {
        let Some(run) = results.single.get(name) else {
            continue;
        };
        let s = &run.summary;
        let added = if name == "direct" {
            String::new()
        } else {
            format!("{:.3}", s.p50_ms - direct.summary.p50_ms)
        };
        let (wrk_rate, wrk_p50, wrk_added) = match (results.wrk_single.get(name), wrk_direct) {
            (Some(w), Some(d)) => (
                format!("{:.0}", w.rate),
                format!("{:.3}", w.p50_ms),
                if name == "direct" {
                    String::new()
                } else {
                    format!("{:.3}", w.p50_ms - d.p50_ms)
                },
            ),
            _ => Default::default(),
        };
        md += &format!(
            "| {name} | {:.0} | {:.3} | {:.3} | {added} | {wrk_rate} | {wrk_p50} | {wrk_added} |\n",
            s.achieved_rate, s.p50_ms, s.p99_ms
        );
    }
    md
}

/// The client sidecar's memory at the points the report shows.
struct Memory {
    fresh: Resident,
    after_traffic: Resident,
    large: Resident,
    large_peak: u64,
    synced_in: Duration,
}

/// Errors by kind, and reconnects (a server closing keep-alive
/// connections, which a client survives by dialling again).
fn errors(s: &Summary) -> String {
    let mut parts: Vec<String> = s.errors.iter().map(|(k, n)| format!("{n} {k}")).collect();
    if s.reconnects > 0 {
        parts.push(format!("({} reconnects)", s.reconnects));
    }
    if parts.is_empty() {
        "0".into()
    } else {
        parts.join(", ")
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Per request, for the busiest proxy of each scenario: its own work
/// (user), the kernel's (system: wake-ups, loopback TCP) and how often it
/// was switched out, at the first fixed rate and in the closed loop. The
/// difference between the two is the price of being woken for each
/// request with cold caches; the relay's line is what the kernel alone
/// costs two proxies that do no work.
/// What 20 authorization rules cost the server's sidecar, against the
/// same sidecar without them, in this run (target: within 5%).
fn authorization_cost(options: &Options, results: &Results) -> String {
    let server = |run: &Run| {
        run.proxies
            .iter()
            .find(|p| p.label == "weft server")
            .map(|p| run.vcpu_per_k(p.cpu.total()))
    };
    let mut md = String::new();
    for (i, rate) in options.rates.iter().enumerate() {
        let at = |name: String| results.fixed.get(&name).and_then(|runs| server(&runs[i]));
        let mut ratios = Vec::new();
        let mut rows = Vec::new();
        for pair in 1..=options.authz_pairs {
            let (Some(before), Some(authz), Some(after)) = (
                at(plain_name(pair - 1)),
                at(authz_name(pair)),
                at(plain_name(pair)),
            ) else {
                continue;
            };
            let ratio = authz / ((before + after) / 2.0).max(1e-9);
            ratios.push(ratio);
            rows.push(format!(
                "{authz:.4} against {before:.4} and {after:.4} ({ratio:.3})"
            ));
        }
        if ratios.is_empty() {
            continue;
        }
        ratios.sort_by(f64::total_cmp);
        let median = ratios[ratios.len() / 2];
        md += &format!(
            "- authorization, 20 rules on the server's sidecar, at {rate} req/s: its CPU per 1,000 req/s with the rules against the plain runs before and after, in vCPU: {}; median ratio {median:.3}, range {:.3} to {:.3} (target ≤ 1.05).\n",
            rows.join("; "),
            ratios[0],
            ratios[ratios.len() - 1]
        );
    }
    md
}

/// What 10 routes and a DestinationRule cost the client's sidecar,
/// against the same sidecar without them, in this run (target: within
/// 5%).
fn routing_cost(options: &Options, results: &Results) -> String {
    let client = |run: &Run| {
        run.proxies
            .iter()
            .find(|p| p.label == "weft client")
            .map(|p| run.vcpu_per_k(p.cpu.total()))
    };
    let mut md = String::new();
    for (i, rate) in options.rates.iter().enumerate() {
        let at = |name: String| results.fixed.get(&name).and_then(|runs| client(&runs[i]));
        let mut ratios = Vec::new();
        let mut rows = Vec::new();
        for pair in 1..=options.route_pairs {
            let (Some(before), Some(routed), Some(after)) = (
                at(routes_plain_name(options, pair - 1)),
                at(routes_name(pair)),
                at(routes_plain_name(options, pair)),
            ) else {
                continue;
            };
            let ratio = routed / ((before + after) / 2.0).max(1e-9);
            ratios.push(ratio);
            rows.push(format!(
                "{routed:.4} against {before:.4} and {after:.4} ({ratio:.3})"
            ));
        }
        if ratios.is_empty() {
            continue;
        }
        ratios.sort_by(f64::total_cmp);
        let median = ratios[ratios.len() / 2];
        md += &format!(
            "- traffic policy, 10 routes and a DestinationRule on the client's sidecar, at {rate} req/s: its CPU per 1,000 req/s with them against the plain runs before and after, in vCPU: {}; median ratio {median:.3}, range {:.3} to {:.3} (target ≤ 1.05).\n",
            rows.join("; "),
            ratios[0],
            ratios[ratios.len() - 1]
        );
    }
    md
}

const CROSS_CLUSTER: &str = "weft cross-cluster";
const CROSS_NETWORK: &str = "weft cross-network";

/// The gateway hop under load: the cross-network scenario against the
/// cross-cluster one (the same path on one network), from the same run.
fn gateway_cost(options: &Options, results: &Results) -> String {
    let (Some(flat), Some(across)) = (
        results.fixed.get(CROSS_CLUSTER),
        results.fixed.get(CROSS_NETWORK),
    ) else {
        return String::new();
    };
    let mut md = String::new();
    for (i, rate) in options.rates.iter().enumerate() {
        let (f, a) = (&flat[i], &across[i]);
        let gateway = a
            .proxies
            .iter()
            .find(|p| p.label.starts_with("weft gateway"))
            .map_or(0.0, |p| a.vcpu_per_k(p.cpu.total()));
        let client = |run: &Run| {
            run.proxies
                .iter()
                .find(|p| p.label == "weft client")
                .map_or(0.0, |p| run.vcpu_per_k(p.cpu.total()))
        };
        md += &format!(
            "- across networks at {rate} req/s, on reused connections: the gateway hop adds p50 {:+.3} ms, p99 {:+.3} ms to the cross-cluster path on one network; the gateway spends {gateway:.4} vCPU per 1,000 req/s, and the client's sidecar {:.4} against {:.4} (the second mTLS layer).\n",
            a.summary.p50_ms - f.summary.p50_ms,
            a.summary.p99_ms - f.summary.p99_ms,
            client(a),
            client(f),
        );
    }
    md
}

fn where_cpu_goes(rate: u64, results: &Results) -> String {
    let mut md = format!(
        "\n## Where the CPU goes (busiest proxy, per request)\n\n\
         | scenario | proxy | at {rate} req/s: user µs | system µs | context switches | closed loop: user µs | system µs | context switches |\n\
         |---|---|---|---|---|---|---|---|\n"
    );
    let per_request = |run: &Run, cost: &ProxyCost| {
        let n = (run.summary.requests as f64).max(1.0);
        format!(
            "{:.1} | {:.1} | {:.2}",
            cost.cpu.user / n * 1e6,
            cost.cpu.system / n * 1e6,
            cost.cpu.switches as f64 / n
        )
    };
    for name in &results.order {
        let (Some(fixed), Some(max)) = (results.fixed.get(name), results.max.get(name)) else {
            continue;
        };
        let Some(busiest) = fixed[0].busiest() else {
            continue;
        };
        // The same proxy in the closed loop, so both halves of the row
        // describe one process's role.
        let saturated = max
            .proxies
            .iter()
            .find(|p| p.label == busiest.label)
            .map(|p| per_request(max, p))
            .unwrap_or_else(|| " |  | ".into());
        md += &format!(
            "| {name} | {} | {} | {saturated} |\n",
            busiest.label,
            per_request(&fixed[0], busiest)
        );
    }
    md
}

#[allow(clippy::too_many_arguments)]
fn render(
    options: &Options,
    command: &str,
    results: &Results,
    wrk_direct: Option<&WrkFigures>,
    memory: &Memory,
    setup: Option<&networks::Setup>,
) -> Result<String> {
    let mut md = format!(
        "# Data-path benchmark: weft against direct, nginx, HAProxy and a plain TCP relay\n\n\
         - Date: {}\n- Commit: {}\n- Command: `{command}`\n{}\n\
         HTTP/1.1 keep-alive, {} B POST echoed back, {} connections at fixed rates (open loop, latency \
         corrected for coordinated omission), {} connections closed loop for maximum throughput; \
         {} s measured after {} s of warm-up per run. {} Proxies, echo server and load generator \
         share this machine's cores. Two proxies in series in every scenario: client side → TLS 1.3 \
         with client certificates → server side → echo.\n\n",
        report::today(),
        report::commit(),
        Machine::read().markdown(),
        options.payload,
        options.connections,
        options.max_connections,
        options.duration.as_secs_f64(),
        options.warmup.as_secs_f64(),
        if options.proxy_threads == 1 {
            "Every proxy runs one worker (one thread, or one nginx worker process), so its \
             throughput is per core."
                .to_string()
        } else {
            format!(
                "weft sidecars run {} runtime threads (nginx and HAProxy one worker each).",
                options.proxy_threads
            )
        },
    );
    let direct = results.fixed.get("direct").context("no direct run")?;
    for (i, rate) in options.rates.iter().enumerate() {
        md += &format!(
            "## {rate} req/s\n\n| scenario | achieved/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | added p50 ms | added p99 ms | errors | CPU per 1k req/s, each proxy (vCPU) |\n|---|---|---|---|---|---|---|---|---|---|---|\n"
        );
        for name in &results.order {
            let run = &results.fixed[name][i];
            let s = &run.summary;
            let d = &direct[i].summary;
            let cpu: Vec<String> = run
                .proxies
                .iter()
                .map(|p| format!("{} {:.3}", p.label, run.vcpu_per_k(p.cpu.total())))
                .collect();
            md += &format!(
                "| {name} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {} | {} | {} | {} |\n",
                s.achieved_rate,
                s.p50_ms,
                s.p90_ms,
                s.p99_ms,
                s.p999_ms,
                s.max_ms,
                if name == "direct" {
                    "".into()
                } else {
                    format!("{:.3}", s.p50_ms - d.p50_ms)
                },
                if name == "direct" {
                    "".into()
                } else {
                    format!("{:.3}", s.p99_ms - d.p99_ms)
                },
                errors(s),
                if cpu.is_empty() {
                    "".into()
                } else {
                    cpu.join(", ")
                },
            );
        }
        md += "\n";
    }
    md += "## Maximum throughput (closed loop)\n\n| scenario | req/s | p50 ms | p99 ms | errors | each proxy: CPU s/s, requests per CPU-second, peak RSS MiB |\n|---|---|---|---|---|---|\n";
    for name in &results.order {
        let run = &results.max[name];
        let s = &run.summary;
        let procs: Vec<String> = run
            .proxies
            .iter()
            .map(|p| {
                let cpu = p.cpu.total();
                format!(
                    "{}: {:.2}, {:.0}, {:.1}",
                    p.label,
                    cpu / s.seconds,
                    s.requests as f64 / cpu.max(1e-9),
                    mb(p.peak_rss)
                )
            })
            .collect();
        md += &format!(
            "| {name} | {:.0} | {:.3} | {:.3} | {} | {} |\n",
            s.achieved_rate,
            s.p50_ms,
            s.p99_ms,
            errors(s),
            procs.join("; ")
        );
    }
    md += &one_connection(results);
    // Ratios that matter, from this run.
    let per_cpu = |name: &str| -> Option<f64> {
        let run = results.max.get(name)?;
        let cpu: f64 = run.proxies.iter().map(|p| p.cpu.total()).sum();
        Some(run.summary.requests as f64 * run.proxies.len() as f64 / cpu.max(1e-9))
    };
    let closed_loop = |name: &str| Some(results.max.get(name)?.summary.achieved_rate);
    let added_p99 = |name: &str, i: usize| {
        Some(results.fixed.get(name)?.get(i)?.summary.p99_ms - direct.get(i)?.summary.p99_ms)
    };
    let one_connection_p50 = |name: &str| {
        let added = results.single.get(name)?.summary.p50_ms;
        Some(added - results.single.get("direct")?.summary.p50_ms)
    };
    md += "\n## Ratios (same run)\n\n";
    if let Some(weft) = results.fixed.get("weft") {
        let (w, d) = (&weft[0].summary, &direct[0].summary);
        md += &format!(
            "- weft added latency at {} req/s: p50 {:.3} ms, p99 {:.3} ms (target: p99 < 0.10 ms; Istio's published anchor 0.30 ms p99).\n",
            options.rates[0],
            w.p50_ms - d.p50_ms,
            w.p99_ms - d.p99_ms
        );
        let cpu = weft[0].busiest_vcpu_per_k();
        md += &format!(
            "- weft CPU per 1,000 req/s, busiest sidecar: {cpu:.3} vCPU (target < 0.05; anchors: Istio sidecar 0.20, ztunnel 0.06).\n"
        );
    }
    if let Some(relay) = results.fixed.get("relay") {
        let (r, d) = (&relay[0].summary, &direct[0].summary);
        let cpu = relay[0].busiest_vcpu_per_k();
        md += &format!(
            "- the floor, two plaintext TCP relays in series (HAProxy `mode tcp`, no TLS, no HTTP) at {} req/s: added p50 {:.3} ms, p99 {:.3} ms; CPU per 1,000 req/s, busiest relay: {cpu:.3} vCPU: what two user-space proxies that only copy bytes cost on this machine.\n",
            options.rates[0],
            r.p50_ms - d.p50_ms,
            r.p99_ms - d.p99_ms,
        );
    }
    md += &authorization_cost(options, results);
    md += &routing_cost(options, results);
    md += &gateway_cost(options, results);
    for other in [
        "nginx",
        "haproxy",
        "relay",
        "floor-h2",
        "floor-h1",
        "floor-own",
    ] {
        if let (Some(w), Some(o)) = (per_cpu("weft"), per_cpu(other)) {
            md += &format!(
                "- requests per CPU-second per proxy, weft / {other}: {:.2} ({:.0} vs {:.0}).\n",
                w / o,
                w,
                o
            );
        }
        for (i, rate) in options.rates.iter().enumerate() {
            if let (Some(w), Some(o)) = (added_p99("weft", i), added_p99(other, i)) {
                md += &format!(
                    "- added p99 at {rate} req/s, weft / {other}: {w:.3} ms / {o:.3} ms.\n"
                );
            }
        }
        if let (Some(w), Some(o)) = (closed_loop("weft"), closed_loop(other)) {
            md += &format!(
                "- closed-loop throughput, weft / {other}: {:.2} ({w:.0} vs {o:.0} req/s).\n",
                w / o.max(1.0),
            );
        }
        if let (Some(w), Some(o)) = (one_connection_p50("weft"), one_connection_p50(other)) {
            md += &format!(
                "- one connection, closed loop, added p50, weft / {other}: {w:.3} ms / {o:.3} ms.\n"
            );
        }
    }
    if let Some(setup) = setup {
        md += &setup.markdown();
    }
    md += &where_cpu_goes(options.rates[0], results);
    if !results.grpc.is_empty() {
        md += &format!(
            "\n## gRPC unary at {} req/s\n\n| scenario | p50 ms | p99 ms | p99.9 ms | added p50 ms | added p99 ms | errors |\n|---|---|---|---|---|---|---|\n",
            options.rates[0]
        );
        let direct = results.grpc.get("direct").map(|r| &r.summary);
        for (name, run) in &results.grpc {
            let s = &run.summary;
            let added = |of: fn(&Summary) -> f64| match direct {
                Some(d) if name != "direct" => format!("{:.3}", of(s) - of(d)),
                _ => String::new(),
            };
            md += &format!(
                "| {name} | {:.3} | {:.3} | {:.3} | {} | {} | {} |\n",
                s.p50_ms,
                s.p99_ms,
                s.p999_ms,
                added(|s| s.p50_ms),
                added(|s| s.p99_ms),
                errors(s)
            );
        }
    }
    md += &format!(
        "\n## Sidecar memory with a large mesh\n\nThe client sidecar's resident memory:\n\n\
         - with the bench's 2 services/3 workloads, before any traffic: {}\n\
         - the same after the load runs above: {}\n\
         - then with {} services and {} workloads more in its snapshot: {} = {:.2} MB, {} the target of 10 MB (peak RSS {:.1} MiB); received {:.1} s after the objects were created \
         (anchors: Envoy ~60 MB, linkerd2-proxy ~18 MB, ztunnel 12 MB)\n",
        memory.fresh.describe(),
        memory.after_traffic.describe(),
        options.snapshot_services,
        options.snapshot_workloads,
        memory.large.describe(),
        memory.large.rss as f64 / 1e6,
        if memory.large.rss < crate::targets::RSS_LIMIT {
            "under"
        } else {
            "over"
        },
        mb(memory.large_peak),
        memory.synced_in.as_secs_f64()
    );
    md += &crate::targets::markdown(&crate::targets::judge(&Figures {
        per_cpu: (per_cpu("weft"), per_cpu("haproxy")),
        closed_loop: (closed_loop("weft"), closed_loop("haproxy")),
        added_p99: options
            .rates
            .iter()
            .enumerate()
            .filter_map(|(i, &rate)| Some((rate, added_p99("weft", i)?, added_p99("haproxy", i))))
            .collect(),
        one_connection: (one_connection_p50("weft"), one_connection_p50("nginx")),
        large_mesh_rss: Some(memory.large.rss),
    }));
    if let Some(wrk) = wrk_direct {
        let ours = &results.max["direct"].summary;
        md += &format!(
            "\n## The load generator against wrk\n\nClosed loop against the echo server directly, {} connections, same payload:\n\n\
             | generator | req/s | p50 | p99 |\n|---|---|---|---|\n| weft-perf load | {:.0} | {:.3} ms | {:.3} ms |\n| wrk (1 thread) | {:.0} | {:.3} ms | {:.3} ms |\n\n\
             A gap is the generators' own cost per request: it bounds how small a difference between scenarios this harness can show.\n",
            options.max_connections,
            ours.achieved_rate,
            ours.p50_ms,
            ours.p99_ms,
            wrk.rate,
            wrk.p50_ms,
            wrk.p99_ms,
        );
    }
    if !results.skipped.is_empty() {
        md += "\n## Skipped\n\n";
        for s in &results.skipped {
            md += &format!("- {s}\n");
        }
    }
    // The plot.
    let series: Vec<(String, Vec<(f64, f64)>)> = results
        .order
        .iter()
        .map(|n| (n.clone(), results.fixed[n][0].summary.curve.clone()))
        .collect();
    let svg = crate::svg::percentile_plot(
        &format!("HTTP/1.1 latency at {} req/s", options.rates[0]),
        &series,
    );
    let name = format!("{}-bench-latency.svg", report::today());
    if let Some(dir) = &options.results {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join(&name), svg)?;
        md += &format!("\n![latency percentiles]({name})\n");
    }
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_figures_are_read_in_milliseconds_whatever_its_unit() {
        let text = "Running 5s test @ http://127.0.0.1:8080/\n  Latency Distribution\n     50%  136.00us\n     75%    1.20ms\n     90%    2.5s\n     99%   12.00ms\n  35040 requests in 5.00s\nRequests/sec:   7008.21\n";
        assert_eq!(wrk_rate(text), 7008.21);
        assert!((wrk_percentile_ms(text, "50%").unwrap() - 0.136).abs() < 1e-9);
        assert!((wrk_percentile_ms(text, "75%").unwrap() - 1.2).abs() < 1e-9);
        assert!((wrk_percentile_ms(text, "90%").unwrap() - 2500.0).abs() < 1e-9);
        assert_eq!(wrk_percentile_ms(text, "99.9%"), None, "absent");
        assert_eq!(wrk_percentile_ms("50%  fast", "50%"), None, "no number");
    }

    #[test]
    fn the_authorization_scenario_is_20_rules_weft_enforces_as_written() {
        let docs = weft_lab::apply::documents(&authorization_rules()).unwrap();
        assert_eq!(docs.len(), 2);
        let mut rules = 0;
        for doc in &docs {
            let info = weft_control::security::authorization::read(doc);
            assert!(info.problems.is_empty(), "{:?}", info.problems);
            rules += info.rules.len();
        }
        assert_eq!(rules, 20);
    }

    #[test]
    fn the_routing_scenario_is_10_routes_and_a_rule_weft_applies_as_written() {
        use weft_control::cluster::{Kind, read_traffic};
        use weft_control::traffic::Resource;
        let docs = weft_lab::apply::documents(&traffic_rules()).unwrap();
        assert_eq!(docs.len(), 2);
        let routes = read_traffic(Kind::VirtualService, &docs[0], "cluster.local");
        assert!(
            routes.problems.is_empty() && routes.ignored.is_empty(),
            "{:?}",
            routes.problems
        );
        let Resource::Routes(set) = &routes.resource else {
            panic!("not routes")
        };
        assert_eq!(set.http.len(), 10);
        let rule = read_traffic(Kind::DestinationRule, &docs[1], "cluster.local");
        assert!(
            rule.problems.is_empty() && rule.ignored.is_empty(),
            "{:?}",
            rule.problems
        );
    }

    fn run(seconds: f64, rate: f64, proxies: &[(&str, f64, f64, u64)]) -> Run {
        Run {
            summary: Summary {
                protocol: Protocol::Http1,
                target: String::new(),
                rate: rate as u64,
                connections: 1,
                concurrency: 1,
                requests: (seconds * rate) as u64,
                errors: Default::default(),
                reconnects: 0,
                seconds,
                achieved_rate: rate,
                p50_ms: 0.1,
                p90_ms: 0.1,
                p99_ms: 0.1,
                p999_ms: 0.1,
                max_ms: 0.1,
                curve: Vec::new(),
                histogram: load::new_histogram(),
            },
            proxies: proxies
                .iter()
                .map(|(label, user, system, switches)| ProxyCost {
                    label: label.to_string(),
                    cpu: report::CpuUse {
                        user: *user,
                        system: *system,
                        switches: *switches,
                    },
                    peak_rss: 0,
                })
                .collect(),
        }
    }

    #[test]
    fn cpu_per_request_is_split_for_the_busiest_proxy() {
        let mut results = Results {
            order: vec!["weft".into(), "direct".into()],
            ..Default::default()
        };
        // 10 s at 1,000 req/s: 10,000 requests; the server side is busier.
        results.fixed.insert(
            "weft".into(),
            vec![run(
                10.0,
                1000.0,
                &[("client", 0.3, 0.2, 20_000), ("server", 0.5, 0.3, 27_000)],
            )],
        );
        // Closed loop: 100,000 requests in 5 s.
        results.max.insert(
            "weft".into(),
            run(
                5.0,
                20_000.0,
                &[("client", 1.0, 1.0, 50_000), ("server", 1.5, 1.1, 60_000)],
            ),
        );
        results
            .fixed
            .insert("direct".into(), vec![run(10.0, 1000.0, &[])]);
        results.max.insert("direct".into(), run(5.0, 20_000.0, &[]));
        let md = where_cpu_goes(1000, &results);
        assert!(
            md.contains("| weft | server | 50.0 | 30.0 | 2.70 | 15.0 | 11.0 | 0.60 |"),
            "{md}"
        );
        assert!(!md.contains("| direct |"), "{md}");
    }
}
