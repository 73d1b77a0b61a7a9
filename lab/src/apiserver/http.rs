//! Routing of Kubernetes API paths to verbs, request decoding, and responses.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde_json::{Value, json};

use super::Shared;
use super::auth::User;
use super::patch;
use super::resources::ResourceInfo;
use super::selector::{FieldSelector, LabelSelector};
use super::semantics::{self, Ctx, State};
use super::status::ApiError;
use super::store::Object;
use super::watch::{self, WatchRequest};

pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// The real server's request body limit.
pub const MAX_BODY: usize = 3 * 1024 * 1024;

pub fn json_response(code: u16, value: &Value) -> Response<Body> {
    bytes_response(
        code,
        Bytes::from(serde_json::to_vec(value).unwrap_or_default()),
    )
}

fn bytes_response(code: u16, body: Bytes) -> Response<Body> {
    let mut response = Response::new(Full::new(body).boxed_unsync());
    *response.status_mut() =
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn error_response(err: &ApiError) -> Response<Body> {
    json_response(err.code, &err.to_status())
}

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

struct Query(HashMap<String, String>);

impl Query {
    fn parse(raw: Option<&str>) -> Self {
        let mut map = HashMap::new();
        for pair in raw.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            map.insert(decode(k), decode(v));
        }
        Query(map)
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }

    fn flag(&self, key: &str) -> bool {
        matches!(self.get(key), Some("true") | Some("1"))
    }

    fn dry_run(&self) -> bool {
        self.get("dryRun") == Some("All")
    }
}

/// Percent-decoding, with '+' as space as in form encoding.
fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
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
        ["api", "v1", rest @ ..] => resource(shared, &user, "", "v1", rest, query, request).await,
        ["apis", group, version, rest @ ..] => {
            let (group, version) = (group.to_string(), version.to_string());
            let rest: Vec<String> = rest.iter().map(|s| s.to_string()).collect();
            let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
            resource(shared, &user, &group, &version, &rest, query, request).await
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

async fn read_body(request: Request<hyper::body::Incoming>) -> Result<(String, Bytes), ApiError> {
    let content_type = request
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
        .unwrap_or_else(|| "application/json".into());
    let body = Limited::new(request.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|err| {
            if err
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                ApiError::too_large(MAX_BODY)
            } else {
                ApiError::bad_request(format!("reading the request body: {err}"))
            }
        })?
        .to_bytes();
    Ok((content_type, body))
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

fn parse_yaml(body: &[u8]) -> Result<Value, ApiError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| ApiError::bad_request("the request body is not UTF-8"))?;
    serde_saphyr::from_str::<Value>(text)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid YAML: {e}")))
}

fn decode_object(content_type: &str, body: &[u8]) -> Result<Value, ApiError> {
    match content_type {
        "application/json" | "" | "*/*" => parse_json(body),
        "application/yaml" | "application/x-yaml" => parse_yaml(body),
        "application/vnd.kubernetes.protobuf" => Err(ApiError::unsupported_media_type(
            "application/vnd.kubernetes.protobuf (the lab API server speaks JSON only; \
             imperative `kubectl create <kind>` sends protobuf, so use \
             `kubectl create ... --dry-run=client -o yaml | kubectl apply -f -`)",
        )),
        other => Err(ApiError::unsupported_media_type(other)),
    }
}

