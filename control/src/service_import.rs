//! Keeps the MCS objects of this cluster as the model says: a
//! `ServiceImport` per service exported anywhere in the clusterset (union
//! of ports, the clusterset VIP, the exporting clusters), and the `Valid`
//! and `Conflict` conditions on this cluster's own `ServiceExport`s.
//!
//! Only ServiceImports labelled as weft-control's are changed or deleted;
//! one another MCS controller keeps is left alone and said so. Nothing is
//! deleted, and no export's conditions written, until every cluster has
//! synced: a control plane that has just started knows too little to say
//! an export is gone or in conflict.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::{DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::cluster::Key;
use crate::hub::Hub;
use crate::mcs::{self, Condition};
use crate::model::{ExportStatus, ServiceImportView};

/// How often the model is compared when nothing else wakes the writer.
const EVERY: Duration = Duration::from_secs(2);
/// How often the ServiceImports are listed again, so that one edited or
/// deleted by hand is mended.
const RELIST: Duration = Duration::from_secs(60);

/// A ServiceImport as the API server holds it.
#[derive(Debug)]
struct Held {
    ours: bool,
    spec: serde_json::Value,
    status: serde_json::Value,
}

pub async fn run(hub: Arc<Hub>, client: Client) {
    let imports: Api<DynamicObject> = Api::all_with(client.clone(), &mcs::service_imports());
    let mut versions = hub.versions();
    let mut closing = hub.closing();
    let mut held: Option<BTreeMap<Key, Held>> = None;
    let mut next_list = Instant::now();
    let mut foreign_said: BTreeSet<Key> = BTreeSet::new();
    let mut sent: HashMap<Key, Vec<Condition>> = HashMap::new();
    loop {
        let (wanted, statuses, settled) = {
            let model = hub.model();
            (
                model.service_imports(),
                model.export_statuses(),
                model.all_synced() && model.is_clean(),
            )
        };
        if settled {
            if held.is_none() || Instant::now() >= next_list {
                match list(&imports).await {
                    Ok(found) => {
                        held = Some(found);
                        next_list = Instant::now() + RELIST;
                    }
                    Err(absent) => {
                        held = None;
                        next_list = Instant::now() + if absent { RELIST } else { EVERY };
                    }
                }
            }
            if let Some(found) = held.as_mut()
                && let Err(err) = reconcile(&client, found, &wanted, &mut foreign_said).await
            {
                tracing::warn!(%err, "cannot write a ServiceImport; listing them again");
                held = None;
            }
        }
        // What was written for an export since deleted is forgotten.
        sent.retain(|key, _| statuses.iter().any(|s| s.key == *key));
        // Conflicts are judged on every cluster's exports: not before each
        // has been listed, or a starting control plane would flap them.
        for status in statuses.into_iter().filter(|_| settled) {
            if status.seen == status.wanted || sent.get(&status.key) == Some(&status.wanted) {
                continue;
            }
            match write_export_status(&client, &status).await {
                Ok(()) => {
                    sent.insert(status.key.clone(), status.wanted);
                }
                Err(err) => {
                    tracing::warn!(namespace = %status.key.0, name = %status.key.1, %err, "cannot write the ServiceExport's status; retrying");
                }
            }
        }
        tokio::select! {
            changed = versions.changed() => if changed.is_err() { return },
            _ = tokio::time::sleep(EVERY) => {}
            _ = closing.wait_for(|closed| *closed) => return,
        }
    }
}

/// Every ServiceImport here. `Err(true)`: the kind is not installed.
async fn list(imports: &Api<DynamicObject>) -> Result<BTreeMap<Key, Held>, bool> {
    match imports.list(&ListParams::default()).await {
        Ok(list) => Ok(list
            .items
            .into_iter()
            .map(|object| {
                let key = (
                    object.metadata.namespace.clone().unwrap_or_default(),
                    object.metadata.name.clone().unwrap_or_default(),
                );
                let ours = object
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(mcs::MANAGED_BY.0))
                    .is_some_and(|v| v == mcs::MANAGED_BY.1);
                let held = Held {
                    ours,
                    spec: object.data["spec"].clone(),
                    status: object.data["status"].clone(),
                };
                (key, held)
            })
            .collect()),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            tracing::warn!(
                "the ServiceImport kind (multicluster.x-k8s.io) is not installed: no ServiceImports are kept; clusterset names still work"
            );
            Err(true)
        }
        Err(err) => {
            tracing::warn!(%err, "cannot list ServiceImports; retrying");
            Err(false)
        }
    }
}

async fn reconcile(
    client: &Client,
    held: &mut BTreeMap<Key, Held>,
    wanted: &[ServiceImportView],
    foreign_said: &mut BTreeSet<Key>,
) -> Result<(), kube::Error> {
    let resource = mcs::service_imports();
    for view in wanted {
        let key = &view.key;
        // A clusterset IP service's VIP comes with the next flush.
        if !view.headless && view.vip.is_none() {
            continue;
        }
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &key.0, &resource);
        let (spec, status) = view.spec_and_status();
        match held.get(key) {
            Some(found) if !found.ours => {
                if foreign_said.insert(key.clone()) {
                    tracing::warn!(namespace = %key.0, name = %key.1, "a ServiceImport weft-control does not manage exists; leaving it as it is (its clusterset VIP may differ from weft's)");
                }
                continue;
            }
            Some(found) if found.spec == spec && found.status == status => continue,
            Some(_) => {
                api.patch(
                    &key.1,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"spec": spec})),
                )
                .await?;
            }
            None => {
                let object: DynamicObject = serde_json::from_value(json!({
                    "apiVersion": resource.api_version,
                    "kind": resource.kind,
                    "metadata": {
                        "name": key.1,
                        "namespace": key.0,
                        "labels": {mcs::MANAGED_BY.0: mcs::MANAGED_BY.1},
                    },
                    "spec": spec,
                }))
                .map_err(kube::Error::SerdeError)?;
                api.create(&PostParams::default(), &object).await?;
            }
        }
        api.patch_status(
            &key.1,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": status})),
        )
        .await?;
        tracing::info!(namespace = %key.0, name = %key.1, clusters = ?view.clusters, "ServiceImport written");
        held.insert(
            key.clone(),
            Held {
                ours: true,
                spec,
                status,
            },
        );
    }
    let gone: Vec<Key> = held
        .iter()
        .filter(|(key, found)| found.ours && !wanted.iter().any(|v| v.key == **key))
        .map(|(key, _)| key.clone())
        .collect();
    for key in gone {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &key.0, &resource);
        match api.delete(&key.1, &Default::default()).await {
            Ok(_) => {
                tracing::info!(namespace = %key.0, name = %key.1, "ServiceImport deleted: no cluster exports it")
            }
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => return Err(err),
        }
        held.remove(&key);
    }
    Ok(())
}

async fn write_export_status(client: &Client, status: &ExportStatus) -> Result<(), kube::Error> {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &status.key.0, &mcs::service_exports());
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let conditions: Vec<serde_json::Value> = status
        .wanted
        .iter()
        .map(|c| {
            json!({
                "type": c.kind,
                "status": if c.status { "True" } else { "False" },
                "reason": c.reason,
                "message": c.message,
                "observedGeneration": status.generation,
                "lastTransitionTime": now,
            })
        })
        .collect();
    api.patch_status(
        &status.key.1,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"conditions": conditions}})),
    )
    .await
    .map(|_| ())
}
