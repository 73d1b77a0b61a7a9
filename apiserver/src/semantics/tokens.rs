//! ServiceAccount tokens: TokenRequest issues them, TokenReview checks
//! them.

use serde_json::{Value, json};

use super::*;

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
