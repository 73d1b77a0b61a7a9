//! What the API server does to an object on create, update, patch and delete,
//! beyond storing it: names and uids, resourceVersion preconditions,
//! generation, the status subresource, finalizers, ClusterIP allocation,
//! namespace lifetime, ServiceAccount token Secrets, and CRDs.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value, json};

use super::auth::{API_AUDIENCE, Authenticator};
use super::resources::{Registry, ResourceInfo, ResourceKey};
use super::status::ApiError;
use super::store::{Object, Store};

/// Everything mutable about the server, behind one lock.
pub struct State {
    pub store: Store,
    pub registry: Registry,
    pub cluster_ips: IpAllocator,
}

/// Read-only context a write may need.
pub struct Ctx<'a> {
    pub auth: &'a Authenticator,
    pub ca_pem: &'a str,
}

fn key(group: &str, resource: &str) -> ResourceKey {
    ResourceKey {
        group: group.into(),
        resource: resource.into(),
    }
}

pub fn namespaces() -> ResourceKey {
    key("", "namespaces")
}

pub fn service_accounts() -> ResourceKey {
    key("", "serviceaccounts")
}

fn services() -> ResourceKey {
    key("", "services")
}

fn crds() -> ResourceKey {
    key("apiextensions.k8s.io", "customresourcedefinitions")
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .replace_nanosecond(0)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "1970-01-01T00:00:00Z".into())
}

fn new_uid() -> String {
    let b: [u8; 16] = rand::random();
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-4{:01x}{:02x}-{:01x}{:01x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[0],
        b[1],
        b[2],
        b[3],
        b[4],
        b[5],
        b[6] & 0x0f,
        b[7],
        8 | (b[8] & 0x03),
        b[8] >> 4,
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    )
}

fn random_suffix() -> String {
    // The alphabet the real server uses: no vowels, no look-alikes.
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    (0..5)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn meta(object: &Value) -> &Map<String, Value> {
    static EMPTY: std::sync::LazyLock<Map<String, Value>> = std::sync::LazyLock::new(Map::new);
    object
        .get("metadata")
        .and_then(Value::as_object)
        .unwrap_or(&EMPTY)
}

fn meta_mut(object: &mut Value) -> &mut Map<String, Value> {
    if !object["metadata"].is_object() {
        object["metadata"] = json!({});
    }
    // Just made sure it is an object.
    object["metadata"]
        .as_object_mut()
        .expect("metadata is an object")
}

pub fn name_of(object: &Value) -> &str {
    meta(object)
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// Type checks the real server gets from decoding into Go structs: a
/// mistyped metadata field is a 400, not a silently odd object.
fn check_shape(object: &Value) -> Result<(), ApiError> {
    if !object.is_object() {
        return Err(ApiError::bad_request(
            "the request body must be a JSON object",
        ));
    }
    let metadata = object.get("metadata");
    if metadata.is_some_and(|m| !m.is_object() && !m.is_null()) {
        return Err(ApiError::bad_request("metadata must be an object"));
    }
    let meta = meta(object);
    for field in [
        "name",
        "namespace",
        "generateName",
        "resourceVersion",
        "uid",
    ] {
        if meta
            .get(field)
            .is_some_and(|v| !v.is_string() && !v.is_null())
        {
            return Err(ApiError::bad_request(format!(
                "metadata.{field} must be a string"
            )));
        }
    }
    for field in ["labels", "annotations"] {
        match meta.get(field) {
            None | Some(Value::Null) => {}
            Some(Value::Object(map)) if map.values().all(Value::is_string) => {}
            Some(_) => {
                return Err(ApiError::bad_request(format!(
                    "metadata.{field} must be a map of string to string"
                )));
            }
        }
    }
    if meta.get("finalizers").is_some_and(|f| {
        !f.is_null() && !f.as_array().is_some_and(|a| a.iter().all(Value::is_string))
    }) {
        return Err(ApiError::bad_request(
            "metadata.finalizers must be a list of strings",
        ));
    }
    Ok(())
}

fn is_dns_label(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(|label| is_dns_label(label, 63))
}

fn check_name(info: &ResourceInfo, name: &str) -> Result<(), ApiError> {
    let (ok, rule) = match (info.key.group.as_str(), info.key.resource.as_str()) {
        ("", "namespaces") => (is_dns_label(name, 63), "a lowercase RFC 1123 label"),
        ("", "services") => (
            is_dns_label(name, 63) && name.starts_with(|c: char| c.is_ascii_lowercase()),
            "a DNS-1035 label (start with a letter)",
        ),
        ("rbac.authorization.k8s.io", _) => (
            !name.is_empty() && !name.contains(['/', '%']) && name != "." && name != "..",
            "a valid path segment",
        ),
        _ => (is_dns_subdomain(name), "a lowercase RFC 1123 subdomain"),
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(
            &info.kind,
            name,
            "metadata.name",
            format!("{name:?}: must be {rule}"),
        ))
    }
}

/// Sets kind and apiVersion, refusing a body that names another type.
fn check_type(info: &ResourceInfo, version: &str, object: &mut Value) -> Result<(), ApiError> {
    let api_version = info.api_version(version);
    if let Some(given) = object.get("apiVersion").and_then(Value::as_str)
        && given != api_version
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({given}) does not match the expected API version ({api_version})"
        )));
    }
    if let Some(given) = object.get("kind").and_then(Value::as_str)
        && given != info.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({given}) does not match the expected kind ({})",
            info.kind
        )));
    }
    object["apiVersion"] = json!(api_version);
    object["kind"] = json!(info.kind);
    Ok(())
}

