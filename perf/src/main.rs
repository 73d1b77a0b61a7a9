//! `weft-perf`: run a benchmark scenario and write its report.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use weft_perf::{apiserver, control, report, sidecar};

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
        #[arg(long, default_value_t = 250.0)]
        target_p99_ms: f64,
        #[arg(long, default_value_t = 300.0)]
        target_rss_mb: f64,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let (name, outcome) = match cli.scenario {
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
        Scenario::Control {
            clusters,
            workloads,
            pods_per_service,
            proxies,
            proxies_per_connection,
            changes,
            target_p99_ms,
            target_rss_mb,
        } => (
            "control",
            control::run(
                &control::Options {
                    clusters,
                    workloads_per_cluster: workloads,
                    pods_per_service,
                    proxies,
                    proxies_per_connection,
                    changes,
                    target_p99_ms,
                    target_rss_mb,
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
