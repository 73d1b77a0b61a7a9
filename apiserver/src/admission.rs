//! Mutating admission: on CREATE, the lab calls the webhooks of every
//! MutatingWebhookConfiguration whose rules, namespace selector and object
//! selector match, in order, each seeing the previous one's changes, and
//! applies their JSON patches, as kube-apiserver does. So a Pod created in
//! the lab is injected by the real webhook.
//!
//! A webhook named by `service` is reached at the address the lab was told
//! for that service (`ApiServerConfig::webhook_services`), since the lab has
//! no service network. Its certificate is checked against the `caBundle`
//! for the service's DNS name, as the real server checks it.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use super::auth::User;
use super::patch;
use super::resources::{ResourceInfo, ResourceKey};
use super::semantics::State;
use super::status::ApiError;

/// One webhook to call for a request.
#[derive(Clone, Debug)]
pub struct Call {
    name: String,
    address: Option<SocketAddr>,
    host: String,
    path: String,
    ca_pem: Option<String>,
    timeout: Duration,
    fail_closed: bool,
}

fn list_contains(list: &Value, wanted: &str) -> bool {
    list.as_array().is_some_and(|l| {
        l.iter()
            .any(|v| v.as_str() == Some("*") || v.as_str() == Some(wanted))
    })
}

/// A structured label selector (`matchLabels`, `matchExpressions`).
pub fn selector_matches(selector: &Value, labels: &Value) -> bool {
    let get = |k: &str| labels.get(k).and_then(Value::as_str);
    let labels_ok = selector["matchLabels"]
        .as_object()
        .is_none_or(|m| m.iter().all(|(k, v)| get(k) == v.as_str()));
    let expressions_ok = selector["matchExpressions"].as_array().is_none_or(|exprs| {
        exprs.iter().all(|e| {
            let key = e["key"].as_str().unwrap_or("");
            let values: Vec<&str> = e["values"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            match e["operator"].as_str() {
                Some("In") => get(key).is_some_and(|v| values.contains(&v)),
                Some("NotIn") => get(key).is_none_or(|v| !values.contains(&v)),
                Some("Exists") => get(key).is_some(),
                Some("DoesNotExist") => get(key).is_none(),
                _ => false,
            }
        })
    });
    labels_ok && expressions_ok
}

/// The webhooks that want a CREATE of `object`, in configuration order.
pub fn matching(
    state: &State,
    info: &ResourceInfo,
    version: &str,
    namespace: &str,
    object: &Value,
    services: &BTreeMap<String, SocketAddr>,
) -> Vec<Call> {
    let configurations = ResourceKey {
        group: "admissionregistration.k8s.io".into(),
        resource: "mutatingwebhookconfigurations".into(),
    };
    let namespace_labels = if info.key.group.is_empty() && info.key.resource == "namespaces" {
        object["metadata"]["labels"].clone()
    } else {
        state
            .store
            .get(
                &ResourceKey {
                    group: String::new(),
                    resource: "namespaces".into(),
                },
                "",
                namespace,
            )
            .map(|ns| ns.value()["metadata"]["labels"].clone())
            .unwrap_or(Value::Null)
    };
    let object_labels = &object["metadata"]["labels"];
    let mut calls = Vec::new();
    for (_, configuration) in state.store.list(&configurations, None, None) {
        let configuration = configuration.value();
        for webhook in configuration["webhooks"].as_array().into_iter().flatten() {
            let rule_matches = webhook["rules"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|rule| {
                    list_contains(&rule["operations"], "CREATE")
                        && list_contains(&rule["apiGroups"], &info.key.group)
                        && list_contains(&rule["apiVersions"], version)
                        && list_contains(&rule["resources"], &info.key.resource)
                });
            let namespaced_ok = !info.namespaced
                || selector_matches(&webhook["namespaceSelector"], &namespace_labels);
            if !rule_matches
                || !namespaced_ok
                || !selector_matches(&webhook["objectSelector"], object_labels)
            {
                continue;
            }
            let client = &webhook["clientConfig"];
            let (address, host, path) = if let Some(url) = client["url"].as_str() {
                let rest = url.strip_prefix("https://").unwrap_or(url);
                let (authority, path) = rest
                    .split_once('/')
                    .map_or((rest, "/".to_string()), |(a, p)| (a, format!("/{p}")));
                let host = authority
                    .rsplit_once(':')
                    .map_or(authority, |(h, _)| h)
                    .to_string();
                (authority.parse().ok(), host, path)
            } else {
                let service = &client["service"];
                let ns = service["namespace"].as_str().unwrap_or("");
                let name = service["name"].as_str().unwrap_or("");
                (
                    services.get(&format!("{ns}/{name}")).copied(),
                    format!("{name}.{ns}.svc"),
                    service["path"].as_str().unwrap_or("/").to_string(),
                )
            };
            calls.push(Call {
                name: webhook["name"].as_str().unwrap_or("").to_string(),
                address,
                host,
                path,
                ca_pem: client["caBundle"]
                    .as_str()
                    .and_then(|b| STANDARD.decode(b).ok())
                    .and_then(|b| String::from_utf8(b).ok()),
                timeout: Duration::from_secs(
                    webhook["timeoutSeconds"]
                        .as_u64()
                        .unwrap_or(10)
                        .clamp(1, 30),
                ),
                fail_closed: webhook["failurePolicy"].as_str() != Some("Ignore"),
            });
        }
    }
    calls
}

/// Calls the webhooks in turn and returns the object as they leave it.
pub async fn mutate(
    calls: Vec<Call>,
    info: &ResourceInfo,
    version: &str,
    namespace: &str,
    mut object: Value,
    user: &User,
    dry_run: bool,
) -> Result<Value, ApiError> {
    for call in calls {
        let uid: [u8; 16] = rand::random();
        let uid: String = uid.iter().map(|b| format!("{b:02x}")).collect();
        let gvk = json!({"group": info.key.group, "version": version, "kind": info.kind});
        let gvr =
            json!({"group": info.key.group, "version": version, "resource": info.key.resource});
        let review = json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": uid,
                "kind": gvk, "resource": gvr, "requestKind": gvk, "requestResource": gvr,
                "name": object["metadata"]["name"].as_str().unwrap_or(""),
                "namespace": namespace,
                "operation": "CREATE",
                "userInfo": {"username": user.username()},
                "object": object,
                "oldObject": null,
                "dryRun": dry_run,
                "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
            },
        });
        let outcome = tokio::time::timeout(call.timeout, post(&call, &review))
            .await
            .unwrap_or_else(|_| Err(format!("timed out after {:?}", call.timeout)))
            .and_then(|response| {
                if response["response"]["uid"].as_str() == Some(uid.as_str()) {
                    Ok(response)
                } else {
                    Err("the response does not answer this request's uid".to_string())
                }
            });
        let response = match outcome {
            Ok(response) => response,
            Err(why) if call.fail_closed => return Err(failed(&call, why)),
            Err(why) => {
                tracing::warn!(webhook = %call.name, %why, "webhook failed; ignored by its failurePolicy");
                continue;
            }
        };
        let response = &response["response"];
        if response["allowed"].as_bool() != Some(true) {
            let message = response["status"]["message"].as_str().unwrap_or("denied");
            let mut err = ApiError::bad_request(format!(
                "admission webhook \"{}\" denied the request: {message}",
                call.name
            ));
            if let Some(code) = response["status"]["code"]
                .as_u64()
                .and_then(|c| u16::try_from(c).ok())
            {
                err.code = code;
            }
            return Err(err);
        }
        if let Some(encoded) = response["patch"].as_str() {
            let ops = STANDARD
                .decode(encoded)
                .ok()
                .and_then(|raw| serde_json::from_slice::<Value>(&raw).ok())
                .ok_or_else(|| failed(&call, "the patch is not base64 JSON".into()))?;
            patch::json_patch(&mut object, &ops)
                .map_err(|e| failed(&call, format!("its patch does not apply: {}", e.message)))?;
        }
    }
    Ok(object)
}