fn check_namespace(
    state: &State,
    info: &ResourceInfo,
    namespace: &str,
    object: &mut Value,
) -> Result<(), ApiError> {
    let meta = meta_mut(object);
    if !info.namespaced {
        meta.remove("namespace");
        return Ok(());
    }
    match meta.get("namespace").and_then(Value::as_str) {
        Some(given) if !given.is_empty() && given != namespace => {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        _ => {
            meta.insert("namespace".into(), json!(namespace));
        }
    }
    if state.store.get(&namespaces(), "", namespace).is_none() {
        return Err(ApiError::not_found("", "namespaces", namespace));
    }
    Ok(())
}

pub fn create(
    state: &mut State,
    ctx: &Ctx,
    info: &ResourceInfo,
    version: &str,
    namespace: &str,
    mut object: Value,
    dry_run: bool,
) -> Result<Arc<Object>, ApiError> {
    check_shape(&object)?;
    check_type(info, version, &mut object)?;
    check_namespace(state, info, namespace, &mut object)?;
    let meta = meta_mut(&mut object);
    let mut name = meta
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if name.is_empty() {
        let prefix = meta
            .get("generateName")
            .and_then(Value::as_str)
            .unwrap_or("");
        if prefix.is_empty() {
            return Err(ApiError::invalid(
                &info.kind,
                "",
                "metadata.name",
                "name or generateName is required",
            ));
        }
        // Retry on the (unlikely) collision, as the real server's caller would.
        for _ in 0..8 {
            name = format!("{prefix}{}", random_suffix());
            if state.store.get(&info.key, namespace, &name).is_none() {
                break;
            }
        }
        meta.insert("name".into(), json!(name));
    }
    let ns = if info.namespaced { namespace } else { "" };
    check_name(info, &name)?;
    if state.store.get(&info.key, ns, &name).is_some() {
        return Err(ApiError::already_exists(
            &info.key.group,
            &info.key.resource,
            &name,
        ));
    }
    let meta = meta_mut(&mut object);
    meta.insert("uid".into(), json!(new_uid()));
    meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
    meta.insert("generation".into(), json!(1));
    for field in [
        "resourceVersion",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "managedFields",
        "selfLink",
    ] {
        meta.remove(field);
    }
    if info.has_status {
        object.as_object_mut().map(|o| o.remove("status"));
    }

    let mut allocated = None;
    match (info.key.group.as_str(), info.key.resource.as_str()) {
        ("", "services") => allocated = default_service(state, &name, &mut object)?,
        ("", "pods") => default_pod(&mut object),
        ("", "namespaces") => {
            object["spec"] = json!({"finalizers": ["kubernetes"]});
            object["status"] = json!({"phase": "Active"});
        }
        ("", "secrets") => default_secret(state, ctx, namespace, &name, &mut object)?,
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            // Checked on a copy first so that a bad CRD changes nothing.
            let mut probe = state.registry.clone();
            probe
                .register_crd(&object)
                .map_err(|why| ApiError::invalid(&info.kind, &name, "spec", why))?;
            object["status"] = crd_status(&object);
        }
        _ => {}
    }
    if dry_run {
        if let Some(ip) = allocated {
            state.cluster_ips.release(ip);
        }
        return Ok(Arc::new(Object::from_value(&object)));
    }
    let stored = match state.store.put(&info.key, ns, &name, object) {
        Ok(stored) => stored,
        Err(err) => {
            if let Some(ip) = allocated {
                state.cluster_ips.release(ip);
            }
            return Err(err);
        }
    };
    match (info.key.group.as_str(), info.key.resource.as_str()) {
        ("", "namespaces") => create_default_service_account(state, &name)?,
        ("apiextensions.k8s.io", "customresourcedefinitions") => {
            // Validated above, so registering cannot fail here.
            let _ = state.registry.register_crd(&stored.value());
        }
        _ => {}
    }
    Ok(stored)
}

