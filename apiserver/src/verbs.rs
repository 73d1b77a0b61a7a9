//! The verbs on a resource path: the path is parsed into a `Target` (the
//! resource, its namespace, the object's name and subresource), and each
//! verb has its own handler.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::{Method, Request, Response};
use hyper::body::Incoming;
use serde_json::{Value, json};

use super::Shared;
use super::auth::User;
use super::decode::{Query, decode_object, parse_json, parse_yaml, read_body};
use super::patch;
use super::present::{Body, bytes_response, json_response, object_response, presented_json};
use super::resources::ResourceInfo;
use super::selector::{FieldSelector, LabelSelector, matches};
use super::semantics::{self, Ctx, State};
use super::status::ApiError;
use super::store::Object;
use super::watch::{self, WatchRequest};

/// What a resource path names.
pub struct Target {
    pub info: Arc<ResourceInfo>,
    /// The API version asked for (a custom resource may serve several).
    pub version: String,
    /// `None` for a cluster-wide collection or a cluster-scoped resource.
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
    /// The request path, for errors.
    pub path: String,
}

impl Target {
    /// Parses `rest`, the path after `/api/v1` or `/apis/{group}/{version}`.
    pub fn parse(
        shared: &Shared,
        group: &str,
        version: &str,
        rest: &[&str],
        path: &str,
    ) -> Result<Target, ApiError> {
        let not_found = || ApiError::path_not_found(path);
        // /namespaces/{ns}/{resource}... unless it is the namespace
        // object's own subresource (/namespaces/{name}/status).
        let (namespace, rest) = match rest {
            ["namespaces", ns, resource, tail @ ..]
                if *resource != "status" && *resource != "finalize" =>
            {
                (Some(ns.to_string()), [&[*resource][..], tail].concat())
            }
            other => (None, other.to_vec()),
        };
        let (resource, name, subresource) = match rest.as_slice() {
            [r] => (*r, None, None),
            [r, n] => (*r, Some(n.to_string()), None),
            [r, n, s] => (*r, Some(n.to_string()), Some(s.to_string())),
            _ => return Err(not_found()),
        };
        let info = shared
            .lock()
            .registry
            .lookup(group, version, resource)
            .ok_or_else(not_found)?;
        if namespace.is_some() && !info.namespaced {
            return Err(not_found());
        }
        if info.namespaced && name.is_some() && namespace.is_none() {
            return Err(not_found());
        }
        Ok(Target {
            info,
            version: version.to_string(),
            namespace,
            name,
            subresource,
            path: path.to_string(),
        })
    }

    /// The namespace an object is stored under ("" when cluster-scoped).
    fn ns(&self) -> &str {
        self.namespace.as_deref().unwrap_or_default()
    }

    fn not_found(&self) -> ApiError {
        ApiError::path_not_found(&self.path)
    }

    fn status_only(&self) -> Result<bool, ApiError> {
        match self.subresource.as_deref() {
            None => Ok(false),
            Some("status") if self.info.has_status => Ok(true),
            Some(_) => Err(self.not_found()),
        }
    }
}

/// What a handler answers: a response, or an error the caller turns into
/// a Kubernetes Status.
type Answer = Result<Response<Body>, ApiError>;

/// What every verb's handler is given.
struct Call<'a> {
    shared: &'a Arc<Shared>,
    user: &'a User,
    target: &'a Target,
    query: &'a Query,
}