fn failed(call: &Call, why: String) -> ApiError {
    ApiError::internal(format!(
        "Internal error occurred: failed calling webhook \"{}\": {why}",
        call.name
    ))
}

async fn post(call: &Call, review: &Value) -> Result<Value, String> {
    let address = call
        .address
        .ok_or("no address is known for the webhook's service")?;
    let ca = call
        .ca_pem
        .as_deref()
        .ok_or("the webhook has no caBundle")?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in weft_certs::pem::certificates("caBundle", ca).map_err(|e| e.to_string())? {
        roots.add(cert).map_err(|e| e.to_string())?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(weft_certs::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| e.to_string())?;
    let name =
        rustls_pki_types::ServerName::try_from(call.host.clone()).map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = http::Request::post(&call.path)
        .header("host", &call.host)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(review).unwrap_or_default(),
        )))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("HTTP {status}: {}", String::from_utf8_lossy(&body)));
    }
    serde_json::from_slice(&body).map_err(|e| format!("the response is not JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structured_selectors() {
        let labels = json!({"weft.io/injection": "enabled", "team": "a"});
        assert!(selector_matches(&Value::Null, &labels));
        assert!(selector_matches(&json!({}), &Value::Null));
        assert!(selector_matches(
            &json!({"matchLabels": {"weft.io/injection": "enabled"}}),
            &labels
        ));
        assert!(!selector_matches(
            &json!({"matchLabels": {"team": "b"}}),
            &labels
        ));
        let expr = |op: &str, values: Value| json!({"matchExpressions": [{"key": "team", "operator": op, "values": values}]});
        assert!(selector_matches(&expr("In", json!(["a", "b"])), &labels));
        assert!(!selector_matches(&expr("NotIn", json!(["a"])), &labels));
        assert!(selector_matches(&expr("NotIn", json!(["a"])), &json!({})));
        assert!(selector_matches(&expr("Exists", Value::Null), &labels));
        assert!(!selector_matches(
            &expr("DoesNotExist", Value::Null),
            &labels
        ));
        assert!(!selector_matches(&expr("Bogus", Value::Null), &labels));
    }
}