fn create_default_service_account(state: &mut State, namespace: &str) -> Result<(), ApiError> {
    let sa = json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": "default",
            "namespace": namespace,
            "uid": new_uid(),
            "creationTimestamp": now_rfc3339(),
        },
    });
    state
        .store
        .put(&service_accounts(), namespace, "default", sa)
        .map(|_| ())
}

fn default_pod(pod: &mut Value) {
    let spec = &mut pod["spec"];
    if !spec.is_object() {
        *spec = json!({});
    }
    for (field, value) in [
        ("restartPolicy", json!("Always")),
        ("dnsPolicy", json!("ClusterFirst")),
        ("serviceAccountName", json!("default")),
        ("terminationGracePeriodSeconds", json!(30)),
        ("schedulerName", json!("default-scheduler")),
    ] {
        if spec.get(field).is_none() {
            spec[field] = value;
        }
    }
    if spec.get("serviceAccount").is_none() {
        spec["serviceAccount"] = spec["serviceAccountName"].clone();
    }
    pod["status"] = json!({"phase": "Pending", "qosClass": "BestEffort"});
}

fn default_service(
    state: &mut State,
    name: &str,
    svc: &mut Value,
) -> Result<Option<Ipv4Addr>, ApiError> {
    let spec = &mut svc["spec"];
    if !spec.is_object() {
        *spec = json!({});
    }
    let service_type = spec["type"].as_str().unwrap_or("ClusterIP").to_string();
    spec["type"] = json!(service_type);
    if let Some(ports) = spec["ports"].as_array_mut() {
        for port in ports {
            if port.get("protocol").is_none() {
                port["protocol"] = json!("TCP");
            }
            if port.get("targetPort").is_none() {
                port["targetPort"] = port["port"].clone();
            }
        }
    }
    for (field, value) in [
        ("sessionAffinity", json!("None")),
        ("ipFamilies", json!(["IPv4"])),
        ("ipFamilyPolicy", json!("SingleStack")),
        ("internalTrafficPolicy", json!("Cluster")),
    ] {
        if spec.get(field).is_none() {
            spec[field] = value;
        }
    }
    svc["status"] = json!({"loadBalancer": {}});
    if service_type == "ExternalName" {
        return Ok(None);
    }
    let requested = svc["spec"]["clusterIP"].as_str().unwrap_or("").to_string();
    let ip = match requested.as_str() {
        "None" => {
            svc["spec"]["clusterIPs"] = json!(["None"]);
            return Ok(None);
        }
        "" => state
            .cluster_ips
            .allocate()
            .ok_or_else(|| ApiError::internal("failed to allocate a serviceIP: range is full"))?,
        explicit => {
            let ip: Ipv4Addr = explicit.parse().map_err(|_| {
                ApiError::invalid(
                    "Service",
                    name,
                    "spec.clusterIP",
                    format!("{explicit:?}: must be a valid IP address"),
                )
            })?;
            state
                .cluster_ips
                .reserve(ip)
                .map_err(|why| ApiError::invalid("Service", name, "spec.clusterIP", why))?;
            ip
        }
    };
    svc["spec"]["clusterIP"] = json!(ip.to_string());
    svc["spec"]["clusterIPs"] = json!([ip.to_string()]);
    Ok(Some(ip))
}