/// One request on a resource path, from `user`.
pub async fn serve(
    shared: &Arc<Shared>,
    user: &User,
    target: Target,
    query: Query,
    request: Request<Incoming>,
) -> Answer {
    let method = request.method().clone();
    tracing::trace!(user = %user.username(), %method, path = %target.path, "request");
    if target.info.create_only {
        if method != Method::POST || target.name.is_some() {
            return Err(ApiError::method_not_allowed(method.as_str(), &target.path));
        }
        return review(shared, request).await;
    }
    let t = &target;
    let c = &Call {
        shared,
        user,
        target: t,
        query: &query,
    };
    match (&method, &t.name, t.subresource.as_deref()) {
        (&Method::GET, None, None) => get_collection(c).await,
        (&Method::POST, None, None) => create(c, request).await,
        (&Method::DELETE, None, None) => delete_collection(c),
        (&Method::GET, Some(name), None | Some("status")) if t.status_only().is_ok() => {
            get(c, name)
        }
        (&Method::PUT | &Method::PATCH, Some(name), None | Some("status")) => {
            write(c, name, request).await
        }
        (&Method::DELETE, Some(name), None) => delete(c, name, request).await,
        (&Method::POST, Some(name), Some("token"))
            if t.info.key.resource == "serviceaccounts" && t.info.key.group.is_empty() =>
        {
            token(c, name, request).await
        }
        (method, _, Some(_))
            if !matches!(
                *method,
                Method::GET | Method::PUT | Method::PATCH | Method::POST
            ) =>
        {
            Err(ApiError::method_not_allowed(method.as_str(), &t.path))
        }
        (method, _, None) => Err(ApiError::method_not_allowed(method.as_str(), &t.path)),
        _ => Err(t.not_found()),
    }
}

/// POST to a create-only resource (TokenReview).
async fn review(shared: &Arc<Shared>, request: Request<Incoming>) -> Answer {
    let (content_type, body) = read_body(request).await?;
    let review = decode_object(&content_type, &body)?;
    let state = shared.lock();
    let answer = semantics::token_review(&state, &shared.ctx(), &review);
    Ok(json_response(201, &answer))
}

/// GET a collection: a list, or a watch.
async fn get_collection(c: &Call<'_>) -> Answer {
    let (shared, t, query) = (c.shared, c.target, c.query);
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
                info: t.info.clone(),
                version: t.version.clone(),
                namespace: t.namespace.clone(),
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
    list(&state, t, &labels, &fields, query).map(|b| bytes_response(200, b))
}

async fn create(c: &Call<'_>, request: Request<Incoming>) -> Answer {
    let (shared, t, query) = (c.shared, c.target, c.query);
    let (content_type, body) = read_body(request).await?;
    let mut object = decode_object(&content_type, &body)?;
    // Mutating admission runs before the object is stored, and outside
    // the lock: webhooks are network calls.
    let calls = {
        let state = shared.lock();
        super::admission::matching(
            &state,
            &t.info,
            &t.version,
            t.ns(),
            &object,
            &shared.webhook_services,
        )
    };
    if !calls.is_empty() {
        object = super::admission::mutate(
            calls,
            &t.info,
            &t.version,
            t.ns(),
            object,
            c.user,
            query.dry_run(),
        )
        .await?;
    }
    let mut state = shared.lock();
    let created = semantics::create(
        &mut state,
        &shared.ctx(),
        &t.info,
        &t.version,
        t.ns(),
        object,
        query.dry_run(),
    )?;
    Ok(object_response(201, &created, &t.info, &t.version))
}

fn delete_collection(c: &Call<'_>) -> Answer {
    let (shared, t, query) = (c.shared, c.target, c.query);
    let labels = LabelSelector::parse(query.get("labelSelector").unwrap_or(""))?;
    let fields = FieldSelector::parse(query.get("fieldSelector").unwrap_or(""))?;
    let mut state = shared.lock();
    let targets: Vec<(String, String)> = state
        .store
        .list(&t.info.key, t.namespace.as_deref(), None)
        .filter(|(id, o)| matches(id, o, &labels, &fields))
        .map(|(id, _)| id.clone())
        .collect();
    let grace = query.get("gracePeriodSeconds").and_then(|g| g.parse().ok());
    let mut deleted = Vec::new();
    for (object_ns, object_name) in targets {
        let object = semantics::delete(
            &mut state,
            &t.info,
            &object_ns,
            &object_name,
            grace,
            query.dry_run(),
        )?;
        deleted.push(object.value());
    }
    Ok(json_response(
        200,
        &json!({
            "kind": format!("{}List", t.info.kind),
            "apiVersion": t.info.api_version(&t.version),
            "metadata": {"resourceVersion": state.store.current_rv().to_string()},
            "items": deleted,
        }),
    ))
}

