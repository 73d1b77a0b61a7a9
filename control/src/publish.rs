//! Keeps what workloads and the API server need from the CA in place: the
//! `weft-root-cert` ConfigMap in every namespace (mounted by sidecars to
//! verify the control plane) and the injection webhook's `caBundle` (so
//! the API server trusts the webhook). Checked at start, whenever a
//! namespace is added or changed, and every 30 s; written only when
//! different.

use std::time::Duration;

use base64::Engine;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use kube::api::{Api, ListParams, Patch, PatchParams};
use serde_json::json;

pub const ROOT_CERT_CONFIGMAP: &str = "weft-root-cert";
pub const WEBHOOK_CONFIGURATION: &str = "weft-sidecar-injector";
const MANAGER: &str = "weft-control";

pub async fn run(client: kube::Client, root_pem: String) {
    use futures::StreamExt;
    use kube::runtime::WatchStreamExt;
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    // A new namespace gets its ConfigMap at once, not at the next tick: its
    // first pods cannot start without it.
    // With backoff: a watcher that fails at once (a client whose
    // connection task is gone, an API server refusing) would otherwise
    // retry in a loop that never waits, holding a runtime thread.
    let mut namespaces = kube::runtime::watcher(
        Api::<Namespace>::all(client.clone()),
        kube::runtime::watcher::Config::default(),
    )
    .default_backoff()
    .boxed();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(event) = namespaces.next() => {
                if !matches!(event, Ok(kube::runtime::watcher::Event::Apply(_))) {
                    continue;
                }
            }
        }
        if let Err(err) = publish_root_cert(&client, &root_pem).await {
            tracing::warn!(%err, "publishing the root certificate failed; retrying");
        }
        if let Err(err) = patch_ca_bundle(&client, &root_pem).await {
            tracing::warn!(%err, "updating the webhook caBundle failed; retrying");
        }
    }
}

async fn publish_root_cert(client: &kube::Client, root_pem: &str) -> kube::Result<()> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for ns in namespaces.list(&ListParams::default()).await? {
        let Some(name) = ns.metadata.name else {
            continue;
        };
        let maps: Api<ConfigMap> = Api::namespaced(client.clone(), &name);
        let current = maps.get_opt(ROOT_CERT_CONFIGMAP).await?;
        if current
            .and_then(|c| c.data)
            .and_then(|d| d.get("root-cert.pem").cloned())
            .as_deref()
            == Some(root_pem)
        {
            continue;
        }
        let map = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": ROOT_CERT_CONFIGMAP, "namespace": name, "labels": {"weft.io/managed-by": "weft-control"}},
            "data": {"root-cert.pem": root_pem},
        });
        maps.patch(
            ROOT_CERT_CONFIGMAP,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(map),
        )
        .await?;
    }
    Ok(())
}

async fn patch_ca_bundle(client: &kube::Client, root_pem: &str) -> kube::Result<()> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let Some(mut config) = api.get_opt(WEBHOOK_CONFIGURATION).await? else {
        return Ok(());
    };
    let bundle = k8s_openapi::ByteString(root_pem.as_bytes().to_vec());
    let mut changed = false;
    for webhook in config.webhooks.iter_mut().flatten() {
        if webhook.client_config.ca_bundle.as_ref() != Some(&bundle) {
            webhook.client_config.ca_bundle = Some(bundle.clone());
            changed = true;
        }
    }
    if changed {
        api.replace(WEBHOOK_CONFIGURATION, &Default::default(), &config)
            .await?;
        tracing::info!(
            bundle = %base64::engine::general_purpose::STANDARD.encode(root_pem).len(),
            "caBundle of the injection webhook updated"
        );
    }
    Ok(())
}
