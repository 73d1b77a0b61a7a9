//! `weft-proxy`: `proxy sidecar` runs the sidecar (configured from the
//! environment the injector sets), `proxy gateway` an east-west gateway;
//! `iptables` is the init container's command.

#[cfg(weft_code_trace)]
mod code_trace;

use anyhow::{Context, Result};
use weft_proxy::command_line::{self, Command};
use weft_proxy::iptables;

fn sidecar(mode: weft_proxy::sidecar::Mode) -> Result<()> {
    use tracing_subscriber::prelude::*;
    let from_env = std::env::var("RUST_LOG").ok().map(|text| {
        let parsed = weft_proxy::logs::parse(&text);
        (text, parsed)
    });
    let filter = match &from_env {
        Some((_, Ok(filter))) => filter.clone(),
        _ => tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO),
    };
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    tracing_subscriber::registry()
        .with(filter)
        // Standard error: standard output carries the access log.
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .init();
    if let Some((text, Err(err))) = &from_env {
        tracing::warn!("RUST_LOG={text:?} is not a log filter ({err:#}); logging at info");
    }
    let set_log_level: weft_proxy::admin::SetLogLevel = Box::new(move |level| {
        let filter = weft_proxy::logs::parse(level)?;
        handle.reload(filter)?;
        Ok(())
    });
    let config = weft_proxy::sidecar::SidecarConfig {
        mode,
        ..weft_proxy::sidecar::SidecarConfig::from_env()?
    };
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

fn main() -> std::process::ExitCode {
    let result: Result<()> =
        command_line::parse(std::env::args().skip(1)).and_then(|command| match command {
            Command::Sidecar => sidecar(weft_proxy::sidecar::Mode::Sidecar),
            Command::Gateway => sidecar(weft_proxy::sidecar::Mode::Gateway),
            Command::Print(text) => {
                print!("{text}");
                Ok(())
            }
            Command::Iptables(args) if args.cleanup => iptables::cleanup(),
            Command::Iptables(args) if args.dry_run => {
                print!("{}", args.capture.rules());
                Ok(())
            }
            Command::Iptables(args) => iptables::apply(&args.capture),
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
