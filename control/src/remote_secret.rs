//! The remote secret: what lets other clusters' control planes read this
//! one. A dedicated ServiceAccount that may get, list and watch exactly
//! what the watchers read (services, pods, namespaces, nodes,
//! EndpointSlices, MCS ServiceExports) and nothing else: no Secrets, since the mesh namespace
//! holds the CA key and every other cluster's credentials, and no
//! TokenReviews. A kubeconfig with its token is returned as a Secret
//! manifest to apply in every other cluster. `weftctl
//! create-remote-secret` prints it; the lab applies it;
//! `examples/install/15-remote-reader.yaml` holds the same rules.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;

pub const READER: &str = "weft-reader";

/// The reader's ClusterRole rules: what `cluster::spawn_watchers` reads.
pub fn reader_rules() -> serde_json::Value {
    let read = ["get", "list", "watch"];
    json!([
        {"apiGroups": [""], "resources": ["services", "pods", "namespaces", "nodes"], "verbs": read},
        {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": read},
        {"apiGroups": ["multicluster.x-k8s.io"], "resources": ["serviceexports"], "verbs": read},
    ])
}
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

/// Deletes `name` if it exists; says which kind it deleted.
async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<Option<String>>
where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &Default::default()).await {
        Ok(_) => Ok(Some(K::kind(&()).into_owned())),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
        Err(err) => Err(err).with_context(|| format!("deleting {} {name}", K::kind(&()))),
    }
}

/// Creates (idempotently) the reader account in the cluster `client`
/// talks to and returns the Secret manifest, named after `name`, for the
/// API server at `server` (https).
pub async fn create(
    client: kube::Client,
    server: &str,
    name: &str,
    namespace: &str,
) -> Result<String> {
    let server = server.trim_end_matches('/').to_string();
    if !server.starts_with("https://") {
        bail!("the API server {server:?} is not https; other clusters will refuse it");
    }
    let ns = namespace;

    let namespaces: Api<Namespace> = Api::all(client.clone());
    apply(
        &namespaces,
        ns,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
    )
    .await?;
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    apply(&accounts, READER, json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": READER, "namespace": ns}})).await?;
    let role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": READER},
        "rules": reader_rules(),
    });
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": READER},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": READER},
        "subjects": [{"kind": "ServiceAccount", "name": READER, "namespace": ns}],
    });
    apply(&Api::<ClusterRole>::all(client.clone()), READER, role).await?;
    apply(
        &Api::<ClusterRoleBinding>::all(client.clone()),
        READER,
        binding,
    )
    .await?;
    // Earlier versions let the reader read the mesh namespace's Secrets;
    // an upgrade takes that away.
    let roles: Api<Role> = Api::namespaced(client.clone(), ns);
    let bindings: Api<RoleBinding> = Api::namespaced(client.clone(), ns);
    let mut notes = String::new();
    for removed in [
        delete_if_present(&bindings, READER).await?,
        delete_if_present(&roles, READER).await?,
    ]
    .into_iter()
    .flatten()
    {
        tracing::warn!(
            namespace = ns,
            "removed the {removed} {READER} that let other clusters read Secrets"
        );
        notes.push_str(&format!(
            "# Removed the {removed} {ns}/{READER}: other clusters no longer read Secrets in {name}.\n"
        ));
    }
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
    let remote_kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {name}\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca_data}\nusers:\n- name: {name}\n  user:\n    token: {token}\ncontexts:\n- name: {name}\n  context:\n    cluster: {name}\n    user: {name}\ncurrent-context: {name}\n"
    );
    let indented: String = remote_kubeconfig
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect();
    Ok(format!(
        "# Remote secret for cluster {name}: apply it in every other cluster of the mesh.\n{notes}\
         apiVersion: v1\nkind: Secret\nmetadata:\n  name: weft-remote-secret-{name}\n  namespace: {ns}\n  \
         labels:\n    weft.io/multicluster: \"true\"\n  annotations:\n    weft.io/cluster: {name}\n\
         type: Opaque\nstringData:\n  {name}: |\n{indented}"
    ))
}
