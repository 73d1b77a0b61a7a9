//! `weft-perf tunnel`: the L4 path through two sidecars over the HBONE
//! tunnel, next to the same traffic sent directly and through a plaintext
//! relay of two hops (the floor: what two user-space copies cost).
//!
//! - Bulk TCP: one and eight streams writing as fast as they can for a
//!   while to a sink that discards, throughput counted by the sink.
//! - New connections: connect, one byte each way, close; the latency of
//!   a new TCP connection through the pooled mTLS path.
//!
//! As root with `ip` and `iptables`, the client side and the server side
//! are two network namespaces joined by a veth pair (the shape of a pod
//! talking to a pod on another node's veth), and the client's connections
//! to the service address are captured by an iptables REDIRECT to the
//! client sidecar, as in a meshed pod. Otherwise on loopback addresses,
//! the client asking its sidecar with CONNECT, and the report says so.
//!
//! Each component (client, client sidecar, server sidecar, sink, relays)
//! runs on a thread of its own with a one-thread runtime, as each runs in
//! a process of its own in a pod; one process keeps the set-up and the
//! clean-up in one place. CPU is read per thread.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_proxy::local_app::LocalApp;
use weft_proxy::outbound;
use weft_proxy::pool::HBONE_PORT;
use weft_proxy::state::Snapshot;
use weft_proxy::xds::XdsState;
use weft_xds_proto::{mesh, testing};

use crate::apiserver::Outcome;
use crate::report;
use crate::sidecar::{MeshCerts, client_outbound};

#[derive(Clone, Debug)]
pub struct Options {
    /// Seconds each bulk run is measured (after one of warm-up).
    pub seconds: f64,
    /// Stream counts for the bulk runs.
    pub streams: Vec<usize>,
    /// New connections per path.
    pub connections: usize,
    /// Bytes per write in the bulk runs.
    pub chunk: usize,
}

/// The sink's ports: bulk data is discarded on one, echoed on the other.
const DISCARD: u16 = 5201;
const ECHO: u16 = 5202;
/// The plaintext relays' ports.
const RELAY_FRONT: u16 = 16001;
const RELAY_BACK: u16 = 16002;
/// The service the client reaches through its sidecar.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 214, 10);
const HOST: &str = "sink.bench.svc.cluster.local";
/// The client sidecar's outbound port, as in a pod.
const CAPTURE: u16 = 15001;

/// Where the client and the server sides live.
struct Topology {
    client: Side,
    server: Side,
    /// Connections to the VIP are captured (namespaces), or the client
    /// asks its sidecar with CONNECT (loopback).
    captured: bool,
    note: String,
}

#[derive(Clone)]
struct Side {
    netns: Option<String>,
    ip: Ipv4Addr,
}

impl Drop for Topology {
    fn drop(&mut self) {
        for side in [&self.client, &self.server] {
            if let Some(ns) = &side.netns {
                weft_lab::netns::delete(ns);
            }
        }
    }
}

fn topology() -> Result<Topology> {
    if let Some(reason) = weft_lab::netns::unavailable() {
        let base = 120 + (std::process::id() % 100) as u8;
        return Ok(Topology {
            client: Side {
                netns: None,
                ip: Ipv4Addr::new(127, 152, base, 1),
            },
            server: Side {
                netns: None,
                ip: Ipv4Addr::new(127, 152, base, 2),
            },
            captured: false,
            note: format!(
                "on loopback ({reason}): the client asks its sidecar with CONNECT, and loopback is not a veth pair"
            ),
        });
    }
    let (client, server) = (Ipv4Addr::new(10, 214, 0, 1), Ipv4Addr::new(10, 214, 0, 2));
    let (a, b) = weft_lab::netns::create_pair("bench-a", client, "bench-b", server, &[VIP])?;
    let topology = Topology {
        client: Side {
            netns: Some(a),
            ip: client,
        },
        server: Side {
            netns: Some(b),
            ip: server,
        },
        captured: true,
        note: "two network namespaces joined by a veth pair; the client's connections to the service address are redirected to its sidecar by iptables, as in a meshed pod".into(),
    };
    let rule = format!(
        "-t nat -A OUTPUT -p tcp -d {VIP} -j REDIRECT --to-ports {}",
        CAPTURE
    );
    weft_lab::netns::exec(topology.client.netns.as_deref(), "iptables", &rule)?;
    Ok(topology)
}

