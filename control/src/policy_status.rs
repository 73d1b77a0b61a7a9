//! Writes each policy's `Accepted` condition back to its status: what weft
//! enforces, and, for what it cannot, which field and what it does instead.
//! A condition is written when it differs from what the object shows, once
//! per difference: the watch event that follows shows it written.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{DynamicObject, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::json;

use crate::cluster::{Key, Kind};
use crate::hub::Hub;
use crate::model::PolicyStatus;
use crate::security::{self, Written};
use crate::traffic::gateway_route;

/// The conditions `wanted` stands for, as Kubernetes writes them.
fn conditions(wanted: &Written) -> Vec<serde_json::Value> {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let condition = |kind: &str, ok: bool, reason: &str, message: &str| {
        json!({
            "type": kind,
            "status": if ok { "True" } else { "False" },
            "reason": reason,
            "message": message,
            "observedGeneration": wanted.observed_generation,
            "lastTransitionTime": now,
        })
    };
    let mut list = vec![condition(
        security::CONDITION,
        wanted.accepted,
        &wanted.reason,
        &wanted.message,
    )];
    if let Some((ok, reason, message)) = &wanted.resolved {
        list.push(condition(security::RESOLVED_REFS, *ok, reason, message));
    }
    list
}

/// How often conditions are compared when nothing else wakes the writer.
const EVERY: Duration = Duration::from_secs(2);

pub async fn run(hub: Arc<Hub>, client: Client) {
    let mut versions = hub.versions();
    let mut closing = hub.closing();
    // What was last written per object: a write the watch has not shown
    // yet is not repeated.
    let mut sent: HashMap<(Kind, Key), Written> = HashMap::new();
    loop {
        let owed: Vec<PolicyStatus> = hub
            .model()
            .policy_statuses()
            .into_iter()
            .filter(|s| s.seen.as_ref() != Some(&s.wanted))
            .filter(|s| sent.get(&(s.kind, s.key.clone())) != Some(&s.wanted))
            .collect();
        for status in owed {
            match write(&hub, &client, &status).await {
                Ok(()) => {
                    sent.insert((status.kind, status.key.clone()), status.wanted);
                }
                Err(err) => {
                    tracing::warn!(kind = ?status.kind, namespace = %status.key.0, name = %status.key.1, %err, "cannot write the policy's status; retrying");
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

async fn write(hub: &Hub, client: &Client, status: &PolicyStatus) -> Result<(), kube::Error> {
    let Some(resource) = crate::cluster::policy_resource(status.kind) else {
        return Ok(());
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &status.key.0, &resource);
    let conditions = conditions(&status.wanted);
    let patch = if matches!(status.kind, Kind::HttpRoute | Kind::GrpcRoute) {
        // Gateway API: one entry per Service parent this controller serves.
        let parents = hub.model().route_parents(status.kind, &status.key);
        let parents: Vec<_> = parents
            .into_iter()
            .map(|parent| {
                json!({
                    "parentRef": parent,
                    "controllerName": gateway_route::CONTROLLER,
                    "conditions": conditions,
                })
            })
            .collect();
        json!({"status": {"parents": parents}})
    } else {
        json!({"status": {"conditions": conditions}})
    };
    api.patch_status(
        &status.key.1,
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
}
