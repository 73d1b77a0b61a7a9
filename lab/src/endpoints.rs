//! The lab's EndpointSlice controller, standing in for Kubernetes': every
//! Service with a selector gets one slice (`<service>-lab`) listing the
//! matching pods that have an address, each marked ready from the pod's
//! Ready condition, with the service's ports resolved against the pods'
//! container ports. Any Pod or Service change triggers a full reconcile;
//! lab clusters are small, so that is cheap and leaves nothing to drift.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Result;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::Api;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::runtime::watcher;
use serde_json::{Value, json};

const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
const MANAGER: &str = "weft-lab";

/// Whether the pod passes its readiness probe (terminating or not).
fn serving(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Whether new traffic should go to the pod: serving and not terminating.
fn ready(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none() && serving(pod)
}

fn selects(service: &Service, pod: &Pod) -> bool {
    let Some(selector) = service.spec.as_ref().and_then(|s| s.selector.as_ref()) else {
        return false;
    };
    let labels = pod.metadata.labels.clone().unwrap_or_default();
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A named target port, looked up in the pod's containers.
fn container_port(pod: &Pod, name: &str) -> Option<i32> {
    pod.spec.as_ref()?.containers.iter().find_map(|c| {
        c.ports
            .as_ref()?
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| p.container_port)
    })
}

/// The slice Kubernetes would write for `service` given `pods`.
pub fn desired(service: &Service, pods: &[Pod]) -> Option<Value> {
    let name = service.metadata.name.clone()?;
    let namespace = service.metadata.namespace.clone()?;
    service.spec.as_ref()?.selector.as_ref()?;
    let members: Vec<&Pod> = pods
        .iter()
        .filter(|p| p.metadata.namespace.as_deref() == Some(&namespace) && selects(service, p))
        .filter(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some())
        .collect();
    let ports: Vec<Value> = service
        .spec
        .as_ref()?
        .ports
        .clone()
        .unwrap_or_default()
        .iter()
        .map(|port| {
            use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
            let number = match &port.target_port {
                Some(IntOrString::Int(n)) => *n,
                Some(IntOrString::String(named)) => members
                    .iter()
                    .find_map(|p| container_port(p, named))
                    .unwrap_or(port.port),
                None => port.port,
            };
            json!({"name": port.name.clone().unwrap_or_default(), "port": number, "protocol": port.protocol.clone().unwrap_or_else(|| "TCP".into())})
        })
        .collect();
    let mut endpoints: Vec<Value> = members
        .iter()
        .map(|pod| {
            let ip = pod.status.as_ref().and_then(|s| s.pod_ip.clone()).unwrap_or_default();
            json!({
                "addresses": [ip],
                "conditions": {"ready": ready(pod), "serving": serving(pod), "terminating": pod.metadata.deletion_timestamp.is_some()},
                "nodeName": pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                "targetRef": {"kind": "Pod", "name": pod.metadata.name, "namespace": namespace, "uid": pod.metadata.uid},
            })
        })
        .collect();
    endpoints.sort_by_key(|e| e["addresses"][0].as_str().unwrap_or("").to_string());
    Some(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": format!("{name}-lab"),
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": name, MANAGED_BY: MANAGER},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": ports,
    }))
}

fn same(existing: &EndpointSlice, wanted: &Value) -> bool {
    let Ok(existing) = serde_json::to_value(existing) else {
        return false;
    };
    let pick = |v: &Value, k: &str| v.get(k).cloned().unwrap_or(Value::Null);
    let empty_as_null = |v: Value| match v {
        Value::Array(a) if a.is_empty() => Value::Null,
        v => v,
    };
    empty_as_null(pick(&existing, "endpoints")) == empty_as_null(pick(wanted, "endpoints"))
        && empty_as_null(pick(&existing, "ports")) == empty_as_null(pick(wanted, "ports"))
}

