//! The four PATCH flavours: JSON merge patch (RFC 7386), JSON patch
//! (RFC 6902), strategic merge patch, and server-side apply.
//!
//! Strategic merge differs from merge patch in lists: Kubernetes merges lists
//! of named things (containers, ports, env…) element by element, keyed by a
//! field, where merge patch would replace the whole list. The keys come from
//! the `patchMergeKey` tags of the Kubernetes types; the lab knows the ones
//! weft's manifests and kubectl touch. Apply is approximated as a strategic
//! merge of the applied configuration into the live object: fields are added
//! and changed, never removed by omission (no managedFields bookkeeping).

use serde_json::{Map, Value};

use super::status::ApiError;

pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target) = target else {
        return;
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
        }
    }
}

pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| ApiError::bad_request("a JSON patch must be an array of operations"))?;
    for (i, op) in ops.iter().enumerate() {
        apply_op(target, op)
            .map_err(|why| ApiError::invalid("JSONPatch", "", &format!("[{i}]"), why))?;
    }
    Ok(())
}

fn apply_op(target: &mut Value, op: &Value) -> Result<(), String> {
    let name = op["op"].as_str().ok_or("missing \"op\"")?;
    let path = pointer(op["path"].as_str().ok_or("missing \"path\"")?)?;
    match name {
        "add" => add(
            target,
            &path,
            op.get("value").ok_or("missing \"value\"")?.clone(),
        ),
        "remove" => remove(target, &path).map(|_| ()),
        "replace" => {
            remove(target, &path)?;
            add(
                target,
                &path,
                op.get("value").ok_or("missing \"value\"")?.clone(),
            )
        }
        "move" => {
            let from = pointer(op["from"].as_str().ok_or("missing \"from\"")?)?;
            let value = remove(target, &from)?;
            add(target, &path, value)
        }
        "copy" => {
            let from = pointer(op["from"].as_str().ok_or("missing \"from\"")?)?;
            let value = get(target, &from).ok_or("\"from\" does not exist")?.clone();
            add(target, &path, value)
        }
        "test" => {
            let expected = op.get("value").ok_or("missing \"value\"")?;
            match get(target, &path) {
                Some(actual) if actual == expected => Ok(()),
                _ => Err(format!("test failed at {}", op["path"])),
            }
        }
        other => Err(format!("unknown operation {other:?}")),
    }
}

fn pointer(path: &str) -> Result<Vec<String>, String> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let rest = path
        .strip_prefix('/')
        .ok_or_else(|| format!("path {path:?} must start with /"))?;
    Ok(rest
        .split('/')
        .map(|t| t.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn get<'a>(target: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(target, |node, token| match node {
        Value::Object(map) => map.get(token),
        Value::Array(list) => token.parse::<usize>().ok().and_then(|i| list.get(i)),
        _ => None,
    })
}

fn parent<'a>(target: &'a mut Value, path: &[String]) -> Result<&'a mut Value, String> {
    let mut node = target;
    for token in path {
        node = match node {
            Value::Object(map) => map.get_mut(token),
            Value::Array(list) => token.parse::<usize>().ok().and_then(|i| list.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| format!("path element {token:?} does not exist"))?;
    }
    Ok(node)
}

fn add(target: &mut Value, path: &[String], value: Value) -> Result<(), String> {
    let Some((last, init)) = path.split_last() else {
        *target = value;
        return Ok(());
    };
    match parent(target, init)? {
        Value::Object(map) => {
            map.insert(last.clone(), value);
            Ok(())
        }
        Value::Array(list) => {
            let index = if last == "-" {
                list.len()
            } else {
                last.parse::<usize>()
                    .map_err(|_| format!("bad array index {last:?}"))?
            };
            if index > list.len() {
                return Err(format!("array index {index} out of bounds"));
            }
            list.insert(index, value);
            Ok(())
        }
        _ => Err("cannot add inside a scalar".into()),
    }
}