#[allow(clippy::too_many_arguments)]
async fn resource(
    shared: &Arc<Shared>,
    user: &User,
    group: &str,
    version: &str,
    rest: &[&str],
    query: Query,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, ApiError> {
    let path = request.uri().path().to_string();
    let not_found = || ApiError::path_not_found(&path);
    // /namespaces/{ns}/{resource}... unless it is the namespace object's own
    // subresource (/namespaces/{name}/status).
    let (namespace, rest) = match rest {
        ["namespaces", ns, resource, tail @ ..]
            if *resource != "status" && *resource != "finalize" =>
        {
            (Some(ns.to_string()), [&[*resource][..], tail].concat())
        }
        other => (None, other.to_vec()),
    };
    let (resource_name, name, subresource) = match rest.as_slice() {
        [r] => (*r, None, None),
        [r, n] => (*r, Some(n.to_string()), None),
        [r, n, s] => (*r, Some(n.to_string()), Some(*s)),
        _ => return Err(not_found()),
    };
    let info = shared
        .lock()
        .registry
        .lookup(group, version, resource_name)
        .ok_or_else(not_found)?;
    if namespace.is_some() && !info.namespaced {
        return Err(not_found());
    }
    if info.namespaced && name.is_some() && namespace.is_none() {
        return Err(not_found());
    }
    let ns = namespace.clone().unwrap_or_default();
    let method = request.method().clone();
    tracing::trace!(user = %user.username(), %method, %path, "request");

    if info.create_only {
        if method != Method::POST || name.is_some() {
            return Err(ApiError::method_not_allowed(method.as_str(), &path));
        }
        let (content_type, body) = read_body(request).await?;
        let review = decode_object(&content_type, &body)?;
        let state = shared.lock();
        let answer = semantics::token_review(&state, &shared.ctx(), &review);
        return Ok(json_response(201, &answer));
    }

    match (method.clone(), name, subresource) {
        (Method::GET, None, None) => {
            let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))?;
            let fields = FieldSelector::parse(query.get("fieldSelector").unwrap_or(""))?;
            if query.flag("watch") {
                let timeout = query
                    .get("timeoutSeconds")
                    .and_then(|t| t.parse::<u64>().ok())
                    .map(Duration::from_secs)
                    .unwrap_or(watch::DEFAULT_TIMEOUT);
                return watch::serve(
                    shared.clone(),
                    WatchRequest {
                        info,
                        version: version.to_string(),
                        namespace,
                        labels,
                        fields,
                        resource_version: query.get("resourceVersion").map(String::from),
                        send_initial_events: query.flag("sendInitialEvents"),
                        bookmarks: query.flag("allowWatchBookmarks"),
                        timeout,
                    },
                )
                .await;
            }
            let state = shared.lock();
            list(
                &state,
                &info,
                version,
                namespace.as_deref(),
                &labels,
                &fields,
                &query,
            )
            .map(|b| bytes_response(200, b))
        }
        (Method::POST, None, None) => {
            let (content_type, body) = read_body(request).await?;
            let mut object = decode_object(&content_type, &body)?;
            // Mutating admission runs before the object is stored, and
            // outside the lock: webhooks are network calls.
            let calls = {
                let state = shared.lock();
                super::admission::matching(
                    &state,
                    &info,
                    version,
                    &ns,
                    &object,
                    &shared.webhook_services,
                )
            };
            if !calls.is_empty() {
                object = super::admission::mutate(
                    calls,
                    &info,
                    version,
                    &ns,
                    object,
                    user,
                    query.dry_run(),
                )
                .await?;
            }
            let mut state = shared.lock();
            let created = semantics::create(
                &mut state,
                &shared.ctx(),
                &info,
                version,
                &ns,
                object,
                query.dry_run(),
            )?;
            Ok(object_response(201, &created, &info, version))
        }
        (Method::DELETE, None, None) => {
            let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))?;
            let fields = FieldSelector::parse(query.get("fieldSelector").unwrap_or(""))?;
            let mut state = shared.lock();
            let targets: Vec<(String, String)> = state
                .store
                .list(&info.key, namespace.as_deref(), None)
                .filter(|(id, o)| matches(id, o, &labels, &fields))
                .map(|(id, _)| id.clone())
                .collect();
            let mut deleted = Vec::new();
            for (object_ns, object_name) in targets {
                deleted.push(
                    semantics::delete(
                        &mut state,
                        &info,
                        &object_ns,
                        &object_name,
                        query.get("gracePeriodSeconds").and_then(|g| g.parse().ok()),
                        query.dry_run(),
                    )?
                    .value(),
                );
            }
            Ok(json_response(
                200,
                &json!({
                    "kind": format!("{}List", info.kind),
                    "apiVersion": info.api_version(version),
                    "metadata": {"resourceVersion": state.store.current_rv().to_string()},
                    "items": deleted,
                }),
            ))
        }
        (Method::GET, Some(name), sub @ (None | Some("status")))
            if sub.is_none() || info.has_status =>
        {
            let state = shared.lock();
            let object = state
                .store
                .get(&info.key, if info.namespaced { &ns } else { "" }, &name)
                .ok_or_else(|| ApiError::not_found(&info.key.group, &info.key.resource, &name))?;
            Ok(object_response(200, &object, &info, version))
        }
        (Method::PUT, Some(name), sub @ (None | Some("status"))) => {
            let status_only = sub.is_some();
            if status_only && !info.has_status {
                return Err(not_found());
            }
            let (content_type, body) = read_body(request).await?;
            let object = decode_object(&content_type, &body)?;
            let mut state = shared.lock();
            let updated = semantics::update(
                &mut state,
                &info,
                version,
                &ns,
                &name,
                object,
                status_only,
                query.dry_run(),
            )?;
            Ok(object_response(200, &updated, &info, version))
        }
        (Method::PATCH, Some(name), sub @ (None | Some("status"))) => {
            let status_only = sub.is_some();
            if status_only && !info.has_status {
                return Err(not_found());
            }
            let (content_type, body) = read_body(request).await?;
            let mut state = shared.lock();
            let (patched, code) = patch_object(
                &mut state,
                &shared.ctx(),
                &info,
                version,
                &ns,
                &name,
                &content_type,
                &body,
                status_only,
                &query,
            )?;
            Ok(object_response(code, &patched, &info, version))
        }
        (Method::DELETE, Some(name), None) => {
            // DeleteOptions come in the body (client-go, kube-rs, kubectl)
            // or, from simpler clients, as a query parameter.
            let (_, body) = read_body(request).await?;
            let options: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let grace = options["gracePeriodSeconds"]
                .as_i64()
                .or_else(|| query.get("gracePeriodSeconds").and_then(|g| g.parse().ok()));
            let mut state = shared.lock();
            let deleted = semantics::delete(&mut state, &info, &ns, &name, grace, query.dry_run())?;
            Ok(object_response(200, &deleted, &info, version))
        }
        (Method::POST, Some(name), Some("token"))
            if info.key.resource == "serviceaccounts" && info.key.group.is_empty() =>
        {
            let (content_type, body) = read_body(request).await?;
            let token_request = decode_object(&content_type, &body)?;
            let state = shared.lock();
            let answer =
                semantics::token_request(&state, &shared.ctx(), &ns, &name, &token_request)?;
            Ok(json_response(201, &answer))
        }
        (method, _, Some(_))
            if !matches!(
                method,
                Method::GET | Method::PUT | Method::PATCH | Method::POST
            ) =>
        {
            Err(ApiError::method_not_allowed(method.as_str(), &path))
        }
        (method, _, None) => Err(ApiError::method_not_allowed(method.as_str(), &path)),
        _ => Err(not_found()),
    }
}

