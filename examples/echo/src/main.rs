//! `weft-echo`: the demo and benchmark echo server.

use std::net::SocketAddr;

use clap::Parser;

#[derive(Parser)]
/// Echo server that reports who served each call.
#[command(name = "weft-echo", version)]
struct Args {
    /// HTTP/1.1 and HTTP/2 (cleartext) port; "" to disable.
    #[arg(long, default_value = "0.0.0.0:8080")]
    http: String,
    /// gRPC (weft.echo.v1.Echo) port; "" to disable.
    #[arg(long, default_value = "0.0.0.0:9090")]
    grpc: String,
    /// Raw TCP echo port; "" to disable.
    #[arg(long, default_value = "0.0.0.0:9000")]
    tcp: String,
    #[arg(long, env = "CLUSTER_ID", default_value = "")]
    cluster: String,
    #[arg(long, env = "POD_NAME", default_value = "")]
    pod: String,
    #[arg(long = "app-version", env = "APP_VERSION", default_value = "v1")]
    app_version: String,
}

fn address(text: &str) -> anyhow::Result<Option<SocketAddr>> {
    if text.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        text.parse().map_err(|e| anyhow::anyhow!("{text:?}: {e}"))?,
    ))
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let result = (|| -> anyhow::Result<()> {
        let config = weft_echo::Config {
            identity: weft_echo::Identity {
                cluster: args.cluster,
                pod: args.pod,
                version: args.app_version,
            },
            http: address(&args.http)?,
            grpc: address(&args.grpc)?,
            tcp: address(&args.tcp)?,
        };
        let runtime = tokio::runtime::Runtime::new()?;
        runtime.block_on(async {
            let running = weft_echo::start(config).await?;
            tracing::info!(?running, "serving");
            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            anyhow::Ok(())
        })
    })();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
