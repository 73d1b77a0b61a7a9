//! Sidecar injection: whether a pod gets a sidecar, and what it gets, from
//! one versioned template (`sidecar-template.yaml`) that the webhook and
//! `weftctl kube-inject` share.

use base64::Engine;
use serde_json::{Map, Value, json};

pub mod webhook;

pub const TEMPLATE: &str = include_str!("sidecar-template.yaml");
pub const TEMPLATE_VERSION: &str = "1";

/// The annotation recording an injection; its presence makes injection
/// idempotent.
pub const STATUS_ANNOTATION: &str = "sidecar.weft.io/status";
pub const INJECT: &str = "sidecar.weft.io/inject";
pub const NAMESPACE_LABEL: &str = "weft.io/injection";
pub const EXCLUDE_INBOUND: &str = "traffic.weft.io/excludeInboundPorts";
pub const EXCLUDE_OUTBOUND: &str = "traffic.weft.io/excludeOutboundPorts";
pub const PROXY_IMAGE: &str = "sidecar.weft.io/proxyImage";

/// The values a template is rendered with, besides the pod's own.
#[derive(Clone, Debug)]
pub struct Values {
    pub proxy_image: String,
    pub control_plane: String,
    pub cluster_id: String,
    pub network: String,
    pub trust_domain: String,
    pub proxy_cpu_request: String,
    pub proxy_memory_request: String,
    pub proxy_cpu_limit: String,
    pub proxy_memory_limit: String,
}

