//! `weftctl lab apiserver`: a standalone lab API server.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use weft_lab::{ApiServer, ApiServerConfig};

#[derive(Args)]
pub struct ApiserverArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:6443")]
    addr: SocketAddr,
    /// State directory: objects, CA, tokens and the admin kubeconfig. A
    /// restart on the same directory keeps everything.
    #[arg(long, default_value = "weft-lab/apiserver")]
    dir: PathBuf,
    /// Cluster name in the kubeconfig.
    #[arg(long, default_value = "weft-lab")]
    cluster: String,
    /// Range Service ClusterIPs are allocated from.
    #[arg(long, default_value = "10.96.0.0/16")]
    service_cidr: String,
    /// Stop after this many seconds (default: run until interrupted).
    #[arg(long)]
    exit_after: Option<u64>,
}

pub fn run(args: ApiserverArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(apiserver(args))
}

async fn apiserver(args: ApiserverArgs) -> Result<()> {
    let server = ApiServer::start(ApiServerConfig {
        addr: args.addr,
        dir: Some(args.dir.clone()),
        cluster_name: args.cluster,
        service_cidr: args.service_cidr,
        ..ApiServerConfig::default()
    })
    .await
    .with_context(|| format!("starting the lab API server on {}", args.addr))?;
    let kubeconfig = args.dir.join("kubeconfig");
    println!(
        "lab API server listening on https://{}\n\
         kubeconfig: {}\n\
         try: kubectl --kubeconfig {} get namespaces",
        server.addr(),
        kubeconfig.display(),
        kubeconfig.display()
    );
    match args.exit_after {
        Some(seconds) => tokio::time::sleep(std::time::Duration::from_secs(seconds)).await,
        None => {
            tokio::signal::ctrl_c()
                .await
                .context("waiting for Ctrl-C")?;
        }
    }
    println!("stopping");
    server.stop().await;
    Ok(())
}