/// An object as stored, or rewritten to the requested version of a custom
/// resource served in several.
pub fn presented_json(object: &Object, info: &ResourceInfo, version: &str) -> Bytes {
    let api_version = info.api_version(version);
    if *object.api_version == *api_version {
        object.json.clone()
    } else {
        let mut value = object.value();
        value["apiVersion"] = json!(api_version);
        Bytes::from(serde_json::to_vec(&value).unwrap_or_default())
    }
}

fn object_response(
    code: u16,
    object: &Object,
    info: &ResourceInfo,
    version: &str,
) -> Response<Body> {
    bytes_response(code, presented_json(object, info, version))
}

pub fn matches(
    id: &(String, String),
    object: &Object,
    labels: &LabelSelector,
    fields: &FieldSelector,
) -> bool {
    labels.matches(|k| object.label(k)) && fields.matches(&id.0, &id.1)
}

/// A continue token: the list's version and where the last page ended.
#[derive(serde::Serialize, serde::Deserialize)]
struct Continue {
    rv: u64,
    ns: String,
    name: String,
}

fn list(
    state: &State,
    info: &ResourceInfo,
    version: &str,
    namespace: Option<&str>,
    labels: &LabelSelector,
    fields: &FieldSelector,
    query: &Query,
) -> Result<Bytes, ApiError> {
    let limit = match query.get("limit") {
        None | Some("") | Some("0") => usize::MAX,
        Some(n) => n
            .parse::<usize>()
            .map_err(|_| ApiError::bad_request(format!("invalid limit {n:?}")))?,
    };
    let (list_rv, after) = match query.get("continue").filter(|c| !c.is_empty()) {
        None => (state.store.current_rv(), None),
        Some(token) => {
            let token: Continue = URL_SAFE_NO_PAD
                .decode(token)
                .ok()
                .and_then(|raw| serde_json::from_slice(&raw).ok())
                .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
            // Later pages come from the live store; a token older than the
            // history is refused as the real server refuses a compacted one.
            if token.rv < state.store.floor() {
                return Err(ApiError::expired(
                    "The provided continue parameter is too old to display a consistent list result. \
                     You can start a new list without the continue parameter.",
                ));
            }
            (token.rv, Some((token.ns, token.name)))
        }
    };
    let api_version = info.api_version(version);
    let mut out = Vec::with_capacity(4096);
    out.extend_from_slice(b"{\"kind\":");
    serde_json::to_writer(&mut out, &format!("{}List", info.kind)).ok();
    out.extend_from_slice(b",\"apiVersion\":");
    serde_json::to_writer(&mut out, &api_version).ok();
    out.extend_from_slice(b",\"items\":[");
    let mut count = 0usize;
    let mut last: Option<(String, String)> = None;
    let mut more = false;
    for (id, object) in state.store.list(&info.key, namespace, after) {
        if !matches(id, object, labels, fields) {
            continue;
        }
        if count == limit {
            more = true;
            break;
        }
        if count > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&presented_json(object, info, version));
        last = Some(id.clone());
        count += 1;
    }
    out.extend_from_slice(b"],\"metadata\":");
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if more && let Some((ns, name)) = last {
        let token = serde_json::to_vec(&Continue {
            rv: list_rv,
            ns,
            name,
        })
        .unwrap_or_default();
        metadata["continue"] = json!(URL_SAFE_NO_PAD.encode(token));
    }
    serde_json::to_writer(&mut out, &metadata).ok();
    out.push(b'}');
    Ok(Bytes::from(out))
}

