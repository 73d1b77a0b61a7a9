//! `kubectl apply` for the lab: each document of a YAML stream is created
//! if new (through admission, so pods get their sidecar) and server-side
//! applied if it exists. And `kubectl delete -f`.

use anyhow::{Context, Result};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::discovery::Scope;

/// Splits a YAML stream into its non-empty documents, as JSON.
pub fn documents(text: &str) -> Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for (i, doc) in text.split("\n---").enumerate() {
        let value: serde_json::Value = match serde_saphyr::from_str(doc) {
            Ok(value) => value,
            Err(err) => {
                // A document of only comments parses as nothing.
                if doc.lines().all(|l| {
                    l.trim().is_empty() || l.trim_start().starts_with('#') || l.trim() == "---"
                }) {
                    continue;
                }
                return Err(anyhow::anyhow!("document {}: {err}", i + 1));
            }
        };
        if !value.is_null() {
            out.push(value);
        }
    }
    Ok(out)
}

/// The API for one object, its name, and how kubectl names it.
async fn api_for(
    client: &kube::Client,
    object: &serde_json::Value,
) -> Result<(Api<DynamicObject>, String, String)> {
    let api_version = object["apiVersion"]
        .as_str()
        .context("an object without apiVersion")?
        .to_string();
    let kind = object["kind"]
        .as_str()
        .context("an object without kind")?
        .to_string();
    let name = object["metadata"]["name"]
        .as_str()
        .context("an object without metadata.name")?
        .to_string();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", &api_version));
    let gvk = GroupVersionKind::gvk(group, version, &kind);
    let (resource, capabilities) = kube::discovery::pinned_kind(client, &gvk)
        .await
        .with_context(|| format!("the lab does not serve {api_version} {kind}"))?;
    let api: Api<DynamicObject> = match capabilities.scope {
        Scope::Namespaced => {
            let namespace = object["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default");
            Api::namespaced_with(client.clone(), namespace, &resource)
        }
        Scope::Cluster => Api::all_with(client.clone(), &resource),
    };
    let label = format!("{}/{name}", kind.to_lowercase());
    Ok((api, name, label))
}

/// Applies one object; returns "created" or "configured".
pub async fn apply(client: &kube::Client, object: serde_json::Value) -> Result<String> {
    let (api, name, label) = api_for(client, &object).await?;
    if api.get_opt(&name).await?.is_none() {
        let typed: DynamicObject = serde_json::from_value(object)?;
        api.create(&PostParams::default(), &typed)
            .await
            .with_context(|| format!("creating {label}"))?;
        return Ok(format!("{label} created"));
    }
    api.patch(
        &name,
        &PatchParams::apply("weftctl").force(),
        &Patch::Apply(object),
    )
    .await
    .with_context(|| format!("applying {label}"))?;
    Ok(format!("{label} configured"))
}

/// `kubectl delete -f`: deletes each document's object, if it exists.
pub async fn delete_all(client: &kube::Client, text: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for object in documents(text)? {
        let (api, name, label) = api_for(client, &object).await?;
        match api.delete(&name, &Default::default()).await {
            Ok(_) => out.push(format!("{label} deleted")),
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => return Err(err).with_context(|| format!("deleting {label}")),
        }
    }
    Ok(out)
}

/// Applies every document of `text`, in order.
pub async fn apply_all(client: &kube::Client, text: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for object in documents(text)? {
        out.push(apply(client, object).await?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_split_into_documents() {
        let docs = documents("# comment\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n# only a comment\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[1]["metadata"]["name"], "b");
        assert!(documents("apiVersion: v1\nkind: [unclosed").is_err());
    }
}
