//! Defaults the real server fills in on create: a namespace's default
//! ServiceAccount, a pod's fields, a Service's ClusterIP and ports, a
//! token Secret's data, a CRD's status.

use serde_json::{Value, json};

use super::*;

pub(super) fn create_default_service_account(
    state: &mut State,
    namespace: &str,
) -> Result<(), ApiError> {
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

pub(super) fn default_pod(pod: &mut Value) {
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

pub(super) fn default_service(
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

pub(super) fn default_secret(
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
pub(super) fn merge_string_data(secret: &mut Value) -> Result<(), ApiError> {
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

pub(super) fn crd_status(crd: &Value) -> Value {
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
