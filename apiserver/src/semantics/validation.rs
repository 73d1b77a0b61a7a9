//! Validation: an object's shape, names, kind and namespace, checked
//! before anything is stored.

use serde_json::{Value, json};

use super::*;

/// Type checks the real server gets from decoding into Go structs: a
/// mistyped metadata field is a 400, not a silently odd object.
pub(super) fn check_shape(object: &Value) -> Result<(), ApiError> {
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

pub(super) fn is_dns_label(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

pub(super) fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(|label| is_dns_label(label, 63))
}

pub(super) fn check_name(info: &ResourceInfo, name: &str) -> Result<(), ApiError> {
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
pub(super) fn check_type(
    info: &ResourceInfo,
    version: &str,
    object: &mut Value,
) -> Result<(), ApiError> {
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

pub(super) fn check_namespace(
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
