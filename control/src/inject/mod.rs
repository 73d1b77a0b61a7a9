//! Sidecar injection: whether a pod gets a sidecar, and what it gets, from
//! one versioned template (`sidecar-template.yaml`) that the webhook and
//! `weftctl kube-inject` share.

use base64::Engine;
use serde_json::{Map, Value, json};

pub mod webhook;

pub const TEMPLATE: &str = include_str!("sidecar-template.yaml");
pub const TEMPLATE_VERSION: &str = "2";

/// The annotation recording an injection; its presence makes injection
/// idempotent.
pub const STATUS_ANNOTATION: &str = "sidecar.weft.io/status";
pub const INJECT: &str = "sidecar.weft.io/inject";
pub const NAMESPACE_LABEL: &str = "weft.io/injection";
pub const EXCLUDE_INBOUND: &str = "traffic.weft.io/excludeInboundPorts";
pub const EXCLUDE_OUTBOUND: &str = "traffic.weft.io/excludeOutboundPorts";
pub const PROXY_IMAGE: &str = "sidecar.weft.io/proxyImage";
/// PERMISSIVE (default) or STRICT: whether the sidecar lets plaintext
/// through to the app. Per pod until mesh-wide peer authentication exists.
pub const INBOUND_MODE: &str = "sidecar.weft.io/inboundMode";
/// "true" or "false": this pod's sidecar writes JSON access logs, whatever
/// the mesh-wide setting (`--access-log`) says.
pub const ACCESS_LOG: &str = "sidecar.weft.io/accessLog";

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
    /// Sidecars write JSON access logs unless their pod says otherwise.
    pub access_log: bool,
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
            access_log: false,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    #[error("not a pod: {0}")]
    NotAPod(String),
    #[error("the injection template does not render: {0}")]
    Template(String),
    #[error("a pod annotation is not valid: {0}")]
    Annotation(String),
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
fn render(values: &Values, image: &str, pod: &[(&str, &str)]) -> Result<Value, InjectError> {
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
    ]
    .into_iter()
    .chain(pod.iter().copied())
    {
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

/// The port where the sidecar answers the kubelet's probes for the app.
pub const APP_HEALTH_PORT: u16 = 15020;
/// The probes a container may have, and the path the sidecar serves each at.
const PROBES: [(&str, &str); 3] = [
    ("livenessProbe", "livez"),
    ("readinessProbe", "readyz"),
    ("startupProbe", "startupz"),
];

/// One app probe moved to the sidecar.
#[derive(Clone, Debug, PartialEq)]
pub struct MovedProbe {
    pub container: usize,
    /// `livenessProbe`, `readinessProbe` or `startupProbe`.
    pub field: &'static str,
    /// The probe the kubelet now runs: an HTTP GET on the sidecar.
    pub probe: Value,
}

/// Moves the app's HTTP, TCP and gRPC probes to the sidecar, as Istio does.
/// A probe on the app's serving port would otherwise need that port left out
/// of inbound capture, and then plaintext from anywhere reaches the app
/// there, past STRICT and with any identity header it likes. The kubelet
/// instead asks the sidecar (`/app-health/<container>/<livez|readyz|startupz>`
/// on 15020), which runs the original check against the app. Returns the
/// rewritten probes and, for the sidecar, each path's original check (ports
/// resolved to numbers). Exec probes, and HTTP or TCP probes aimed at
/// another host, are left as they are.
pub fn move_probes(spec: &Value) -> (Vec<MovedProbe>, Map<String, Value>) {
    let mut moved = Vec::new();
    let mut checks = Map::new();
    for (index, container) in spec["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let name = container["name"].as_str().unwrap_or_default();
        for (field, kind) in PROBES {
            let original = &container[field];
            let Some((handler, check)) = ["httpGet", "tcpSocket", "grpc"]
                .into_iter()
                .find_map(|h| original.get(h).map(|c| (h, c)))
            else {
                continue;
            };
            if check["host"].as_str().is_some_and(|h| !h.is_empty()) {
                continue;
            }
            let Some(port) = resolve_port(container, &check["port"]) else {
                continue;
            };
            let path = format!("/app-health/{name}/{kind}");
            let mut check = check.clone();
            check["port"] = json!(port);
            checks.insert(
                path.clone(),
                json!({handler: check, "timeoutSeconds": original["timeoutSeconds"].as_u64().unwrap_or(1)}),
            );
            let mut probe = original.clone();
            if let Some(fields) = probe.as_object_mut() {
                for h in ["httpGet", "tcpSocket", "grpc"] {
                    fields.remove(h);
                }
                fields.insert(
                    "httpGet".into(),
                    json!({"path": path, "port": APP_HEALTH_PORT, "scheme": "HTTP"}),
                );
            }
            moved.push(MovedProbe {
                container: index,
                field,
                probe,
            });
        }
    }
    (moved, checks)
}

/// A probe's port as a number: numbered, or named after one of the
/// container's ports.
fn resolve_port(container: &Value, port: &Value) -> Option<u64> {
    match port {
        Value::Number(n) => n.as_u64(),
        Value::String(name) => match name.parse::<u64>() {
            Ok(number) => Some(number),
            Err(_) => container["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"].as_str() == Some(name))
                .and_then(|p| p["containerPort"].as_u64()),
        },
        _ => None,
    }
    .filter(|p| (1..=65535).contains(p))
}