/// A component on a thread of its own, in `side`'s namespace, with a
/// one-thread runtime; its thread id, for CPU accounting.
fn spawn_on<F, Fut>(side: &Side, name: &str, run: F) -> Result<i32>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<()>>,
{
    let netns = side.netns.clone();
    let (ready, started) = std::sync::mpsc::channel();
    let label = name.to_string();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let result = (|| {
                if let Some(ns) = &netns {
                    weft_lab::netns::enter(ns)?;
                }
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("a runtime")
            })();
            let runtime = match result {
                Ok(runtime) => runtime,
                Err(err) => {
                    let _ = ready.send(Err(err));
                    return;
                }
            };
            let _ = ready.send(Ok(thread_id()));
            if let Err(err) = runtime.block_on(run()) {
                eprintln!("{label}: {err:#}");
            }
        })?;
    started
        .recv()
        .context("the component's thread ended")?
        .with_context(|| format!("starting {name}"))
}

/// The calling thread's id. By system call: glibc's `gettid` wrapper is
/// a weak symbol that a static link (`cargo dist`) may leave unresolved.
fn thread_id() -> i32 {
    // SAFETY: SYS_gettid takes no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

/// CPU seconds a thread of this process has spent.
fn thread_cpu(tid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap_or_default();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    stat_ticks(&stat) as f64 / ticks
}

/// User plus system clock ticks from a `/proc/.../stat` line; 0 when it
/// cannot be read.
fn stat_ticks(stat: &str) -> u64 {
    // Fields after the command name, which may hold spaces and parentheses.
    let Some(rest) = stat.rsplit_once(')').map(|r| r.1) else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |at: usize| -> u64 { fields.get(at).and_then(|v| v.parse().ok()).unwrap_or(0) };
    field(11) + field(12)
}

/// The app on the server side: discards on one port, counting bytes,
/// and echoes on the other.
async fn sink(ip: Ipv4Addr, received: Arc<AtomicU64>) -> Result<()> {
    let discard = TcpListener::bind((ip, DISCARD)).await?;
    let echo = TcpListener::bind((ip, ECHO)).await?;
    let echoing = async move {
        while let Ok((mut conn, _)) = echo.accept().await {
            let _ = conn.set_nodelay(true);
            tokio::spawn(async move {
                let (mut read, mut write) = conn.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    };
    tokio::spawn(echoing);
    while let Ok((mut conn, _)) = discard.accept().await {
        let received = received.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 256 * 1024];
            while let Ok(n) = conn.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
        });
    }
    Ok(())
}

/// One hop of the floor: accepts on `listen`, copies both ways to `next`.
async fn relay(listen: SocketAddr, next: SocketAddr) -> Result<()> {
    let listener = TcpListener::bind(listen).await?;
    while let Ok((mut conn, _)) = listener.accept().await {
        tokio::spawn(async move {
            let _ = conn.set_nodelay(true);
            if let Ok(mut upstream) = TcpStream::connect(next).await {
                let _ = upstream.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional_with_sizes(
                    &mut conn,
                    &mut upstream,
                    64 * 1024,
                    64 * 1024,
                )
                .await;
            }
        });
    }
    Ok(())
}

/// The mesh as both sidecars see it: the sink's Service (TCP ports) and
/// its Workload at the server's address.
fn snapshot(server: Ipv4Addr) -> Result<Snapshot> {
    let ports = [(DISCARD as u32, DISCARD as u32), (ECHO as u32, ECHO as u32)];
    let binding = testing::binding("bench", HOST, &ports);
    let workload = testing::workload(
        "c1/bench/sink",
        server.octets().to_vec(),
        "sink",
        vec![binding],
    );
    let service = mesh::Service {
        clusters: Vec::new(),
        ..testing::service(
            "bench",
            "sink",
            VIP.octets(),
            ports
                .iter()
                .map(|&(port, target)| testing::port(port, "tcp", mesh::AppProtocol::Tcp, target))
                .collect(),
        )
    };
    Ok(Snapshot::from_messages(&[service], &[workload])?)
}

/// The sidecars: the server's (15008, delivering to the sink) and the
/// client's (15001). Their thread ids.
fn sidecars(topology: &Topology) -> Result<(i32, i32)> {
    let MeshCerts {
        bundle,
        server: server_certs,
        client: client_certs,
    } = MeshCerts::generate("sink")?;
    let xds = Arc::new(XdsState::default());
    xds.snapshot.store(Arc::new(snapshot(topology.server.ip)?));

    let server_ip = topology.server.ip;
    let (server_xds, server_bundle) = (xds.clone(), bundle.clone());
    let server = spawn_on(&topology.server, "server sidecar", move || async move {
        let hbone = TcpListener::bind((server_ip, HBONE_PORT))
            .await
            .context("binding 15008")?;
        let app = LocalApp::new(
            weft_proxy::local_app::Config {
                addresses: vec![IpAddr::V4(server_ip)],
                ..Default::default()
            },
            Some(server_xds),
            Arc::default(),
            Default::default(),
        );
        weft_proxy::inbound::serve(hbone, server_certs, server_bundle, Arc::new(app)).await;
        Ok(())
    })?;

    let (client_ip, captured) = (topology.client.ip, topology.captured);
    let client = spawn_on(&topology.client, "client sidecar", move || async move {
        let outbound = client_outbound(client_certs, bundle, xds, Some(IpAddr::V4(client_ip)));
        // REDIRECT sends locally made connections to loopback, where a
        // pod's sidecar listens.
        let at = if captured {
            Ipv4Addr::LOCALHOST
        } else {
            client_ip
        };
        let listener = TcpListener::bind((at, CAPTURE))
            .await
            .context("binding 15001")?;
        if captured {
            outbound::serve_transparent(listener, outbound).await;
        } else {
            outbound::serve_explicit(listener, outbound).await;
        }
        Ok(())
    })?;
    Ok((client, server))
}

/// How the client reaches the sink on each path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    Direct,
    Relay,
    Weft,
}