fn default_secret(
    state: &State,
    ctx: &Ctx,
    namespace: &str,
    name: &str,
    secret: &mut Value,
) -> Result<(), ApiError> {
    if secret.get("type").is_none() {
        secret["type"] = json!("Opaque");
    }
    merge_string_data(secret)?;
    if secret["type"] == "kubernetes.io/service-account-token" {
        let sa_name = meta(secret)
            .get("annotations")
            .and_then(|a| a.get("kubernetes.io/service-account.name"))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let sa = state
            .store
            .get(&service_accounts(), namespace, &sa_name)
            .ok_or_else(|| {
                ApiError::invalid(
                    "Secret",
                    name,
                    "metadata.annotations[kubernetes.io/service-account.name]",
                    format!("{sa_name:?}: service account not found"),
                )
            })?;
        let uid = sa.uid.to_string();
        // The token controller would fill these in; here it happens at once.
        let (token, _) = ctx
            .auth
            .issue(namespace, &sa_name, &uid, vec![API_AUDIENCE.into()], None);
        secret["data"]["token"] = json!(STANDARD.encode(token));
        secret["data"]["ca.crt"] = json!(STANDARD.encode(ctx.ca_pem));
        secret["data"]["namespace"] = json!(STANDARD.encode(namespace));
        secret["metadata"]["annotations"]["kubernetes.io/service-account.uid"] = json!(uid);
    }
    Ok(())
}

/// `stringData` is write-only convenience: merged into `data` (base64) on
/// create and update alike, and never stored. Then `data` must be base64.
fn merge_string_data(secret: &mut Value) -> Result<(), ApiError> {
    if let Some(Value::Object(plain)) = secret.as_object_mut().and_then(|o| o.remove("stringData"))
    {
        for (k, v) in plain {
            let text = v
                .as_str()
                .ok_or_else(|| ApiError::bad_request("stringData values must be strings"))?;
            secret["data"][&k] = json!(STANDARD.encode(text));
        }
    }
    if let Some(data) = secret.get("data").and_then(Value::as_object) {
        for (k, v) in data {
            let valid = v.as_str().is_some_and(|s| STANDARD.decode(s).is_ok());
            if !valid {
                return Err(ApiError::bad_request(format!(
                    "data[{k}]: illegal base64 data"
                )));
            }
        }
    }
    Ok(())
}

fn crd_status(crd: &Value) -> Value {
    let storage: Vec<Value> = crd["spec"]["versions"]
        .as_array()
        .map(|vs| {
            vs.iter()
                .filter(|v| v["storage"].as_bool().unwrap_or(false))
                .map(|v| v["name"].clone())
                .collect()
        })
        .unwrap_or_default();
    let now = now_rfc3339();
    json!({
        "conditions": [
            {"type": "NamesAccepted", "status": "True", "reason": "NoConflicts", "lastTransitionTime": now},
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "lastTransitionTime": now},
        ],
        "acceptedNames": crd["spec"]["names"],
        "storedVersions": storage,
    })
}

/// Whether an update carries a resourceVersion precondition that fails.
fn stale(new: &Value, current: &Value) -> bool {
    match meta(new).get("resourceVersion").and_then(Value::as_str) {
        None | Some("") => false,
        Some(rv) => Some(rv) != meta(current).get("resourceVersion").and_then(Value::as_str),
    }
}