/// One full pass: writes the slices that differ, removes orphans.
pub async fn reconcile(client: &kube::Client) -> Result<usize> {
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let pods = Api::<Pod>::all(client.clone())
        .list(&ListParams::default())
        .await?;
    let slices = Api::<EndpointSlice>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{MANAGED_BY}={MANAGER}")))
        .await?;
    let mut existing: BTreeMap<(String, String), EndpointSlice> = slices
        .items
        .into_iter()
        .filter_map(|s| Some(((s.metadata.namespace.clone()?, s.metadata.name.clone()?), s)))
        .collect();
    let mut writes = 0;
    for service in &services.items {
        let Some(wanted) = desired(service, &pods.items) else {
            continue;
        };
        let namespace = wanted["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let name = wanted["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let api = Api::<EndpointSlice>::namespaced(client.clone(), &namespace);
        match existing.remove(&(namespace.clone(), name.clone())) {
            Some(current) if same(&current, &wanted) => {}
            Some(current) => {
                let mut replacement: EndpointSlice = serde_json::from_value(wanted)?;
                replacement.metadata.resource_version = current.metadata.resource_version;
                api.replace(&name, &PostParams::default(), &replacement)
                    .await?;
                writes += 1;
            }
            None => {
                api.create(&PostParams::default(), &serde_json::from_value(wanted)?)
                    .await?;
                writes += 1;
            }
        }
    }
    for ((namespace, name), _) in existing {
        Api::<EndpointSlice>::namespaced(client.clone(), &namespace)
            .delete(&name, &DeleteParams::default())
            .await?;
        writes += 1;
    }
    Ok(writes)
}

/// Runs the controller until the task is dropped (its watches go with it).
pub async fn run(client: kube::Client) {
    use kube::runtime::WatchStreamExt;
    let config = watcher::Config::default();
    // Backoff: an unreachable API server must not turn into a busy loop.
    let pods = watcher(Api::<Pod>::all(client.clone()), config.clone())
        .default_backoff()
        .map(|e| e.map(|_| ()));
    let services = watcher(Api::<Service>::all(client.clone()), config)
        .default_backoff()
        .map(|e| e.map(|_| ()));
    let mut events = futures::stream::select(pods.boxed(), services.boxed());
    let mut dirty = false;
    loop {
        let wait = if dirty {
            // Let a burst of changes settle into one pass.
            Duration::from_millis(20)
        } else {
            Duration::from_secs(3600)
        };
        tokio::select! {
            event = events.next() => match event {
                Some(Ok(())) => dirty = true,
                Some(Err(err)) => tracing::debug!("endpoint slices: watch: {err}"),
                None => return,
            },
            _ = tokio::time::sleep(wait) => {
                if !dirty {
                    continue;
                }
                match reconcile(&client).await {
                    Ok(_) => dirty = false,
                    Err(err) => {
                        tracing::warn!("endpoint slices: {err:#}; retrying");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_terminating_pod_is_serving_but_not_ready() {
        let service: Service = serde_json::from_value(json!({
            "metadata": {"name": "echo", "namespace": "demo"},
            "spec": {"selector": {"app": "echo"}, "ports": [{"port": 80, "targetPort": 8080}]},
        }))
        .unwrap();
        let pod = |name: &str, ip: &str, deleting: bool| -> Pod {
            let mut pod = json!({
                "metadata": {"name": name, "namespace": "demo", "labels": {"app": "echo"}},
                "spec": {"containers": [{"name": "app"}]},
                "status": {"podIP": ip, "conditions": [{"type": "Ready", "status": "True"}]},
            });
            if deleting {
                pod["metadata"]["deletionTimestamp"] = json!("2026-11-30T00:00:00Z");
            }
            serde_json::from_value(pod).unwrap()
        };
        let slice = desired(
            &service,
            &[pod("a", "10.0.0.1", false), pod("b", "10.0.0.2", true)],
        )
        .unwrap();
        let conditions: Vec<&Value> = slice["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| &e["conditions"])
            .collect();
        assert_eq!(
            conditions,
            [
                &json!({"ready": true, "serving": true, "terminating": false}),
                &json!({"ready": false, "serving": true, "terminating": true}),
            ]
        );
    }
}
