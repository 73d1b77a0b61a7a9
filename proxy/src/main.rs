//! `weft-proxy`: `proxy sidecar` runs the sidecar (configured from the
//! environment the injector sets); `iptables` is the init container's
//! command.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use weft_proxy::iptables::{self, Capture};

#[derive(Parser)]
#[command(name = "weft-proxy", version, about = "weft's sidecar proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a proxy: `proxy sidecar`.
    Proxy {
        #[command(subcommand)]
        mode: ProxyMode,
    },
    /// Install the traffic capture rules in this network namespace (the init container).
    Iptables(IptablesArgs),
}

#[derive(Subcommand)]
enum ProxyMode {
    /// The sidecar, configured from WEFT_* and the Downward API environment.
    Sidecar,
}

fn sidecar() -> Result<()> {
    use tracing_subscriber::prelude::*;
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer())
        .init();
    let set_log_level: weft_proxy::admin::SetLogLevel = Box::new(move |level| {
        let filter = tracing_subscriber::EnvFilter::try_new(level)?;
        handle.reload(filter)?;
        Ok(())
    });
    let config = weft_proxy::sidecar::SidecarConfig::from_env()?;
    let deadline = config.drain_timeout;
    // A sidecar shares its pod's CPU limit. One thread by default: measured
    // with `weft-perf bench --proxy-threads 1|2`, two threads cost 20-45%
    // more CPU per request and give about a quarter less throughput per
    // CPU-second, and one thread carries about 20,000 req/s, more than most
    // pods see. WEFT_WORKER_THREADS raises it for busy pods.
    let threads = match std::env::var("WEFT_WORKER_THREADS") {
        Ok(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .with_context(|| format!("WEFT_WORKER_THREADS={text:?} is not a positive number"))?,
        Err(_) => 1,
    };
    // One thread: a current-thread runtime, without the work-stealing
    // scheduler's cross-thread bookkeeping on every wake-up.
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?
    };
    runtime.block_on(async {
        let sidecar = weft_proxy::sidecar::start_with(config, Some(set_log_level)).await?;
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = terminate.recv() => tracing::info!("SIGTERM"),
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupted"),
        }
        let left = sidecar.drain(deadline).await;
        tracing::info!(left, "shutting down");
        anyhow::Ok(())
    })
}

#[derive(clap::Args)]
struct IptablesArgs {
    /// Connections from this UID (the proxy's) are never captured.
    #[arg(long, default_value_t = 1337)]
    proxy_uid: u32,
    #[arg(long, default_value_t = 15006)]
    inbound_capture_port: u16,
    #[arg(long, default_value_t = 15001)]
    outbound_capture_port: u16,
    /// Comma-separated ports left out of inbound capture.
    #[arg(long, default_value = "")]
    exclude_inbound_ports: String,
    /// Comma-separated ports left out of outbound capture.
    #[arg(long, default_value = "")]
    exclude_outbound_ports: String,
    /// Comma-separated IPv4 CIDRs to capture outbound (default: all).
    #[arg(long, default_value = "")]
    include_outbound_cidrs: String,
    #[arg(long, default_value = "")]
    exclude_outbound_cidrs: String,
    /// Print the rules instead of installing them.
    #[arg(long)]
    dry_run: bool,
    /// Remove weft's rules instead (idempotent).
    #[arg(long)]
    cleanup: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Proxy {
            mode: ProxyMode::Sidecar,
        } => sidecar(),
        Command::Iptables(args) => (|| {
            if args.cleanup {
                return iptables::cleanup();
            }
            let capture = Capture {
                proxy_uid: args.proxy_uid,
                inbound_capture_port: args.inbound_capture_port,
                outbound_capture_port: args.outbound_capture_port,
                exclude_inbound_ports: iptables::parse_ports(&args.exclude_inbound_ports)?,
                exclude_outbound_ports: iptables::parse_ports(&args.exclude_outbound_ports)?,
                include_outbound_cidrs: iptables::parse_cidrs(&args.include_outbound_cidrs)?,
                exclude_outbound_cidrs: iptables::parse_cidrs(&args.exclude_outbound_cidrs)?,
            };
            if args.dry_run {
                print!("{}", capture.rules());
                return Ok(());
            }
            iptables::apply(&capture)
        })(),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