/// Everything but metadata and status: a change here bumps generation.
fn spec_part(object: &Value) -> Value {
    let mut rest = object.clone();
    if let Some(o) = rest.as_object_mut() {
        o.remove("metadata");
        o.remove("status");
    }
    rest
}

#[allow(clippy::too_many_arguments)]
pub fn update(
    state: &mut State,
    info: &ResourceInfo,
    version: &str,
    namespace: &str,
    name: &str,
    mut object: Value,
    status_only: bool,
    dry_run: bool,
) -> Result<Arc<Object>, ApiError> {
    check_shape(&object)?;
    check_type(info, version, &mut object)?;
    let ns = if info.namespaced { namespace } else { "" };
    let stored = state
        .store
        .get(&info.key, ns, name)
        .ok_or_else(|| ApiError::not_found(&info.key.group, &info.key.resource, name))?;
    let current = stored.value();
    let given_name = name_of(&object);
    if !given_name.is_empty() && given_name != name {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({given_name}) does not match the name on the URL ({name})"
        )));
    }
    if info.namespaced {
        let given_ns = meta(&object)
            .get("namespace")
            .and_then(Value::as_str)
            .unwrap_or("");
        if !given_ns.is_empty() && given_ns != namespace {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
    }
    if stale(&object, &current) {
        return Err(ApiError::conflict(
            &info.key.group,
            &info.key.resource,
            name,
        ));
    }

    let mut next = if status_only {
        // Only status changes through /status.
        let mut next = current.clone();
        next["status"] = object.get("status").cloned().unwrap_or(Value::Null);
        next
    } else {
        if info.has_status {
            match current.get("status") {
                Some(status) => object["status"] = status.clone(),
                None => {
                    object.as_object_mut().map(|o| o.remove("status"));
                }
            }
        }
        object
    };
    // Identity and bookkeeping are the server's, whatever the client sent.
    let current_meta = meta(&current).clone();
    let next_meta = meta_mut(&mut next);
    next_meta.insert("name".into(), json!(name));
    if info.namespaced {
        next_meta.insert("namespace".into(), json!(namespace));
    } else {
        next_meta.remove("namespace");
    }
    for field in [
        "uid",
        "creationTimestamp",
        "generation",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "resourceVersion",
    ] {
        match current_meta.get(field) {
            Some(v) => next_meta.insert(field.into(), v.clone()),
            None => next_meta.remove(field),
        };
    }
    next_meta.remove("managedFields");
    next_meta.remove("selfLink");

    if info.key == services() {
        keep_cluster_ip(&current, &mut next, name)?;
    }
    if info.key == key("", "secrets") {
        merge_string_data(&mut next)?;
    }
    if info.key == crds() {
        let mut probe = state.registry.clone();
        probe
            .register_crd(&next)
            .map_err(|why| ApiError::invalid(&info.kind, name, "spec", why))?;
    }
    if spec_part(&next) != spec_part(&current) {
        let generation = current_meta
            .get("generation")
            .and_then(Value::as_i64)
            .unwrap_or(0);
        meta_mut(&mut next).insert("generation".into(), json!(generation + 1));
    }
    if next == current {
        // A no-op write does not bump the version or wake watchers.
        return Ok(stored);
    }
    let deleting = meta(&next).contains_key("deletionTimestamp");
    let finalized = meta(&next)
        .get("finalizers")
        .and_then(Value::as_array)
        .is_none_or(Vec::is_empty);
    if dry_run {
        return Ok(Arc::new(Object::from_value(&next)));
    }
    if deleting && finalized {
        return remove(state, info, ns, name).map(|gone| gone.unwrap_or(stored));
    }
    if info.key == crds() {
        let _ = state.registry.register_crd(&next);
    }
    state.store.put(&info.key, ns, name, next)
}