impl Path {
    fn name(self) -> &'static str {
        match self {
            Path::Direct => "direct",
            Path::Relay => "plaintext relay, two hops (floor)",
            Path::Weft => "weft: two sidecars, HBONE mTLS",
        }
    }
}

#[derive(Clone, Copy)]
struct Reach {
    client: Ipv4Addr,
    server: Ipv4Addr,
    captured: bool,
}

impl Reach {
    /// A connection to the sink's `port` along `path`, ready for data.
    async fn connect(&self, path: Path, port: u16) -> Result<TcpStream> {
        let conn = match path {
            Path::Direct => TcpStream::connect((self.server, port)).await?,
            Path::Relay => {
                // The floor relays to the discard port only.
                TcpStream::connect((self.client, RELAY_FRONT)).await?
            }
            Path::Weft if self.captured => TcpStream::connect((VIP, port)).await?,
            Path::Weft => {
                let mut conn = TcpStream::connect((self.client, CAPTURE)).await?;
                conn.write_all(format!("CONNECT {HOST}:{port} HTTP/1.1\r\n\r\n").as_bytes())
                    .await?;
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let byte = conn.read_u8().await?;
                    head.push(byte);
                    if head.len() > 1024 {
                        bail!("the client sidecar's answer is too long");
                    }
                }
                if !head.starts_with(b"HTTP/1.1 200") {
                    bail!(
                        "the client sidecar refused: {}",
                        String::from_utf8_lossy(&head)
                    );
                }
                conn
            }
        };
        conn.set_nodelay(true)?;
        Ok(conn)
    }
}

