//! `weftctl create-remote-secret` and `weftctl remote-clusters`.
//!
//! A remote secret gives other clusters' control planes read access to this
//! one: a dedicated ServiceAccount with only what weft-control needs, and a
//! kubeconfig with its token, printed as a Secret manifest to apply in every
//! other cluster.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;

#[derive(Args)]
pub struct CreateRemoteSecretArgs {
    /// Kubeconfig of the cluster to give access to.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    /// Context in that kubeconfig (default: its current context).
    #[arg(long)]
    context: Option<String>,
    /// The id of that cluster in the mesh.
    #[arg(long)]
    name: String,
    /// The mesh's namespace.
    #[arg(long, default_value = "weft-system")]
    namespace: String,
    /// API server address other clusters should use, if not the kubeconfig's.
    #[arg(long)]
    server: Option<String>,
}

/// A cluster's client config from a kubeconfig file and context.
async fn config(kubeconfig: &std::path::Path, context: Option<String>) -> Result<kube::Config> {
    let file = kube::config::Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let options = kube::config::KubeConfigOptions {
        context,
        ..Default::default()
    };
    Ok(kube::Config::from_custom_kubeconfig(file, &options).await?)
}

/// A client for the cluster of a kubeconfig file and context.
pub async fn client(kubeconfig: &std::path::Path, context: Option<String>) -> Result<kube::Client> {
    Ok(kube::Client::try_from(config(kubeconfig, context).await?)?)
}

pub async fn create_remote_secret(args: CreateRemoteSecretArgs) -> Result<String> {
    let config = config(&args.kubeconfig, args.context.clone()).await?;
    let server = args
        .server
        .clone()
        .unwrap_or_else(|| config.cluster_url.to_string());
    let client = kube::Client::try_from(config)?;
    weft_control::remote_secret::create(client, &server, &args.name, &args.namespace).await
}

#[derive(Args)]
pub struct RemoteClustersArgs {
    /// The control plane's monitoring address.
    #[arg(long, default_value = "127.0.0.1:15014")]
    monitoring: std::net::SocketAddr,
}

pub async fn remote_clusters(args: RemoteClustersArgs) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::net::TcpStream::connect(args.monitoring),
    )
    .await
    .context("connecting to the control plane timed out")?
    .with_context(|| format!("connecting to the control plane at {}", args.monitoring))?;
    tcp.write_all(
        b"GET /debug/clusters HTTP/1.1\r\nhost: weft-control\r\nconnection: close\r\n\r\n",
    )
    .await?;
    let mut response = String::new();
    tcp.read_to_string(&mut response).await?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b)
        .context("the control plane sent no HTTP body")?;
    let parsed: serde_json::Value =
        serde_json::from_str(body).context("the control plane's answer is not JSON")?;
    let mut out = format!(
        "{:<20} {:<6} {:<7} {:<6} {:>9} {:>6} {:>9}  {}\n",
        "CLUSTER", "LOCAL", "SYNCED", "STALE", "SERVICES", "PODS", "ROTATING", "ERRORS"
    );
    for c in parsed["clusters"].as_array().into_iter().flatten() {
        let errors: Vec<String> = c["errors"]
            .as_object()
            .map(|e| {
                e.iter()
                    .map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or("")))
                    .collect()
            })
            .unwrap_or_default();
        out.push_str(&format!(
            "{:<20} {:<6} {:<7} {:<6} {:>9} {:>6} {:>9}  {}\n",
            c["id"].as_str().unwrap_or("?"),
            c["local"],
            c["synced"],
            c["stale"],
            c["services"],
            c["pods"],
            c["rotating"],
            errors.join("; ")
        ));
    }
    Ok(out)
}