fn keep_cluster_ip(current: &Value, next: &mut Value, name: &str) -> Result<(), ApiError> {
    let old = current["spec"]["clusterIP"].clone();
    match next["spec"]["clusterIP"].as_str() {
        None | Some("") => {
            if !next["spec"].is_object() {
                next["spec"] = json!({});
            }
            next["spec"]["clusterIP"] = old;
            next["spec"]["clusterIPs"] = current["spec"]["clusterIPs"].clone();
        }
        Some(ip) if Some(ip) != old.as_str() => {
            return Err(ApiError::invalid(
                "Service",
                name,
                "spec.clusterIP",
                format!("{ip:?}: field is immutable"),
            ));
        }
        Some(_) => {}
    }
    Ok(())
}

/// Deletes, or with finalizers marks for deletion. Returns the object as it
/// was at its last version.
/// Deletes an object. A pod bound to a node is deleted gracefully, as
/// Kubernetes does: it gets a deletion timestamp and grace period (from
/// `grace`, else its `terminationGracePeriodSeconds`), its endpoints turn
/// terminating, and the node's kubelet (the lab's runner) stops its
/// containers and deletes it for good with a grace of 0.
pub fn delete(
    state: &mut State,
    info: &ResourceInfo,
    namespace: &str,
    name: &str,
    grace: Option<i64>,
    dry_run: bool,
) -> Result<Arc<Object>, ApiError> {
    let ns = if info.namespaced { namespace } else { "" };
    let stored = state
        .store
        .get(&info.key, ns, name)
        .ok_or_else(|| ApiError::not_found(&info.key.group, &info.key.resource, name))?;
    if dry_run {
        return Ok(stored);
    }
    let current = stored.value();
    let has_finalizers = meta(&current)
        .get("finalizers")
        .and_then(Value::as_array)
        .is_some_and(|f| !f.is_empty());
    let is_pod = info.key.group.is_empty() && info.key.resource == "pods";
    let grace = grace.unwrap_or_else(|| {
        current["spec"]["terminationGracePeriodSeconds"]
            .as_i64()
            .unwrap_or(30)
    });
    if is_pod && current["spec"]["nodeName"].is_string() && grace > 0 {
        if meta(&current).contains_key("deletionTimestamp") {
            return Ok(stored);
        }
        let mut marked = current;
        let meta = meta_mut(&mut marked);
        meta.insert("deletionTimestamp".into(), json!(now_rfc3339()));
        meta.insert("deletionGracePeriodSeconds".into(), json!(grace));
        return state.store.put(&info.key, ns, name, marked);
    }
    // Namespaces carry the "kubernetes" finalizer in spec, which only this
    // server acts on; everything else waits for its controllers.
    if has_finalizers {
        if meta(&current).contains_key("deletionTimestamp") {
            return Ok(stored);
        }
        let mut marked = current;
        let meta = meta_mut(&mut marked);
        meta.insert("deletionTimestamp".into(), json!(now_rfc3339()));
        meta.insert("deletionGracePeriodSeconds".into(), json!(0));
        return state.store.put(&info.key, ns, name, marked);
    }
    remove(state, info, ns, name).map(|gone| gone.unwrap_or(stored))
}

fn remove(
    state: &mut State,
    info: &ResourceInfo,
    ns: &str,
    name: &str,
) -> Result<Option<Arc<Object>>, ApiError> {
    if info.key == namespaces() {
        // Namespace contents go first, each with its own DELETED event.
        for (key, object_name) in state.store.namespaces_in_use(name) {
            if let Some(gone) = state.store.remove(&key, name, &object_name)? {
                release_resources(state, &key, &gone);
            }
        }
    }
    if info.key == crds()
        && let Some(crd) = state.store.get(&info.key, ns, name).map(|c| c.value())
    {
        let custom = ResourceKey {
            group: crd["spec"]["group"].as_str().unwrap_or("").into(),
            resource: crd["spec"]["names"]["plural"].as_str().unwrap_or("").into(),
        };
        for (object_ns, object_name) in state.store.keys(&custom) {
            state.store.remove(&custom, &object_ns, &object_name)?;
        }
        state.registry.unregister(&custom);
    }
    let gone = state.store.remove(&info.key, ns, name)?;
    if let Some(gone) = &gone {
        release_resources(state, &info.key, gone);
    }
    Ok(gone)
}