fn remove(target: &mut Value, path: &[String]) -> Result<Value, String> {
    let (last, init) = path
        .split_last()
        .ok_or("cannot remove the whole document")?;
    match parent(target, init)? {
        Value::Object(map) => map
            .remove(last)
            .ok_or_else(|| format!("{last:?} does not exist")),
        Value::Array(list) => {
            let index = last
                .parse::<usize>()
                .map_err(|_| format!("bad array index {last:?}"))?;
            if index >= list.len() {
                return Err(format!("array index {index} out of bounds"));
            }
            Ok(list.remove(index))
        }
        _ => Err("cannot remove inside a scalar".into()),
    }
}

/// The merge key of a list field, from the Kubernetes types' `patchMergeKey`.
fn merge_key(field: &str, items: &[Value]) -> Option<&'static str> {
    Some(match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "env"
        | "volumes"
        | "imagePullSecrets"
        | "webhooks"
        | "resourceClaims" => "name",
        "volumeMounts" => "mountPath",
        "volumeDevices" => "devicePath",
        "ports" => {
            // Container ports are keyed by containerPort, service ports by port.
            if items.iter().any(|i| i.get("containerPort").is_some()) {
                "containerPort"
            } else {
                "port"
            }
        }
        "hostAliases" => "ip",
        "conditions" => "type",
        "ownerReferences" => "uid",
        "topologySpreadConstraints" => "topologyKey",
        "readinessGates" => "conditionType",
        _ => return None,
    })
}

pub fn strategic_merge(target: &mut Value, patch: &Value) -> Result<(), ApiError> {
    smp_object(target, patch).map_err(ApiError::bad_request)
}

fn smp_object(target: &mut Value, patch: &Value) -> Result<(), String> {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    if patch.get("$patch").and_then(Value::as_str) == Some("replace") {
        let mut replaced = patch.clone();
        replaced.remove("$patch");
        *target = Value::Object(replaced);
        return Ok(());
    }
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(map) = target else {
        return Ok(());
    };
    for (key, value) in patch {
        if key.starts_with("$setElementOrder/") || key == "$patch" || key == "$retainKeys" {
            continue;
        }
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(gone)) = (map.get_mut(field), value) {
                list.retain(|v| !gone.contains(v));
            }
            continue;
        }
        if value.is_null() || value.get("$patch").and_then(Value::as_str) == Some("delete") {
            map.remove(key);
            continue;
        }
        match value {
            Value::Array(items) => {
                let existing = map.entry(key.clone()).or_insert(Value::Array(Vec::new()));
                smp_list(key, existing, items)?;
            }
            Value::Object(_) => {
                smp_object(map.entry(key.clone()).or_insert(Value::Null), value)?;
            }
            _ => {
                map.insert(key.clone(), value.clone());
            }
        }
    }
    if let Some(Value::Array(keep)) = patch.get("$retainKeys") {
        map.retain(|k, _| keep.iter().any(|x| x.as_str() == Some(k)));
    }
    Ok(())
}

