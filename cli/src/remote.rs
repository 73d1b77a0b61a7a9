//! `weftctl create-remote-secret` and `weftctl remote-clusters`.
//!
//! A remote secret gives other clusters' control planes read access to this
//! one: a dedicated ServiceAccount with only what weft-control needs, and a
//! kubeconfig with its token, printed as a Secret manifest to apply in every
//! other cluster.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

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

const READER: &str = "weft-reader";
const MANAGER: &str = "weftctl";

async fn apply<K>(api: &Api<K>, name: &str, object: serde_json::Value) -> Result<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .with_context(|| format!("applying {name}"))
}

pub async fn create_remote_secret(args: CreateRemoteSecretArgs) -> Result<String> {
    let kubeconfig = kube::config::Kubeconfig::read_from(&args.kubeconfig)
        .with_context(|| format!("reading {}", args.kubeconfig.display()))?;
    let options = kube::config::KubeConfigOptions {
        context: args.context.clone(),
        ..Default::default()
    };
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options).await?;
    let server = args
        .server
        .clone()
        .unwrap_or_else(|| config.cluster_url.to_string());
    let server = server.trim_end_matches('/').to_string();
    if !server.starts_with("https://") {
        bail!("the API server {server:?} is not https; other clusters will refuse it");
    }
    let client = kube::Client::try_from(config)?;
    let ns = &args.namespace;

    let namespaces: Api<Namespace> = Api::all(client.clone());
    apply(
        &namespaces,
        ns,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    apply(&accounts, READER, json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": READER, "namespace": ns}})).await?;
    let read = ["get", "list", "watch"];
    let cluster_roles: Api<ClusterRole> = Api::all(client.clone());
    apply(
        &cluster_roles,
        READER,
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": READER},
            "rules": [
                {"apiGroups": [""], "resources": ["services", "pods", "namespaces", "nodes"], "verbs": read},
                {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read},
                {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
            ],
        }),
    )
    .await?;
    let cluster_bindings: Api<ClusterRoleBinding> = Api::all(client.clone());
    apply(
        &cluster_bindings,
        READER,
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": READER},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": READER},
            "subjects": [{"kind": "ServiceAccount", "name": READER, "namespace": ns}],
        }),
    )
    .await?;
    // Secrets only in the mesh namespace, not cluster-wide.
    let roles: Api<Role> = Api::namespaced(client.clone(), ns);
    apply(
        &roles,
        READER,
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": {"name": READER, "namespace": ns},
            "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": read}],
        }),
    )
    .await?;
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), ns);
    apply(
        &bindings,
        READER,
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": READER, "namespace": ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": READER},
            "subjects": [{"kind": "ServiceAccount", "name": READER, "namespace": ns}],
        }),
    )
    .await?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let token_secret = format!("{READER}-token");
    apply(
        &secrets,
        &token_secret,
        json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": token_secret, "namespace": ns, "annotations": {"kubernetes.io/service-account.name": READER}},
            "type": "kubernetes.io/service-account-token",
        }),
    )
    .await?;

    // The token controller fills the Secret in; give it a few seconds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let (token, ca) = loop {
        let secret = secrets.get(&token_secret).await?;
        let data = secret.data.unwrap_or_default();
        if let (Some(token), Some(ca)) = (data.get("token"), data.get("ca.crt")) {
            break (String::from_utf8(token.0.clone())?, ca.0.clone());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the token controller did not fill in {ns}/{token_secret} within 15 s");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    use base64::Engine;
    let ca_data = base64::engine::general_purpose::STANDARD.encode(ca);
    let name = &args.name;
    let remote_kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca_data}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\ncurrent-context: {name}\n"
    );
    let indented: String = remote_kubeconfig
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect();
    Ok(format!(
        "# Remote secret for cluster {name}: apply it in every other cluster of the mesh.\n\
         apiVersion: v1\nkind: Secret\nmetadata:\n  name: weft-remote-secret-{name}\n  namespace: {ns}\n  \
         labels:\n    weft.io/multicluster: \"true\"\n  annotations:\n    weft.io/cluster: {name}\n\
         type: Opaque\nstringData:\n  {name}: |\n{indented}"
    ))
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
