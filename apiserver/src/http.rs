//! Routing of Kubernetes API paths: health and version, authentication,
//! discovery and OpenAPI documents, and resource paths, which `verbs`
//! serves.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Full};
use serde_json::{Value, json};

use super::Shared;
use super::decode::Query;
use super::present::{Body, error_response, json_response};
use super::semantics;
use super::status::ApiError;
use super::verbs::{self, Target};

pub async fn handle(
    shared: Arc<Shared>,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = match route(&shared, request).await {
        Ok(response) => response,
        Err(err) => {
            tracing::debug!(%method, %path, code = err.code, reason = err.reason, "request refused");
            error_response(&err)
        }
    };
    Ok(response)
}

async fn route(
    shared: &Arc<Shared>,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, ApiError> {
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let query = Query::parse(request.uri().query());
    let request_accept = request
        .headers()
        .get("accept")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();

    match path.as_str() {
        "/healthz" | "/livez" | "/readyz" => {
            return Ok(Response::new(
                Full::new(Bytes::from_static(b"ok")).boxed_unsync(),
            ));
        }
        "/version" => return Ok(json_response(200, &version())),
        _ => {}
    }

    let bearer = request
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let user = shared
        .auth
        .authenticate(bearer, |ns, name| {
            let state = shared.lock();
            state
                .store
                .get(&semantics::service_accounts(), ns, name)
                .map(|sa| sa.uid.to_string())
        })
        .ok_or_else(ApiError::unauthorized)?;

    let segments: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let discovery = |doc: Option<Value>| -> Result<Response<Body>, ApiError> {
        if method != Method::GET {
            return Err(ApiError::method_not_allowed(method.as_str(), &path));
        }
        doc.map(|d| json_response(200, &d))
            .ok_or_else(|| ApiError::path_not_found(&path))
    };
    match segments.as_slice() {
        ["api"] => discovery(Some(
            shared.lock().registry.core_versions(&shared.server_address),
        )),
        ["apis"] => discovery(Some(shared.lock().registry.group_list())),
        ["api", "v1"] => discovery(shared.lock().registry.resource_list("", "v1")),
        ["apis", group] => discovery(shared.lock().registry.group(group)),
        ["apis", group, version] => discovery(shared.lock().registry.resource_list(group, version)),
        ["openapi", "v2"] if method == Method::GET => Ok(openapi_v2(&request_accept)),
        ["openapi", "v3"] => discovery(Some(shared.lock().registry.openapi_root())),
        ["openapi", "v3", "api", version] => {
            discovery(shared.lock().registry.openapi_document("", version))
        }
        ["openapi", "v3", "apis", group, version] => {
            discovery(shared.lock().registry.openapi_document(group, version))
        }
        ["api", "v1", rest @ ..] => {
            let target = Target::parse(shared, "", "v1", rest, &path)?;
            verbs::serve(shared, &user, target, query, request).await
        }
        ["apis", group, version, rest @ ..] => {
            let target = Target::parse(shared, group, version, rest, &path)?;
            verbs::serve(shared, &user, target, query, request).await
        }
        _ => Err(ApiError::path_not_found(&path)),
    }
}

/// The OpenAPI v2 document, with no definitions. Older kubectl (Debian's is
/// 1.20) validates manifests client-side against it and skips kinds it has no
/// schema for, so an empty document lets `kubectl apply` through, while the
/// server keeps its own checks. It asks for the protobuf form, whose empty
/// message is zero bytes.
fn openapi_v2(accept: &str) -> Response<Body> {
    const PROTOBUF: &str = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf";
    if accept.contains(PROTOBUF) {
        let mut response = Response::new(Full::new(Bytes::new()).boxed_unsync());
        // As the real server answers: Go's MIME parser rejects the '@' in
        // the requested type, so the reply is labelled as plain bytes.
        response.headers_mut().insert(
            "content-type",
            http::HeaderValue::from_static("application/octet-stream"),
        );
        return response;
    }
    json_response(
        200,
        &json!({"swagger": "2.0", "info": {"title": "weft-lab", "version": "v1.33.0"}, "paths": {}, "definitions": {}}),
    )
}

fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": "v1.33.0-weft-lab",
        "gitCommit": "weft-lab",
        "gitTreeState": "clean",
        "buildDate": "2026-01-01T00:00:00Z",
        "goVersion": "none (weft-lab, Rust)",
        "compiler": "rustc",
        "platform": "linux/amd64",
    })
}
