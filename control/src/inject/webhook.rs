//! The mutating admission webhook (`POST /inject` on 15017): an
//! `admission.k8s.io/v1` AdmissionReview in, the same out with a JSONPatch.
//!
//! Bad input gets a clear answer, never a panic: a body that is not an
//! AdmissionReview is a 400; an object that cannot be injected is an HTTP
//! 500, so the API server applies the webhook's `failurePolicy`; anything
//! but a Pod CREATE is allowed unchanged.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::{Values, encode_patch, pod_patch};
use crate::serve::{BodyError, HttpLimits, read_body};

/// An answer the webhook gives: HTTP code and body.
#[derive(Debug, PartialEq)]
pub struct Answer {
    pub code: u16,
    pub body: Value,
}

fn error(code: u16, message: impl Into<String>) -> Answer {
    Answer {
        code,
        body: json!({"error": message.into()}),
    }
}

/// Handles one AdmissionReview body.
pub fn review(body: &[u8], values: &Values) -> Answer {
    let Ok(review) = serde_json::from_slice::<Value>(body) else {
        return error(400, "the request body is not JSON");
    };
    if review["kind"] != "AdmissionReview" || review["apiVersion"] != "admission.k8s.io/v1" {
        return error(400, "expected an admission.k8s.io/v1 AdmissionReview");
    }
    let request = &review["request"];
    let Some(uid) = request["uid"].as_str() else {
        return error(400, "the AdmissionReview has no request.uid");
    };
    let answer = |response: Value| {
        let mut response = response;
        response["uid"] = json!(uid);
        Answer {
            code: 200,
            body: json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}),
        }
    };
    let is_pod = request["kind"]["kind"] == "Pod"
        && request["kind"]["group"].as_str().unwrap_or("").is_empty();
    if !is_pod
        || request["operation"] != "CREATE"
        || request["subResource"]
            .as_str()
            .is_some_and(|s| !s.is_empty())
    {
        return answer(json!({"allowed": true}));
    }
    let pod = &request["object"];
    if !pod.is_object() {
        return answer(
            json!({"allowed": false, "status": {"code": 400, "message": "request.object is not a Pod"}}),
        );
    }
    match pod_patch(pod, values) {
        Ok(Some(ops)) => {
            answer(json!({"allowed": true, "patchType": "JSONPatch", "patch": encode_patch(&ops)}))
        }
        Ok(None) => answer(json!({"allowed": true})),
        Err(err) => error(500, format!("injection failed: {err}")),
    }
}

const MAX_BODY: usize = 4 * 1024 * 1024;
/// How long the API server may take to send an AdmissionReview's body.
const BODY_DEADLINE: Duration = Duration::from_secs(10);

async fn handle(
    values: Arc<Values>,
    request: Request<hyper::body::Incoming>,
) -> crate::serve::Answer {
    let answer = if request.uri().path() != "/inject" {
        error(404, "the injection webhook is served at /inject")
    } else if request.method() != hyper::Method::POST {
        error(405, "POST an AdmissionReview to /inject")
    } else {
        match read_body(request.into_body(), MAX_BODY, BODY_DEADLINE).await {
            Ok(body) => review(&body, &values),
            Err(BodyError::TooLarge) => error(413, "the AdmissionReview is too large"),
            Err(BodyError::TooSlow) => error(408, "the AdmissionReview arrived too slowly"),
        }
    };
    if answer.code != 200 {
        tracing::warn!(code = answer.code, body = %answer.body, "injection request refused");
    }
    Response::builder()
        .status(answer.code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(answer.body.to_string())))
        .unwrap_or_default()
}

/// Serves the webhook over TLS until the task is aborted.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, values: Arc<Values>) {
    crate::serve::serve(listener, Some(tls), HttpLimits::default(), move |request| {
        handle(values.clone(), request)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written from the fields of the AdmissionReview example in the
    /// Kubernetes documentation ("Dynamic Admission Control").
    const REVIEW: &str = r#"{
      "apiVersion": "admission.k8s.io/v1",
      "kind": "AdmissionReview",
      "request": {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "name": "echo",
        "namespace": "demo",
        "operation": "CREATE",
        "userInfo": {"username": "admin", "uid": "014fbff9a07c", "groups": ["system:authenticated"]},
        "object": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "echo", "namespace": "demo"},
                   "spec": {"containers": [{"name": "echo", "image": "echo"}]}},
        "oldObject": null,
        "dryRun": false,
        "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
      }
    }"#;

    fn values() -> Values {
        Values::new("c1", "weft-system")
    }

    #[test]
    fn a_pod_create_gets_a_json_patch() {
        let answer = review(REVIEW.as_bytes(), &values());
        assert_eq!(answer.code, 200);
        let response = &answer.body["response"];
        assert_eq!(answer.body["kind"], "AdmissionReview");
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        use base64::Engine;
        let patch = base64::engine::general_purpose::STANDARD
            .decode(response["patch"].as_str().unwrap())
            .unwrap();
        let ops: Vec<Value> = serde_json::from_slice(&patch).unwrap();
        assert!(ops.iter().any(|op| op["path"] == "/spec/containers/-" && op["value"]["name"] == "weft-proxy"));
    }

    #[test]
    fn other_objects_and_operations_pass_unchanged() {
        let mut service: Value = serde_json::from_str(REVIEW).unwrap();
        service["request"]["kind"] = json!({"group": "", "version": "v1", "kind": "Service"});
        let answer = review(service.to_string().as_bytes(), &values());
        assert_eq!(
            answer.body["response"],
            json!({"allowed": true, "uid": "705ab4f5-6393-11e8-b7cc-42010a800002"})
        );
        let mut update: Value = serde_json::from_str(REVIEW).unwrap();
        update["request"]["operation"] = json!("UPDATE");
        assert!(
            review(update.to_string().as_bytes(), &values()).body["response"]["patch"].is_null()
        );
    }

    #[test]
    fn bad_input_gets_clear_errors() {
        assert_eq!(review(b"{not json", &values()).code, 400);
        assert_eq!(review(br#"{"kind": "Pod"}"#, &values()).code, 400);
        let mut no_uid: Value = serde_json::from_str(REVIEW).unwrap();
        no_uid["request"].as_object_mut().unwrap().remove("uid");
        assert_eq!(review(no_uid.to_string().as_bytes(), &values()).code, 400);
        let mut no_object: Value = serde_json::from_str(REVIEW).unwrap();
        no_object["request"]["object"] = json!("garbage");
        let answer = review(no_object.to_string().as_bytes(), &values());
        assert_eq!(answer.body["response"]["allowed"], false);
        let mut not_a_pod: Value = serde_json::from_str(REVIEW).unwrap();
        not_a_pod["request"]["object"] = json!({"kind": "Pod", "spec": "nope"});
        assert_eq!(
            review(not_a_pod.to_string().as_bytes(), &values()).code,
            500
        );
    }
}
