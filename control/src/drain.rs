//! Draining a cluster: its endpoints are used only when nothing else is
//! healthy. The mark lives where every control plane reads it: the
//! annotation `weft.io/draining` on the remote secrets that register the
//! cluster (a comma-separated list of ids), and, in the cluster itself
//! (which no secret of its own registers), on its system namespace, naming
//! its own id. `weftctl cluster drain|undrain` writes it; the lab's tests
//! too.

use std::collections::BTreeSet;

use anyhow::Result;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;

use crate::cluster::ANNOTATION_DRAINING as DRAINING;

/// `ids` with `id` added or removed.
fn edit(ids: &str, id: &str, drain: bool) -> String {
    let mut set: BTreeSet<&str> = ids
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    if drain {
        set.insert(id);
    } else {
        set.remove(id);
    }
    set.into_iter().collect::<Vec<_>>().join(",")
}

/// Marks (or unmarks) `id` in one cluster; says what it wrote.
pub async fn mark(client: &kube::Client, namespace: &str, id: &str, drain: bool) -> Result<String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let registering: Vec<Secret> = secrets
        .list(
            &ListParams::default().labels(&format!("{}=true", crate::remotes::LABEL_MULTICLUSTER)),
        )
        .await?
        .items
        .into_iter()
        .filter(|s| s.data.as_ref().is_some_and(|d| d.contains_key(id)))
        .collect();
    let set = |value: Option<String>| {
        Patch::Merge(json!({"metadata": {"annotations": {DRAINING: value}}}))
    };
    if registering.is_empty() {
        // The cluster itself (nothing here registers it).
        let value = drain.then(|| id.to_string());
        Api::<Namespace>::all(client.clone())
            .patch(namespace, &PatchParams::default(), &set(value))
            .await?;
        return Ok(format!(
            "namespace {namespace} {}",
            if drain {
                format!("annotated {DRAINING}={id}")
            } else {
                "no longer draining".to_string()
            }
        ));
    }
    let mut written = Vec::new();
    for secret in registering {
        let name = secret.name_any();
        let current = secret
            .annotations()
            .get(DRAINING)
            .cloned()
            .unwrap_or_default();
        let next = edit(&current, id, drain);
        let value = (!next.is_empty()).then_some(next.clone());
        secrets
            .patch(&name, &PatchParams::default(), &set(value))
            .await?;
        written.push(format!("secret {name} {DRAINING}={next:?}"));
    }
    Ok(written.join(", "))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_draining_list_is_edited_as_a_set() {
        assert_eq!(super::edit("", "c2", true), "c2");
        assert_eq!(super::edit("c3, c2", "c2", true), "c2,c3");
        assert_eq!(super::edit("c2,c3", "c2", false), "c3");
        assert_eq!(super::edit("c2", "c2", false), "");
    }
}