fn release_resources(state: &mut State, key: &ResourceKey, gone: &Object) {
    if *key == services()
        && let Some(ip) = gone.value()["spec"]["clusterIP"]
            .as_str()
            .and_then(|s| s.parse().ok())
    {
        state.cluster_ips.release(ip);
    }
}

/// Issues a TokenRequest's token for an existing service account.
pub fn token_request(
    state: &State,
    ctx: &Ctx,
    namespace: &str,
    name: &str,
    request: &Value,
) -> Result<Value, ApiError> {
    let sa = state
        .store
        .get(&service_accounts(), namespace, name)
        .ok_or_else(|| ApiError::not_found("", "serviceaccounts", name))?;
    let uid = &*sa.uid;
    let spec = &request["spec"];
    let audiences: Vec<String> = match spec["audiences"].as_array() {
        Some(list) if !list.is_empty() => list
            .iter()
            .filter_map(|a| a.as_str().map(String::from))
            .collect(),
        _ => vec![API_AUDIENCE.into()],
    };
    let seconds = spec["expirationSeconds"].as_u64().unwrap_or(3600);
    if seconds < 600 {
        return Err(ApiError::invalid(
            "TokenRequest",
            name,
            "spec.expirationSeconds",
            format!("{seconds}: may not specify a duration less than 10 minutes"),
        ));
    }
    let seconds = seconds.min(48 * 3600);
    let (token, expiry) = ctx.auth.issue(
        namespace,
        name,
        uid,
        audiences.clone(),
        Some(Duration::from_secs(seconds)),
    );
    let expiry = expiry
        .map(|t| {
            time::OffsetDateTime::from(t)
                .replace_nanosecond(0)
                .ok()
                .and_then(|t| {
                    t.format(&time::format_description::well_known::Rfc3339)
                        .ok()
                })
                .unwrap_or_default()
        })
        .unwrap_or_default();
    Ok(json!({
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": null},
        "spec": {"audiences": audiences, "expirationSeconds": seconds, "boundObjectRef": spec["boundObjectRef"]},
        "status": {"token": token, "expirationTimestamp": expiry},
    }))
}

/// Answers a TokenReview: who the token belongs to, if anyone.
pub fn token_review(state: &State, ctx: &Ctx, review: &Value) -> Value {
    let spec = &review["spec"];
    let token = spec["token"].as_str().unwrap_or("");
    let audiences: Vec<String> = spec["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let status = match ctx.auth.verify(token, &audiences) {
        Err(why) => json!({"authenticated": false, "error": why}),
        Ok(claims) => {
            let ns = &claims.kubernetes.namespace;
            let sa = &claims.kubernetes.serviceaccount;
            let live_uid = state
                .store
                .get(&service_accounts(), ns, &sa.name)
                .map(|o| o.uid.to_string());
            if live_uid.as_deref() != Some(sa.uid.as_str()) {
                json!({"authenticated": false, "error": format!("service account {ns}/{} has been deleted", sa.name)})
            } else {
                let wanted: Vec<&String> = if audiences.is_empty() {
                    claims.aud.iter().filter(|a| *a == API_AUDIENCE).collect()
                } else {
                    claims
                        .aud
                        .iter()
                        .filter(|a| audiences.contains(a))
                        .collect()
                };
                json!({
                    "authenticated": true,
                    "user": {
                        "username": claims.sub,
                        "uid": sa.uid,
                        "groups": ["system:serviceaccounts", format!("system:serviceaccounts:{ns}"), "system:authenticated"],
                    },
                    "audiences": wanted,
                })
            }
        }
    };
    json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": spec,
        "status": status,
    })
}

/// Hands out Service ClusterIPs from one IPv4 range, like the real
/// allocator: the first address is the network, the second is reserved for
/// the `kubernetes` service.
pub struct IpAllocator {
    base: u32,
    size: u32,
    next: u32,
    used: HashSet<u32>,
}

