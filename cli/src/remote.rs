//! `weftctl create-remote-secret` and `weftctl remote-clusters`.
//!
//! A remote secret gives other clusters' control planes read access to this
//! one: a dedicated ServiceAccount with only what weft-control needs, and a
//! kubeconfig with its token, printed as a Secret manifest to apply in every
//! other cluster.

use std::path::PathBuf;

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

/// GETs a debug path of the control plane's monitoring port as JSON.
async fn debug_json(monitoring: std::net::SocketAddr, path: &str) -> Result<serde_json::Value> {
    let (status, body) = weft_lab::mesh::http_get(monitoring, path)
        .await
        .with_context(|| format!("connecting to the control plane at {monitoring}"))?;
    if status != 200 {
        anyhow::bail!("the control plane answered {status} to {path}");
    }
    serde_json::from_str(&body)
        .with_context(|| format!("the control plane's answer to {path} is not JSON"))
}

pub async fn remote_clusters(args: RemoteClustersArgs) -> Result<String> {
    let clusters = debug_json(args.monitoring, "/debug/clusters").await?;
    // Older control planes have no gateway view: the cluster table stands.
    let gateways = debug_json(args.monitoring, "/debug/gateways").await.ok();
    Ok(render(&clusters, gateways.as_ref()))
}

/// The cluster table, then the gateway table when there are gateways.
fn render(parsed: &serde_json::Value, gateways: Option<&serde_json::Value>) -> String {
    let mut out = format!(
        "{:<20} {:<6} {:<12} {:<7} {:<6} {:>9} {:>6} {:>9} {:>9}  {}\n",
        "CLUSTER",
        "LOCAL",
        "NETWORK",
        "SYNCED",
        "STALE",
        "SERVICES",
        "PODS",
        "ROTATING",
        "DRAINING",
        "ERRORS"
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
        // JSON values ignore widths: each is made text first.
        let text = |key: &str| c[key].to_string();
        out.push_str(&format!(
            "{:<20} {:<6} {:<12} {:<7} {:<6} {:>9} {:>6} {:>9} {:>9}  {}\n",
            c["id"].as_str().unwrap_or("?"),
            text("local"),
            c["network"].as_str().unwrap_or("?"),
            text("synced"),
            text("stale"),
            text("services"),
            text("pods"),
            text("rotating"),
            // Older control planes do not say.
            c["draining"]
                .as_bool()
                .map_or("-".to_string(), |d| d.to_string()),
            errors.join("; ")
        ));
    }
    let list = gateways
        .and_then(|g| g["gateways"].as_array().cloned())
        .unwrap_or_default();
    if list.is_empty() {
        return out;
    }
    out.push_str(&format!(
        "\n{:<44} {:<12} {:<24} {:<12}  {}\n",
        "EAST-WEST GATEWAY", "NETWORK", "ADDRESS", "HEALTH", "LAST PROBE"
    ));
    for g in list {
        let mut address: Vec<String> = g["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(String::from))
            .collect();
        if let Some(host) = g["hostname"].as_str().filter(|h| !h.is_empty()) {
            address.push(host.to_string());
        }
        let address = match address.is_empty() {
            true => "(none yet)".to_string(),
            false => format!("{}:{}", address.join(","), g["port"]),
        };
        let health = match (g["published"].as_bool(), g["problem"].as_str()) {
            (_, Some(problem)) => format!("unusable: {problem}"),
            (Some(false), None) => "this network".to_string(),
            _ => g["health"].as_str().unwrap_or("?").to_string(),
        };
        out.push_str(&format!(
            "{:<44} {:<12} {:<24} {:<12}  {}\n",
            g["name"].as_str().unwrap_or("?"),
            g["network"].as_str().unwrap_or("?"),
            address,
            health,
            g["probe"].as_str().unwrap_or("")
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn the_tables_show_networks_and_each_gateways_health() {
        let clusters = json!({"clusters": [
            {"id": "c1", "local": true, "network": "n1", "synced": true, "stale": false, "services": 3, "pods": 4, "rotating": false, "errors": {}},
            {"id": "c2", "local": false, "network": "n2", "synced": true, "stale": false, "services": 3, "pods": 2, "rotating": false, "draining": true, "errors": {}},
        ]});
        let gateways = json!({"network": "n1", "gateways": [
            {"name": "c1/weft-system/gw", "network": "n1", "addresses": ["10.100.1.1"], "hostname": "", "port": 15008, "health": "unknown", "published": false, "problem": null, "probe": ""},
            {"name": "c2/weft-system/gw", "network": "n2", "addresses": [], "hostname": "gw.example.com", "port": 15008, "health": "unhealthy", "published": true, "problem": null, "probe": "3 failed in a row: refused"},
            {"name": "c2/weft-system/bad", "network": "n2", "addresses": [], "hostname": "", "port": 0, "health": "unknown", "published": false, "problem": "weft.io/gateway-port: \"x\" is not a port number", "probe": ""},
        ]});
        let out = super::render(&clusters, Some(&gateways));
        let line = |start: &str| {
            out.lines()
                .find(|l| l.starts_with(start))
                .unwrap_or_default()
                .to_string()
        };
        let words = |start: &str| {
            line(start)
                .split_whitespace()
                .map(String::from)
                .collect::<Vec<_>>()
        };
        assert_eq!(words("c2 ")[..4], ["c2", "false", "n2", "true"], "{out}");
        assert_eq!(words("c2 ")[8], "true", "DRAINING: {out}");
        assert_eq!(words("c1 ")[8], "-", "an older control plane: {out}");
        assert!(line("c1/weft-system/gw").contains("this network"), "{out}");
        let dead = line("c2/weft-system/gw");
        assert!(
            dead.contains("gw.example.com:15008")
                && dead.contains("unhealthy")
                && dead.contains("3 failed in a row"),
            "{out}"
        );
        assert!(
            line("c2/weft-system/bad").contains("unusable: weft.io/gateway-port"),
            "{out}"
        );
        // No gateways: the cluster table alone.
        assert!(!super::render(&clusters, None).contains("EAST-WEST"));
    }
}