#[allow(clippy::too_many_arguments)]
fn patch_object(
    state: &mut State,
    ctx: &Ctx,
    info: &ResourceInfo,
    version: &str,
    ns: &str,
    name: &str,
    content_type: &str,
    body: &[u8],
    status_only: bool,
    query: &Query,
) -> Result<(Arc<Object>, u16), ApiError> {
    let object_ns = if info.namespaced { ns } else { "" };
    let current = state.store.get(&info.key, object_ns, name);
    let builtin = !info.is_custom();
    let mut merged = match &current {
        Some(current) => current.value(),
        None => Value::Null,
    };
    match content_type {
        "application/apply-patch+yaml" | "application/apply-patch+json" => {
            if query.get("fieldManager").is_none_or(str::is_empty) {
                return Err(ApiError::bad_request(
                    "fieldManager is required for apply requests",
                ));
            }
            let applied = parse_yaml(body)?;
            if current.is_none() {
                let mut object = applied;
                if object["metadata"]["name"]
                    .as_str()
                    .is_none_or(str::is_empty)
                {
                    object["metadata"]["name"] = json!(name);
                }
                let created =
                    semantics::create(state, ctx, info, version, ns, object, query.dry_run())?;
                return Ok((created, 201));
            }
            if builtin {
                patch::strategic_merge(&mut merged, &applied)?;
            } else {
                patch::merge_patch(&mut merged, &applied);
            }
        }
        "application/merge-patch+json" => {
            let p = parse_json(body)?;
            require(&current, info, name)?;
            patch::merge_patch(&mut merged, &p);
        }
        "application/json-patch+json" => {
            let p = parse_json(body)?;
            require(&current, info, name)?;
            patch::json_patch(&mut merged, &p)?;
        }
        "application/strategic-merge-patch+json" => {
            if !builtin {
                return Err(ApiError::unsupported_media_type(
                    "strategic merge patch is not supported for custom resources; use a merge patch",
                ));
            }
            let p = parse_json(body)?;
            require(&current, info, name)?;
            patch::strategic_merge(&mut merged, &p)?;
        }
        other => return Err(ApiError::unsupported_media_type(other)),
    }
    let updated = semantics::update(
        state,
        info,
        version,
        ns,
        name,
        merged,
        status_only,
        query.dry_run(),
    )?;
    Ok((updated, 200))
}

fn require(current: &Option<Arc<Object>>, info: &ResourceInfo, name: &str) -> Result<(), ApiError> {
    current
        .as_ref()
        .map(|_| ())
        .ok_or_else(|| ApiError::not_found(&info.key.group, &info.key.resource, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        let q = Query::parse(Some(
            "labelSelector=app%3Decho%2Cversion+in+%28v1%29&watch=1&x",
        ));
        assert_eq!(q.get("labelSelector"), Some("app=echo,version in (v1)"));
        assert!(q.flag("watch"));
        assert_eq!(q.get("x"), Some(""));
        assert_eq!(decode("100%"), "100%");
        assert_eq!(decode("%zz"), "%zz");
    }
}