impl IpAllocator {
    pub fn new(cidr: &str) -> Result<Self, String> {
        let (addr, prefix) = cidr
            .split_once('/')
            .ok_or_else(|| format!("{cidr:?}: expected a.b.c.d/prefix"))?;
        let addr: Ipv4Addr = addr.parse().map_err(|_| format!("{cidr:?}: bad address"))?;
        let prefix: u32 = prefix
            .parse()
            .map_err(|_| format!("{cidr:?}: bad prefix"))?;
        if !(8..=28).contains(&prefix) {
            return Err(format!("{cidr:?}: prefix must be between 8 and 28"));
        }
        let size = 1u32 << (32 - prefix);
        Ok(IpAllocator {
            base: u32::from(addr) & !(size - 1),
            size,
            next: 2,
            used: HashSet::new(),
        })
    }

    pub fn allocate(&mut self) -> Option<Ipv4Addr> {
        // Skip the network address, .1 (kubernetes) and the broadcast address.
        let usable = self.size - 3;
        for _ in 0..usable {
            let offset = self.next;
            self.next = if self.next + 1 >= self.size - 1 {
                2
            } else {
                self.next + 1
            };
            if self.used.insert(offset) {
                return Some(Ipv4Addr::from(self.base + offset));
            }
        }
        None
    }

    pub fn reserve(&mut self, ip: Ipv4Addr) -> Result<(), String> {
        let raw = u32::from(ip);
        if raw < self.base || raw >= self.base + self.size {
            return Err(format!(
                "{ip}: provided IP is not in the valid range ({}/{})",
                Ipv4Addr::from(self.base),
                32 - self.size.trailing_zeros()
            ));
        }
        if !self.used.insert(raw - self.base) {
            return Err(format!("{ip}: provided IP is already allocated"));
        }
        Ok(())
    }

    pub fn release(&mut self, ip: Ipv4Addr) {
        self.used.remove(&u32::from(ip).wrapping_sub(self.base));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocator_hands_out_each_address_once() {
        let mut a = IpAllocator::new("10.96.0.0/28").unwrap();
        let mut seen = HashSet::new();
        while let Some(ip) = a.allocate() {
            assert!(seen.insert(ip), "{ip} twice");
        }
        assert_eq!(seen.len(), 13);
        assert!(!seen.contains(&"10.96.0.1".parse().unwrap()));
        a.release("10.96.0.5".parse().unwrap());
        assert_eq!(a.allocate(), Some("10.96.0.5".parse().unwrap()));
        assert!(a.reserve("10.97.0.1".parse().unwrap()).is_err());
        let mut b = IpAllocator::new("10.96.0.0/16").unwrap();
        b.reserve("10.96.3.3".parse().unwrap()).unwrap();
        assert!(
            b.reserve("10.96.3.3".parse().unwrap())
                .unwrap_err()
                .contains("already allocated")
        );
        assert!(IpAllocator::new("10.96.0.0").is_err());
    }

    #[test]
    fn names_follow_kubernetes_rules() {
        let r = Registry::default();
        let svc = r.lookup("", "v1", "services").unwrap();
        assert!(check_name(&svc, "echo").is_ok());
        assert_eq!(check_name(&svc, "1echo").unwrap_err().code, 422);
        assert_eq!(check_name(&svc, "Echo").unwrap_err().code, 422);
        let cm = r.lookup("", "v1", "configmaps").unwrap();
        assert!(check_name(&cm, "kube-root-ca.crt").is_ok());
        assert!(check_name(&cm, "a..b").is_err());
        let role = r
            .lookup("rbac.authorization.k8s.io", "v1", "clusterroles")
            .unwrap();
        assert!(check_name(&role, "system:weft-reader").is_ok());
        assert!(uuid_like(&new_uid()));
    }

    fn uuid_like(s: &str) -> bool {
        s.len() == 36 && s.chars().filter(|c| *c == '-').count() == 4
    }
}