/// One bulk run: `streams` connections writing for `seconds` after one
/// second of warm-up; bits per second as the sink counted them.
async fn bulk(
    reach: Reach,
    path: Path,
    streams: usize,
    options: &Options,
    received: &AtomicU64,
) -> Result<f64> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for _ in 0..streams {
        let mut conn = reach.connect(path, DISCARD).await?;
        let (stop, chunk) = (stop.clone(), options.chunk);
        writers.push(tokio::spawn(async move {
            let data = vec![b'x'; chunk];
            while !stop.load(Ordering::Relaxed) {
                if conn.write_all(&data).await.is_err() {
                    break;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (from, started) = (received.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs_f64(options.seconds)).await;
    let bytes = received.load(Ordering::Relaxed) - from;
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        let _ = writer.await;
    }
    // Let the sink drain what is in flight before the next run.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Ok(bytes as f64 * 8.0 / elapsed)
}

/// New connections, alternating between direct and weft: connect, one
/// byte there and back, close. Microseconds.
async fn new_connections(reach: Reach, count: usize) -> Result<(Histogram<u64>, Histogram<u64>)> {
    let mut direct = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)?;
    let mut weft = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)?;
    let warmup = count / 10;
    for n in 0..(warmup + count) {
        for path in if n % 2 == 0 {
            [Path::Direct, Path::Weft]
        } else {
            [Path::Weft, Path::Direct]
        } {
            let started = Instant::now();
            let mut conn = reach.connect(path, ECHO).await?;
            conn.write_all(b"x").await?;
            conn.read_u8().await?;
            let took = started.elapsed().as_micros().max(1) as u64;
            drop(conn);
            if n >= warmup {
                match path {
                    Path::Weft => weft.record(took)?,
                    _ => direct.record(took)?,
                }
            }
        }
    }
    Ok((direct, weft))
}

pub fn run(options: &Options, command: &str) -> Result<Outcome> {
    let topology = topology()?;
    eprintln!("tunnel: {}", topology.note);
    let received = Arc::new(AtomicU64::new(0));
    let server_ip = topology.server.ip;
    let sink_count = received.clone();
    let sink = spawn_on(&topology.server, "sink", move || {
        sink(server_ip, sink_count)
    })?;
    let client_ip = topology.client.ip;
    let relays = [
        spawn_on(&topology.client, "relay front", move || {
            relay(
                SocketAddr::from((client_ip, RELAY_FRONT)),
                SocketAddr::from((server_ip, RELAY_BACK)),
            )
        })?,
        spawn_on(&topology.server, "relay back", move || {
            relay(
                SocketAddr::from((server_ip, RELAY_BACK)),
                SocketAddr::from((server_ip, DISCARD)),
            )
        })?,
    ];
    let (client_sidecar, server_sidecar) = sidecars(&topology)?;
    let reach = Reach {
        client: client_ip,
        server: server_ip,
        captured: topology.captured,
    };
    let options = options.clone();
    let (done, finished) = std::sync::mpsc::channel();
    spawn_on(&topology.client, "client", move || async move {
        let result = measure(reach, &options, &received, |path| match path {
            Path::Direct => vec![("sink", sink)],
            Path::Relay => vec![("relay front", relays[0]), ("relay back", relays[1])],
            Path::Weft => vec![
                ("client sidecar", client_sidecar),
                ("server sidecar", server_sidecar),
            ],
        })
        .await;
        let _ = done.send(result);
        Ok(())
    })?;
    let measured = finished
        .recv_timeout(Duration::from_secs(600))
        .context("the measurement did not finish")??;
    let markdown = render(command, &topology, &measured);
    let passed = measured.passed();
    drop(topology);
    Ok(Outcome { markdown, passed })
}

struct BulkRow {
    path: Path,
    streams: usize,
    bits: f64,
    /// (component, CPU seconds per GB carried).
    cpu: Vec<(&'static str, f64)>,
}

struct Measured {
    bulk: Vec<BulkRow>,
    direct_connect: Histogram<u64>,
    weft_connect: Histogram<u64>,
    connections: usize,
    seconds: f64,
    chunk: usize,
}

impl Measured {
    fn bits(&self, path: Path, streams: usize) -> Option<f64> {
        self.bulk
            .iter()
            .find(|r| r.path == path && r.streams == streams)
            .map(|r| r.bits)
    }

    fn single_stream_ratio(&self) -> Option<f64> {
        Some(self.bits(Path::Weft, 1)? / self.bits(Path::Direct, 1)?)
    }

    fn connect_ratio(&self) -> f64 {
        self.weft_connect.value_at_quantile(0.5) as f64
            / self.direct_connect.value_at_quantile(0.5).max(1) as f64
    }

    fn passed(&self) -> bool {
        self.single_stream_ratio()
            .is_some_and(|r| r >= TARGET_RATIO)
            && self.connect_ratio() < ZTUNNEL_CONNECT_RATIO
    }
}

/// The targets: single-stream throughput at least this share of
/// direct (ztunnel measured 0.36-0.40 on this machine), and a new
/// connection's p50 below ztunnel's ratio to direct (530 / 177 µs).
const TARGET_RATIO: f64 = 0.45;
const ZTUNNEL_CONNECT_RATIO: f64 = 530.0 / 177.0;

async fn measure(
    reach: Reach,
    options: &Options,
    received: &AtomicU64,
    threads: impl Fn(Path) -> Vec<(&'static str, i32)>,
) -> Result<Measured> {
    // The components bind their ports on their own threads: wait for
    // each path to take a connection.
    for path in [Path::Direct, Path::Relay, Path::Weft] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while let Err(err) = reach.connect(path, DISCARD).await {
            if Instant::now() > deadline {
                return Err(err.context(format!("{} is not ready", path.name())));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut rows = Vec::new();
    for &streams in &options.streams {
        for path in [Path::Direct, Path::Relay, Path::Weft] {
            let components = threads(path);
            let before: Vec<f64> = components.iter().map(|c| thread_cpu(c.1)).collect();
            let from = received.load(Ordering::Relaxed);
            let bits = bulk(reach, path, streams, options, received).await?;
            let gigabytes = (received.load(Ordering::Relaxed) - from) as f64 / 1e9;
            let cpu = components
                .iter()
                .zip(before)
                .map(|(c, b)| (c.0, (thread_cpu(c.1) - b) / gigabytes.max(1e-9)))
                .collect();
            eprintln!("   {} x{streams}: {:.2} Gbit/s", path.name(), bits / 1e9);
            rows.push(BulkRow {
                path,
                streams,
                bits,
                cpu,
            });
        }
    }
    let (direct_connect, weft_connect) = new_connections(reach, options.connections).await?;
    Ok(Measured {
        bulk: rows,
        direct_connect,
        weft_connect,
        connections: options.connections,
        seconds: options.seconds,
        chunk: options.chunk,
    })
}

fn render(command: &str, topology: &Topology, m: &Measured) -> String {
    let mut md = format!(
        "# L4 through the HBONE tunnel: bulk TCP and new connections\n\n{}\n\
         Topology: {}. Each component (client, client sidecar, server sidecar, sink, relays) \
         runs on its own thread with a one-thread runtime, as each would in a process of its own. \
         Bulk: each stream writes {} KiB at a time for {} s after 1 s of warm-up; the sink \
         counts what arrives. CPU: seconds per GB carried, per component (warm-up included).\n\n\
         | path | streams | Gbit/s | ratio to direct | CPU s per GB |\n|---|---|---|---|---|\n",
        report::header(command),
        topology.note,
        m.chunk / 1024,
        m.seconds,
    );
    for row in &m.bulk {
        let direct = m.bits(Path::Direct, row.streams).unwrap_or(f64::NAN);
        let cpu: Vec<String> = row
            .cpu
            .iter()
            .map(|(name, s)| format!("{name} {s:.3}"))
            .collect();
        md += &format!(
            "| {} | {} | {:.2} | {:.2} | {} |\n",
            row.path.name(),
            row.streams,
            row.bits / 1e9,
            row.bits / direct,
            cpu.join(", ")
        );
    }
    let d = report::percentiles_ms(&m.direct_connect);
    let w = report::percentiles_ms(&m.weft_connect);
    md += &format!(
        "\n## New connections\n\nConnect, one byte there and back, close; {} per path, alternating, after {} of warm-up. \
         Through weft the sidecars' mTLS connection is already open (pooled): each new TCP connection is a new HTTP/2 CONNECT stream on it.\n\n\
         | path | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | samples |\n|---|---|---|---|---|---|---|\n\
         | direct | {} |\n| weft | {} |\n\n",
        m.connections,
        m.connections / 10,
        report::cells(&d, 3),
        report::cells(&w, 3),
    );
    let ratio = m.single_stream_ratio().unwrap_or(f64::NAN);
    md += &format!(
        "## Targets\n\n- single-stream throughput, weft / direct: {ratio:.2} (target ≥ {TARGET_RATIO}; ztunnel measured 0.36-0.40 on this machine): {}.\n\
         - new connection p50, weft / direct: {:.2} (target below ztunnel's {ZTUNNEL_CONNECT_RATIO:.2}, 530 µs against 177 µs): {}.\n",
        if ratio >= TARGET_RATIO {
            "met"
        } else {
            "not met"
        },
        m.connect_ratio(),
        if m.connect_ratio() < ZTUNNEL_CONNECT_RATIO {
            "met"
        } else {
            "not met"
        },
    );
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thread_ticks_are_user_plus_system_even_with_a_strange_name() {
        let stat = "4242 (client (side) car) S 1 2 3 4 5 6 7 8 9 10 250 70 0 0 20 0 1 0";
        assert_eq!(stat_ticks(stat), 320);
        assert_eq!(stat_ticks("garbage"), 0);
        // This thread's own figure reads.
        let own = format!("/proc/self/task/{}/stat", thread_id());
        assert!(std::path::Path::new(&own).exists(), "{own}");
        assert!(thread_cpu(thread_id()) >= 0.0);
    }

    #[test]
    fn targets_are_judged_on_single_stream_and_connection_ratios() {
        let mut direct = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).unwrap();
        let mut weft = direct.clone();
        direct.record(100).unwrap();
        weft.record(250).unwrap();
        let row = |path, streams, bits| BulkRow {
            path,
            streams,
            bits,
            cpu: Vec::new(),
        };
        let mut measured = Measured {
            bulk: vec![
                row(Path::Direct, 1, 20e9),
                row(Path::Weft, 1, 10e9),
                row(Path::Direct, 8, 20e9),
                row(Path::Weft, 8, 1e9),
            ],
            direct_connect: direct,
            weft_connect: weft,
            connections: 1,
            seconds: 1.0,
            chunk: 1,
        };
        assert_eq!(measured.single_stream_ratio(), Some(0.5));
        assert!(
            measured.passed(),
            "0.50 and 2.5x pass; eight streams are reported only"
        );
        measured.bulk[1].bits = 8e9;
        assert!(!measured.passed(), "0.40 is under the target");
    }
}