/// What injection adds to one pod (or pod template): containers, volumes,
/// annotations.
pub struct Addition {
    pub init_containers: Vec<Value>,
    pub containers: Vec<Value>,
    pub volumes: Vec<Value>,
    pub annotations: Map<String, Value>,
    /// The app's probes, now asked of the sidecar.
    pub probes: Vec<MovedProbe>,
}

pub fn addition(metadata: &Value, spec: &Value, values: &Values) -> Result<Addition, InjectError> {
    let annotations = &metadata["annotations"];
    let image = annotations[PROXY_IMAGE]
        .as_str()
        .unwrap_or(&values.proxy_image);
    let inbound: Vec<&str> = annotations[EXCLUDE_INBOUND]
        .as_str()
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    let outbound = annotations[EXCLUDE_OUTBOUND]
        .as_str()
        .unwrap_or("")
        .replace(' ', "");
    let inbound_mode = match annotations[INBOUND_MODE].as_str() {
        None => "PERMISSIVE".to_string(),
        Some(mode) => match mode.to_ascii_uppercase().as_str() {
            m @ ("PERMISSIVE" | "STRICT") => m.to_string(),
            _ => {
                return Err(InjectError::Annotation(format!(
                    "{INBOUND_MODE}: {mode:?} is neither PERMISSIVE nor STRICT"
                )));
            }
        },
    };
    let access_log = match annotations[ACCESS_LOG].as_str() {
        None => values.access_log,
        Some("true") => true,
        Some("false") => false,
        Some(other) => {
            return Err(InjectError::Annotation(format!(
                "{ACCESS_LOG}: {other:?} is neither \"true\" nor \"false\""
            )));
        }
    };
    let (probes, checks) = move_probes(spec);
    let rendered = render(
        values,
        image,
        &[
            ("exclude_inbound_ports", &inbound.join(",")),
            ("exclude_outbound_ports", &outbound),
            ("inbound_mode", &inbound_mode),
            ("access_log", if access_log { "json" } else { "off" }),
            ("app_probes", &Value::Object(checks).to_string()),
        ],
    )?;
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
        probes,
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
    for moved in &add.probes {
        spec["containers"][moved.container][moved.field] = moved.probe.clone();
    }
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
    for moved in &add.probes {
        ops.push(json!({"op": "replace", "path": format!("/spec/containers/{}/{}", moved.container, moved.field), "value": moved.probe}));
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
        assert_eq!(ports, [15001, 15006, 15008, 15020, 15021, 15090]);
        assert_eq!(
            add.volumes[0]["projected"]["sources"][0]["serviceAccountToken"]["audience"],
            "weft-ca"
        );
        // Probe ports stay captured: nothing is left out of inbound capture.
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
        assert_eq!(args[at + 1], "");
    }

    fn env<'a>(container: &'a Value, name: &str) -> &'a str {
        container["env"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("no {name}"))
    }

    #[test]
    fn probes_move_to_the_sidecar_and_the_serving_port_stays_captured() {
        let mut p = pod();
        p["spec"]["containers"][0]["startupProbe"] =
            json!({"grpc": {"port": 9090, "service": "ready"}, "failureThreshold": 30});
        p["spec"]["containers"][0]["livenessProbe"] =
            json!({"tcpSocket": {"port": 9090}, "timeoutSeconds": 3, "periodSeconds": 7});
        p["spec"]["containers"].as_array_mut().unwrap().push(json!({
            "name": "sidekick", "image": "x",
            "readinessProbe": {"exec": {"command": ["true"]}},
            "livenessProbe": {"httpGet": {"host": "example.invalid", "path": "/", "port": 80}},
            "startupProbe": {"tcpSocket": {"host": "db.example.invalid", "port": 5432}},
        }));
        let injected = patched(&p);
        let app = &injected["spec"]["containers"][0];
        for (field, kind) in [
            ("readinessProbe", "readyz"),
            ("livenessProbe", "livez"),
            ("startupProbe", "startupz"),
        ] {
            assert_eq!(
                app[field]["httpGet"],
                json!({"path": format!("/app-health/echo/{kind}"), "port": 15020, "scheme": "HTTP"}),
                "{field}"
            );
            assert!(app[field].get("tcpSocket").is_none() && app[field].get("grpc").is_none());
        }
        // Timing stays the app's.
        assert_eq!(app["livenessProbe"]["periodSeconds"], 7);
        assert_eq!(app["startupProbe"]["failureThreshold"], 30);
        // Exec probes and probes of other hosts are the kubelet's own.
        let sidekick = &injected["spec"]["containers"][1];
        assert_eq!(
            sidekick["readinessProbe"],
            json!({"exec": {"command": ["true"]}})
        );
        assert_eq!(
            sidekick["livenessProbe"]["httpGet"]["host"],
            "example.invalid"
        );
        let proxy = &injected["spec"]["containers"][2];
        let checks: Value = serde_json::from_str(env(proxy, "WEFT_APP_PROBES")).unwrap();
        assert_eq!(
            checks,
            json!({
                "/app-health/echo/readyz": {"httpGet": {"path": "/ready", "port": 8080}, "timeoutSeconds": 1},
                "/app-health/echo/livez": {"tcpSocket": {"port": 9090}, "timeoutSeconds": 3},
                "/app-health/echo/startupz": {"grpc": {"port": 9090, "service": "ready"}, "timeoutSeconds": 1},
            })
        );
        assert_eq!(env(proxy, "WEFT_INBOUND_MODE"), "PERMISSIVE");

        // kube-inject gives the same pod.
        let mut metadata = p["metadata"].clone();
        let mut spec = p["spec"].clone();
        assert!(inject_in_place(&mut metadata, &mut spec, &values()).unwrap());
        assert_eq!(spec, injected["spec"]);
    }

    #[test]
    fn access_logs_follow_the_mesh_setting_unless_the_pod_says_otherwise() {
        let log = |values: &Values, annotation: Option<&str>| {
            let mut p = pod();
            if let Some(on) = annotation {
                p["metadata"]["annotations"] = json!({ACCESS_LOG: on});
            }
            addition(&p["metadata"], &p["spec"], values).map(|add| {
                let proxy = add
                    .containers
                    .iter()
                    .find(|c| c["name"] == "weft-proxy")
                    .unwrap();
                env(proxy, "WEFT_ACCESS_LOG").to_string()
            })
        };
        let off = values();
        let on = Values {
            access_log: true,
            ..values()
        };
        assert_eq!(log(&off, None).unwrap(), "off");
        assert_eq!(log(&on, None).unwrap(), "json");
        assert_eq!(log(&off, Some("true")).unwrap(), "json");
        assert_eq!(log(&on, Some("false")).unwrap(), "off");
        let err = log(&off, Some("yes")).unwrap_err();
        assert!(
            matches!(err, InjectError::Annotation(ref m) if m.contains("yes")),
            "{err}"
        );
    }

    #[test]
    fn inbound_mode_comes_from_the_annotation_and_a_typo_is_refused() {
        let mut p = pod();
        p["metadata"]["annotations"] = json!({INBOUND_MODE: "strict"});
        let injected = patched(&p);
        assert_eq!(
            env(&injected["spec"]["containers"][1], "WEFT_INBOUND_MODE"),
            "STRICT"
        );
        p["metadata"]["annotations"] = json!({INBOUND_MODE: "STRIKT"});
        let err = pod_patch(&p, &values()).unwrap_err();
        assert!(
            matches!(err, InjectError::Annotation(ref m) if m.contains("STRIKT")),
            "{err}"
        );
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