impl Values {
    pub fn new(cluster_id: &str, namespace: &str) -> Self {
        Values {
            proxy_image: "ghcr.io/weft-mesh/weft-proxy:0.1.0".into(),
            control_plane: format!("weft-control.{namespace}.svc:15012"),
            cluster_id: cluster_id.into(),
            network: "default".into(),
            trust_domain: "cluster.local".into(),
            proxy_cpu_request: "10m".into(),
            proxy_memory_request: "16Mi".into(),
            proxy_cpu_limit: "1".into(),
            proxy_memory_limit: "128Mi".into(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    #[error("not a pod: {0}")]
    NotAPod(String),
    #[error("the injection template does not render: {0}")]
    Template(String),
}

/// Why a pod is left alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Skip {
    AlreadyInjected,
    OptedOut,
    HostNetwork,
}

/// The decision for a pod the webhook was called for (the webhook
/// configuration's selectors already chose the namespace or the pod label).
pub fn decide(metadata: &Value, spec: &Value) -> Result<(), Skip> {
    let annotations = &metadata["annotations"];
    if annotations.get(STATUS_ANNOTATION).is_some() {
        return Err(Skip::AlreadyInjected);
    }
    if annotations[INJECT].as_str() == Some("false")
        || metadata["labels"][INJECT].as_str() == Some("false")
    {
        return Err(Skip::OptedOut);
    }
    if spec["hostNetwork"].as_bool() == Some(true) {
        return Err(Skip::HostNetwork);
    }
    Ok(())
}

/// The template with `values` filled in.
fn render(
    values: &Values,
    image: &str,
    exclude_inbound: &str,
    exclude_outbound: &str,
) -> Result<Value, InjectError> {
    let escape = |s: &str| {
        let quoted = serde_json::to_string(s).unwrap_or_default();
        quoted[1..quoted.len() - 1].to_string()
    };
    let mut text = TEMPLATE.to_string();
    for (key, value) in [
        ("proxy_image", image),
        ("control_plane", values.control_plane.as_str()),
        ("cluster_id", values.cluster_id.as_str()),
        ("network", values.network.as_str()),
        ("trust_domain", values.trust_domain.as_str()),
        ("proxy_cpu_request", values.proxy_cpu_request.as_str()),
        ("proxy_memory_request", values.proxy_memory_request.as_str()),
        ("proxy_cpu_limit", values.proxy_cpu_limit.as_str()),
        ("proxy_memory_limit", values.proxy_memory_limit.as_str()),
        ("exclude_inbound_ports", exclude_inbound),
        ("exclude_outbound_ports", exclude_outbound),
    ] {
        text = text.replace(&format!("{{{{{key}}}}}"), &escape(value));
    }
    if let Some(left) = text.find("{{") {
        let end = text[left..].find("}}").map_or(text.len(), |e| left + e + 2);
        return Err(InjectError::Template(format!(
            "unfilled placeholder {}",
            &text[left..end]
        )));
    }
    serde_saphyr::from_str::<Value>(&text).map_err(|e| InjectError::Template(e.to_string()))
}

/// Ports of the app's HTTP and TCP probes. Inbound capture leaves them
/// alone, so the kubelet's probes reach the app directly and keep working
/// (mesh traffic arrives on 15008, not through the capture).
fn probe_ports(spec: &Value) -> Vec<String> {
    let mut ports = Vec::new();
    for container in spec["containers"].as_array().into_iter().flatten() {
        for probe in ["livenessProbe", "readinessProbe", "startupProbe"] {
            for handler in ["httpGet", "tcpSocket", "grpc"] {
                let port = &container[probe][handler]["port"];
                let resolved = match port {
                    Value::Number(n) => Some(n.to_string()),
                    Value::String(name) => container["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|p| p["name"].as_str() == Some(name))
                        .map(|p| p["containerPort"].to_string()),
                    _ => None,
                };
                if let Some(port) = resolved.filter(|p| !ports.contains(p)) {
                    ports.push(port);
                }
            }
        }
    }
    ports.sort_by_key(|p| p.parse::<u32>().unwrap_or(u32::MAX));
    ports
}

/// What injection adds to one pod (or pod template): containers, volumes,
/// annotations.
pub struct Addition {
    pub init_containers: Vec<Value>,
    pub containers: Vec<Value>,
    pub volumes: Vec<Value>,
    pub annotations: Map<String, Value>,
}

pub fn addition(metadata: &Value, spec: &Value, values: &Values) -> Result<Addition, InjectError> {
    let annotations = &metadata["annotations"];
    let image = annotations[PROXY_IMAGE]
        .as_str()
        .unwrap_or(&values.proxy_image);
    let mut inbound: Vec<String> = annotations[EXCLUDE_INBOUND]
        .as_str()
        .unwrap_or("")
        .split(',')
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect();
    for port in probe_ports(spec) {
        if !inbound.contains(&port) {
            inbound.push(port);
        }
    }
    let outbound = annotations[EXCLUDE_OUTBOUND]
        .as_str()
        .unwrap_or("")
        .replace(' ', "");
    let rendered = render(values, image, &inbound.join(","), &outbound)?;
    let list = |key: &str| rendered[key].as_array().cloned().unwrap_or_default();
    let (init_containers, containers, volumes) =
        (list("initContainers"), list("containers"), list("volumes"));
    let names = |items: &Vec<Value>| {
        items
            .iter()
            .filter_map(|i| i["name"].as_str().map(String::from))
            .collect::<Vec<_>>()
    };
    let status = json!({
        "version": TEMPLATE_VERSION,
        "initContainers": names(&init_containers),
        "containers": names(&containers),
        "volumes": names(&volumes),
    });
    let mut annotations = Map::new();
    annotations.insert(STATUS_ANNOTATION.into(), json!(status.to_string()));
    Ok(Addition {
        init_containers,
        containers,
        volumes,
        annotations,
    })
}

/// Injects into a pod or pod template in place (for `kube-inject`).
/// Returns whether anything was added.
pub fn inject_in_place(
    metadata: &mut Value,
    spec: &mut Value,
    values: &Values,
) -> Result<bool, InjectError> {
    if decide(metadata, spec).is_err() {
        return Ok(false);
    }
    let add = addition(metadata, spec, values)?;
    let mut push = |key: &str, items: Vec<Value>, front: bool| {
        if !spec[key].is_array() {
            spec[key] = json!([]);
        }
        if let Some(list) = spec[key].as_array_mut() {
            if front {
                for (i, item) in items.into_iter().enumerate() {
                    list.insert(i, item);
                }
            } else {
                list.extend(items);
            }
        }
    };
    push("initContainers", add.init_containers, true);
    push("containers", add.containers, false);
    push("volumes", add.volumes, false);
    if !metadata.is_object() {
        *metadata = json!({});
    }
    if !metadata["annotations"].is_object() {
        metadata["annotations"] = json!({});
    }
    for (k, v) in add.annotations {
        metadata["annotations"][k] = v;
    }
    Ok(true)
}

fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// The RFC 6902 patch that injects into a Pod object, or `None` when the
/// pod is left alone.
pub fn pod_patch(pod: &Value, values: &Values) -> Result<Option<Vec<Value>>, InjectError> {
    if pod["kind"].as_str().is_some_and(|k| k != "Pod") {
        return Err(InjectError::NotAPod(
            pod["kind"].as_str().unwrap_or("").into(),
        ));
    }
    let (metadata, spec) = (&pod["metadata"], &pod["spec"]);
    if !spec.is_object() {
        return Err(InjectError::NotAPod("no spec".into()));
    }
    if decide(metadata, spec).is_err() {
        return Ok(None);
    }
    let add = addition(metadata, spec, values)?;
    let mut ops = Vec::new();
    match spec["initContainers"].as_array() {
        Some(_) => {
            for (i, c) in add.init_containers.into_iter().enumerate() {
                ops.push(
                    json!({"op": "add", "path": format!("/spec/initContainers/{i}"), "value": c}),
                );
            }
        }
        None => ops.push(
            json!({"op": "add", "path": "/spec/initContainers", "value": add.init_containers}),
        ),
    }
    for c in add.containers {
        ops.push(json!({"op": "add", "path": "/spec/containers/-", "value": c}));
    }
    match spec["volumes"].as_array() {
        Some(_) => ops.extend(
            add.volumes
                .into_iter()
                .map(|v| json!({"op": "add", "path": "/spec/volumes/-", "value": v})),
        ),
        None => ops.push(json!({"op": "add", "path": "/spec/volumes", "value": add.volumes})),
    }
    match metadata["annotations"].as_object() {
        Some(_) => ops.extend(add.annotations.into_iter().map(|(k, v)| {
            json!({"op": "add", "path": format!("/metadata/annotations/{}", escape_pointer(&k)), "value": v})
        })),
        None => ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": add.annotations})),
    }
    Ok(Some(ops))
}

/// Base64 of a JSON patch, as an AdmissionReview response carries it.
pub fn encode_patch(ops: &[Value]) -> String {
    base64::engine::general_purpose::STANDARD.encode(serde_json::to_vec(ops).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "echo", "namespace": "demo", "labels": {"app": "echo"}},
            "spec": {
                "containers": [{
                    "name": "echo", "image": "echo",
                    "ports": [{"name": "http", "containerPort": 8080}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}},
                    "livenessProbe": {"tcpSocket": {"port": 9090}},
                }],
            },
        })
    }

    fn values() -> Values {
        Values::new("c1", "weft-system")
    }

    fn patched(pod: &Value) -> Value {
        let ops = pod_patch(pod, &values()).unwrap().expect("injects");
        let mut out = pod.clone();
        for op in ops {
            let path = op["path"].as_str().unwrap();
            // A tiny applier for "add", enough to check the patch's result.
            let tokens: Vec<String> = path[1..]
                .split('/')
                .map(|t| t.replace("~1", "/").replace("~0", "~"))
                .collect();
            let mut node = &mut out;
            for t in &tokens[..tokens.len() - 1] {
                node = if node.is_array() {
                    &mut node[t.parse::<usize>().unwrap()]
                } else {
                    &mut node[t.as_str()]
                };
            }
            let last = tokens.last().unwrap();
            match node {
                Value::Array(list) if last == "-" => list.push(op["value"].clone()),
                Value::Array(list) => list.insert(last.parse().unwrap(), op["value"].clone()),
                other => other[last.as_str()] = op["value"].clone(),
            }
        }
        out
    }

    #[test]
    fn template_renders_with_every_placeholder_filled() {
        let add = addition(&pod()["metadata"], &pod()["spec"], &values()).unwrap();
        assert_eq!(add.init_containers[0]["name"], "weft-init");
        let proxy = &add.containers[0];
        assert_eq!(proxy["name"], "weft-proxy");
        assert_eq!(proxy["securityContext"]["runAsUser"], 1337);
        assert_eq!(
            proxy["env"][0]["value"],
            "weft-control.weft-system.svc:15012"
        );
        let ports: Vec<i64> = proxy["ports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["containerPort"].as_i64().unwrap())
            .collect();
        assert_eq!(ports, [15001, 15006, 15008, 15021, 15090]);
        assert_eq!(
            add.volumes[0]["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            "weft-ca"
        );
        // Probe ports (named and numbered) stay out of inbound capture.
        let args: Vec<&str> = add.init_containers[0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let at = args
            .iter()
            .position(|a| *a == "--exclude-inbound-ports")
            .unwrap();
        assert_eq!(args[at + 1], "8080,9090");
    }

    #[test]
    fn opt_in_opt_out_and_idempotence() {
        let injected = patched(&pod());
        assert_eq!(injected["spec"]["containers"].as_array().unwrap().len(), 2);
        assert_eq!(injected["spec"]["initContainers"][0]["name"], "weft-init");
        assert!(injected["metadata"]["annotations"][STATUS_ANNOTATION].is_string());
        // Already injected: nothing more.
        assert_eq!(pod_patch(&injected, &values()).unwrap(), None);

        let mut out = pod();
        out["metadata"]["annotations"] = json!({INJECT: "false"});
        assert_eq!(pod_patch(&out, &values()).unwrap(), None);
        let mut out = pod();
        out["metadata"]["labels"][INJECT] = json!("false");
        assert_eq!(pod_patch(&out, &values()).unwrap(), None);
        let mut host = pod();
        host["spec"]["hostNetwork"] = json!(true);
        assert_eq!(pod_patch(&host, &values()).unwrap(), None);
    }

    #[test]
    fn existing_init_containers_volumes_and_annotations_are_kept() {
        let mut p = pod();
        p["spec"]["initContainers"] = json!([{"name": "setup", "image": "busybox"}]);
        p["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
        p["metadata"]["annotations"] = json!({"keep": "me", PROXY_IMAGE: "registry.local/proxy:dev", EXCLUDE_OUTBOUND: "5432, 6379"});
        let injected = patched(&p);
        let inits: Vec<&str> = injected["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(inits, ["weft-init", "setup"]);
        assert_eq!(injected["spec"]["volumes"].as_array().unwrap().len(), 3);
        assert_eq!(injected["metadata"]["annotations"]["keep"], "me");
        assert_eq!(
            injected["spec"]["containers"][1]["image"],
            "registry.local/proxy:dev"
        );
        let args = injected["spec"]["initContainers"][0]["args"].to_string();
        assert!(args.contains("5432,6379"), "{args}");
    }

    #[test]
    fn values_cannot_break_out_of_the_template() {
        let mut v = values();
        v.cluster_id = "c1\"\n  evil: true".into();
        let add = addition(&pod()["metadata"], &pod()["spec"], &v).unwrap();
        assert_eq!(add.containers[0]["env"][1]["value"], "c1\"\n  evil: true");
        assert!(add.containers[0].get("evil").is_none());
    }

    #[test]
    fn not_a_pod_is_an_error() {
        let err = pod_patch(&json!({"kind": "Service", "spec": {}}), &values()).unwrap_err();
        assert!(matches!(err, InjectError::NotAPod(_)));
        assert!(pod_patch(&json!({"kind": "Pod"}), &values()).is_err());
    }
}