fn smp_list(field: &str, target: &mut Value, items: &[Value]) -> Result<(), String> {
    let replace = items
        .iter()
        .any(|i| i.get("$patch").and_then(Value::as_str) == Some("replace"));
    let key = merge_key(field, items);
    let (Some(key), false, Value::Array(existing)) = (key, replace, &mut *target) else {
        let cleaned: Vec<Value> = items
            .iter()
            .filter(|i| i.get("$patch").is_none())
            .cloned()
            .collect();
        *target = Value::Array(cleaned);
        return Ok(());
    };
    for item in items {
        let id = item
            .get(key)
            .ok_or_else(|| format!("{field}: every element needs its merge key {key:?}"))?;
        let position = existing.iter().position(|e| e.get(key) == Some(id));
        let delete = item.get("$patch").and_then(Value::as_str) == Some("delete");
        match (position, delete) {
            (Some(i), true) => {
                existing.remove(i);
            }
            (None, true) => {}
            (Some(i), false) => smp_object(&mut existing[i], item)?,
            (None, false) => {
                let mut fresh = Value::Null;
                smp_object(&mut fresh, item)?;
                existing.push(fresh);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn merge_patch_follows_rfc7386() {
        let mut doc = json!({"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]});
        merge_patch(&mut doc, &json!({"a": "z", "c": {"f": null}, "l": [3]}));
        assert_eq!(doc, json!({"a": "z", "c": {"d": "e"}, "l": [3]}));
    }

    #[test]
    fn json_patch_operations() {
        let mut doc = json!({"metadata": {"labels": {"a": "1"}}, "list": [1, 2]});
        json_patch(
            &mut doc,
            &json!([
                {"op": "add", "path": "/metadata/labels/weft.io~1injected", "value": "true"},
                {"op": "replace", "path": "/metadata/labels/a", "value": "2"},
                {"op": "add", "path": "/list/-", "value": 3},
                {"op": "remove", "path": "/list/0"},
                {"op": "test", "path": "/list/0", "value": 2},
                {"op": "copy", "from": "/list", "path": "/copy"},
                {"op": "move", "from": "/copy", "path": "/moved"},
            ]),
        )
        .unwrap();
        assert_eq!(
            doc,
            json!({"metadata": {"labels": {"a": "2", "weft.io/injected": "true"}}, "list": [2, 3], "moved": [2, 3]})
        );
        let err = json_patch(&mut doc, &json!([{"op": "remove", "path": "/nope"}])).unwrap_err();
        assert_eq!(err.code, 422);
        assert_eq!(
            json_patch(&mut doc, &json!({"op": "x"})).unwrap_err().code,
            400
        );
        assert!(
            json_patch(
                &mut doc,
                &json!([{"op": "test", "path": "/list/0", "value": 9}])
            )
            .is_err()
        );
    }

    #[test]
    fn strategic_merge_keys_lists_by_name_and_port() {
        let mut pod = json!({"spec": {
            "containers": [
                {"name": "app", "image": "app:1", "ports": [{"containerPort": 80}]},
                {"name": "side", "image": "side:1"},
            ],
            "volumes": [{"name": "a"}],
        }});
        let patch = json!({"spec": {
            "$setElementOrder/containers": [{"name": "app"}, {"name": "side"}],
            "containers": [
                {"name": "app", "image": "app:2"},
                {"name": "side", "$patch": "delete"},
                {"name": "new", "image": "new:1"},
            ],
            "volumes": [{"name": "b"}],
        }});
        strategic_merge(&mut pod, &patch).unwrap();
        assert_eq!(
            pod,
            json!({"spec": {
                "containers": [
                    {"name": "app", "image": "app:2", "ports": [{"containerPort": 80}]},
                    {"name": "new", "image": "new:1"},
                ],
                "volumes": [{"name": "a"}, {"name": "b"}],
            }})
        );

        let mut svc = json!({"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443}]}});
        strategic_merge(
            &mut svc,
            &json!({"spec": {"ports": [{"port": 80, "name": "web"}]}}),
        )
        .unwrap();
        assert_eq!(
            svc,
            json!({"spec": {"ports": [{"port": 80, "name": "web"}, {"port": 443}]}})
        );

        // Lists without a merge key are replaced, as in merge patch.
        let mut doc = json!({"args": ["a", "b"]});
        strategic_merge(&mut doc, &json!({"args": ["c"]})).unwrap();
        assert_eq!(doc, json!({"args": ["c"]}));

        let mut doc = json!({"spec": {"containers": [{"name": "a"}]}});
        assert!(
            strategic_merge(&mut doc, &json!({"spec": {"containers": [{"image": "x"}]}})).is_err()
        );
    }

    #[test]
    fn strategic_merge_directives() {
        let mut doc = json!({"m": {"a": 1, "b": 2}, "f": ["x", "y"], "keep": {"a": 1, "b": 2}});
        strategic_merge(
            &mut doc,
            &json!({
                "m": {"$patch": "replace", "c": 3},
                "$deleteFromPrimitiveList/f": ["x"],
                "keep": {"$retainKeys": ["a"], "a": 5},
            }),
        )
        .unwrap();
        assert_eq!(doc, json!({"m": {"c": 3}, "f": ["y"], "keep": {"a": 5}}));
    }
}