fn get(c: &Call<'_>, name: &str) -> Answer {
    let (shared, t) = (c.shared, c.target);
    let state = shared.lock();
    let ns = if t.info.namespaced { t.ns() } else { "" };
    let object = state
        .store
        .get(&t.info.key, ns, name)
        .ok_or_else(|| ApiError::not_found(&t.info.key.group, &t.info.key.resource, name))?;
    Ok(object_response(200, &object, &t.info, &t.version))
}

/// PUT (replace) or PATCH an object or its status.
async fn write(c: &Call<'_>, name: &str, request: Request<Incoming>) -> Answer {
    let (shared, t, query) = (c.shared, c.target, c.query);
    let status_only = t.status_only()?;
    let replace = request.method() == Method::PUT;
    let (content_type, body) = read_body(request).await?;
    let mut state = shared.lock();
    let (written, code) = if replace {
        let object = decode_object(&content_type, &body)?;
        let (info, version) = (&t.info, t.version.as_str());
        let dry_run = query.dry_run();
        let updated = semantics::update(
            &mut state,
            info,
            version,
            t.ns(),
            name,
            object,
            status_only,
            dry_run,
        )?;
        (updated, 200)
    } else {
        let patch = Patch {
            content_type: &content_type,
            body: &body,
            status_only,
            query,
        };
        patch_object(&mut state, &shared.ctx(), t, name, patch)?
    };
    Ok(object_response(code, &written, &t.info, &t.version))
}

async fn delete(c: &Call<'_>, name: &str, request: Request<Incoming>) -> Answer {
    let (shared, t, query) = (c.shared, c.target, c.query);
    // DeleteOptions come in the body (client-go, kube-rs, kubectl) or,
    // from simpler clients, as a query parameter.
    let (_, body) = read_body(request).await?;
    let options: Value = serde_json::from_slice(&body).unwrap_or_default();
    let grace = options["gracePeriodSeconds"]
        .as_i64()
        .or_else(|| query.get("gracePeriodSeconds").and_then(|g| g.parse().ok()));
    let mut state = shared.lock();
    let deleted = semantics::delete(&mut state, &t.info, t.ns(), name, grace, query.dry_run())?;
    Ok(object_response(200, &deleted, &t.info, &t.version))
}

/// POST serviceaccounts/{name}/token (TokenRequest).
async fn token(c: &Call<'_>, name: &str, request: Request<Incoming>) -> Answer {
    let (shared, t) = (c.shared, c.target);
    let (content_type, body) = read_body(request).await?;
    let token_request = decode_object(&content_type, &body)?;
    let state = shared.lock();
    let answer = semantics::token_request(&state, &shared.ctx(), t.ns(), name, &token_request)?;
    Ok(json_response(201, &answer))
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
    t: &Target,
    labels: &LabelSelector,
    fields: &FieldSelector,
    query: &Query,
) -> Result<Bytes, ApiError> {
    let (info, version, namespace) = (&t.info, t.version.as_str(), t.namespace.as_deref());
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

/// A patch as sent: its media type says which kind.
struct Patch<'a> {
    content_type: &'a str,
    body: &'a [u8],
    status_only: bool,
    query: &'a Query,
}

/// Applies a patch (or a server-side apply, which may create), returning
/// the object and the status code.
fn patch_object(
    state: &mut State,
    ctx: &Ctx,
    t: &Target,
    name: &str,
    patch: Patch<'_>,
) -> Result<(Arc<Object>, u16), ApiError> {
    let (info, version, ns) = (&t.info, t.version.as_str(), t.ns());
    let Patch {
        content_type,
        body,
        status_only,
        query,
    } = patch;
    let object_ns = if info.namespaced { ns } else { "" };
    let current = state.store.get(&info.key, object_ns, name);
    let builtin = !info.is_custom();
    let mut merged = match &current {
        Some(current) => current.value(),
        None => Value::Null,
    };
    // The object as the request's version shows it: one stored through
    // another version of the group (v1beta1, patched as v1) is patched
    // as this one, as a real API server converts it first.
    if current.is_some() {
        merged["apiVersion"] = json!(info.api_version(version));
    }
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
