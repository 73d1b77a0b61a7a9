//! `weft-perf`: run a benchmark scenario and write its report.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use weft_perf::{apiserver, bench, code_order, control, floor, load, report, sidecar, tunnel};

#[derive(Parser)]
#[command(name = "weft-perf", about = "weft's benchmark scenarios")]
struct Cli {
    /// Where reports are written.
    #[arg(long, default_value = "perf/results", global = true)]
    results: PathBuf,
    /// Print the report only; write no file.
    #[arg(long, global = true)]
    no_write: bool,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Generate load against a target and print latency percentiles (wrk2/Fortio style).
    Load {
        /// http://host[:port]/path for http1/http2/grpc; host:port for tcp.
        target: String,
        #[arg(long, value_enum, default_value = "http1")]
        protocol: load::Protocol,
        /// Send through this explicit proxy (absolute-form for HTTP/1.1, CONNECT otherwise).
        #[arg(long)]
        proxy: Option<std::net::SocketAddr>,
        /// Requests per second in total; 0 for closed loop (maximum throughput).
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Concurrent streams per connection (HTTP/2, gRPC).
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// Seconds measured.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Seconds of warm-up, not measured.
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        /// Request body bytes (0: GET).
        #[arg(long, default_value_t = 1024)]
        payload: usize,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// The lab API server: objects listed and watched by many watchers, update fan-out latency.
    Apiserver {
        #[arg(long, default_value_t = 10_000)]
        objects: usize,
        #[arg(long, default_value_t = 100)]
        watchers: usize,
        #[arg(long, default_value_t = 500)]
        updates: usize,
        #[arg(long, default_value_t = 50)]
        warmup: usize,
        /// Milliseconds between updates.
        #[arg(long, default_value_t = 5)]
        gap_ms: u64,
        #[arg(long, default_value_t = 5.0)]
        target_p99_ms: f64,
    },
    /// The data path: direct, weft (same and cross cluster), nginx and HAProxy, in one run.
    Bench {
        /// Fixed rates, req/s, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1000,5000")]
        rates: Vec<u64>,
        /// Seconds measured per run.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        #[arg(long, default_value_t = 2)]
        warmup: u64,
        #[arg(long, default_value_t = 1024)]
        payload: usize,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        #[arg(long, default_value_t = 32)]
        max_connections: usize,
        /// Leave out nginx, HAProxy and wrk.
        #[arg(long)]
        no_baselines: bool,
        /// Leave out the cross-cluster scenario.
        #[arg(long)]
        no_cross_cluster: bool,
        #[arg(long, default_value_t = 1000)]
        snapshot_services: usize,
        #[arg(long, default_value_t = 10_000)]
        snapshot_workloads: usize,
        /// Runtime threads per weft sidecar (WEFT_WORKER_THREADS); 1 compares
        /// per core with one-worker nginx and HAProxy.
        #[arg(long, default_value_t = 1)]
        proxy_threads: usize,
        /// Runs with the 20 authorization rules, each between two without.
        #[arg(long, default_value_t = 3)]
        authz_pairs: usize,
        /// Runs with 10 routes and a DestinationRule, each between two without.
        #[arg(long, default_value_t = 3)]
        route_pairs: usize,
        /// Also run the stack's floor: a proxy pair of weft's libraries
        /// doing nothing of weft's, its link in HTTP/2 and in HTTP/1.1,
        /// and a pair that frames HTTP/1.1 itself, without hyper.
        #[arg(long)]
        stack_floor: bool,
    },
    /// The sidecar's symbol order from the function traces of a
    /// `--cfg weft_code_trace` build (run by `perf/code-order.sh`).
    #[command(hide = true)]
    CodeOrder {
        /// The traced build of weft-proxy.
        #[arg(long)]
        binary: PathBuf,
        /// The build the order is for (`cargo dist -p weft-proxy`), whose
        /// names the order uses.
        #[arg(long)]
        shipped: PathBuf,
        /// Where the order is written.
        #[arg(long, default_value = "proxy/code-order.txt")]
        out: PathBuf,
        /// The copy of the traced build the bench ran: its cached pages
        /// say which uninstrumented functions ran.
        #[arg(long)]
        touched: Option<PathBuf>,
        /// The traces (`/tmp/weft-code-trace.<pid>`), read in this order.
        #[arg(required = true)]
        traces: Vec<PathBuf>,
    },
    /// One side of the stack's floor (run by `bench --stack-floor`).
    #[command(hide = true)]
    Floor {
        #[arg(long, value_enum)]
        side: floor::Side,
        #[arg(long, value_enum)]
        link: floor::Link,
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        upstream: std::net::SocketAddr,
        #[arg(long)]
        certs: PathBuf,
    },
    /// Added latency of the two-sidecar mTLS path for TCP echo, against direct, in one run.
    Sidecar {
        #[arg(long, default_value_t = 1_000)]
        rate: u64,
        #[arg(long, default_value_t = 20_000)]
        requests: usize,
        #[arg(long, default_value_t = 2_000)]
        warmup: usize,
        #[arg(long, default_value_t = 1024)]
        payload: usize,
    },
    /// L4 through the HBONE tunnel: bulk TCP (1 and 8 streams) and new connections, against direct and a plaintext relay.
    Tunnel {
        /// Seconds measured per bulk run.
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        /// Stream counts, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,8")]
        streams: Vec<usize>,
        /// New connections per path.
        #[arg(long, default_value_t = 2_000)]
        connections: usize,
        /// Bytes per write.
        #[arg(long, default_value_t = 131_072)]
        chunk: usize,
    },
    /// The control plane: clusters of workloads, many delta-xDS proxies, change propagation latency.
    Control {
        #[arg(long, default_value_t = 3)]
        clusters: usize,
        #[arg(long, default_value_t = 5_000)]
        workloads: usize,
        #[arg(long, default_value_t = 100)]
        pods_per_service: usize,
        #[arg(long, default_value_t = 1_000)]
        proxies: usize,
        #[arg(long, default_value_t = 50)]
        proxies_per_connection: usize,
        #[arg(long, default_value_t = 40)]
        changes: usize,
        #[arg(long, default_value_t = 150.0)]
        target_p99_ms: f64,
        #[arg(long, default_value_t = 300.0)]
        target_rss_mb: f64,
        #[arg(long, default_value_t = 3.0)]
        target_sync_s: f64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    if let Scenario::Load {
        target,
        protocol,
        proxy,
        rate,
        connections,
        concurrency,
        duration,
        warmup,
        payload,
        json,
    } = &cli.scenario
    {
        let options = load::Options {
            protocol: *protocol,
            target: target.clone(),
            proxy: *proxy,
            rate: *rate,
            connections: *connections,
            concurrency: *concurrency,
            duration: Duration::from_secs_f64(*duration),
            warmup: Duration::from_secs_f64(*warmup),
            payload: *payload,
            progress: !json,
            ..Default::default()
        };
        let runtime = tokio::runtime::Runtime::new()?;
        let summary = runtime.block_on(load::run(&options))?;
        if *json {
            println!("{}", serde_json::to_string_pretty(&summary)?);
        } else {
            println!("{}", summary.line());
        }
        return Ok(());
    }
    if let Scenario::CodeOrder {
        binary,
        shipped,
        out,
        touched,
        traces,
    } = &cli.scenario
    {
        return code_order::run(binary, shipped, traces, touched.as_deref(), out);
    }
    if let Scenario::Floor {
        side,
        link,
        listen,
        upstream,
        certs,
    } = &cli.scenario
    {
        return floor::run(&floor::Options {
            side: *side,
            link: *link,
            listen: *listen,
            upstream: *upstream,
            certs: certs.clone(),
        });
    }
    let (name, outcome) = match cli.scenario {
        Scenario::Load { .. } | Scenario::Floor { .. } | Scenario::CodeOrder { .. } => {
            unreachable!("handled above")
        }
        Scenario::Bench {
            rates,
            duration,
            warmup,
            payload,
            connections,
            max_connections,
            no_baselines,
            no_cross_cluster,
            snapshot_services,
            snapshot_workloads,
            proxy_threads,
            authz_pairs,
            route_pairs,
            stack_floor,
        } => (
            "bench",
            bench::run(
                &bench::Options {
                    rates,
                    duration: Duration::from_secs(duration),
                    warmup: Duration::from_secs(warmup),
                    payload,
                    connections,
                    max_connections,
                    baselines: !no_baselines,
                    cross_cluster: !no_cross_cluster,
                    snapshot_services,
                    snapshot_workloads,
                    proxy_threads,
                    authz_pairs,
                    route_pairs,
                    stack_floor,
                    results: (!cli.no_write).then(|| cli.results.clone()),
                },
                &command,
            )?,
        ),
        Scenario::Apiserver {
            objects,
            watchers,
            updates,
            warmup,
            gap_ms,
            target_p99_ms,
        } => (
            "apiserver",
            apiserver::run(
                &apiserver::Options {
                    objects,
                    watchers,
                    updates,
                    warmup,
                    gap: Duration::from_millis(gap_ms),
                    target_p99_ms,
                },
                &command,
            )?,
        ),
        Scenario::Sidecar {
            rate,
            requests,
            warmup,
            payload,
        } => (
            "sidecar-tcp",
            sidecar::run(
                &sidecar::Options {
                    rate,
                    requests,
                    warmup,
                    payload,
                },
                &command,
            )?,
        ),
        Scenario::Tunnel {
            seconds,
            streams,
            connections,
            chunk,
        } => (
            "tunnel",
            tunnel::run(
                &tunnel::Options {
                    seconds,
                    streams,
                    connections,
                    chunk,
                },
                &command,
            )?,
        ),
        Scenario::Control {
            clusters,
            workloads,
            pods_per_service,
            proxies,
            proxies_per_connection,
            changes,
            target_p99_ms,
            target_rss_mb,
            target_sync_s,
        } => (
            "control",
            control::run(
                &control::Options {
                    target_p99_ms,
                    target_rss_mb,
                    target_sync_s,
                    clusters,
                    workloads_per_cluster: workloads,
                    pods_per_service,
                    proxies,
                    proxies_per_connection,
                    changes,
                },
                &command,
            )?,
        ),
    };
    println!("{}", outcome.markdown);
    if !cli.no_write {
        let path = report::write(&cli.results, name, &outcome.markdown)?;
        println!("report written to {}", path.display());
    }
    if !outcome.passed {
        std::process::exit(2);
    }
    Ok(())
}
