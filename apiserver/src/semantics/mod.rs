//! What the API server does to an object on create, update, patch and delete,
//! beyond storing it: names and uids, resourceVersion preconditions,
//! generation, the status subresource, finalizers, ClusterIP allocation,
//! namespace lifetime, ServiceAccount token Secrets, and CRDs. Writes and
//! deletes live here; validation, defaults, tokens and ClusterIP
//! allocation each have a module.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value, json};

mod defaults;
mod ip;
mod tokens;
mod validation;

use defaults::*;
pub use ip::IpAllocator;
pub use tokens::{token_request, token_review};
use validation::*;

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
