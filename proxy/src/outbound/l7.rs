//! The outbound side's HTTP: each request from the application is routed
//! on its own. An endpoint is chosen per request, and the request travels
//! to the endpoint's sidecar as an HTTP/2 request on a pooled mTLS
//! connection (HTTP/1.1 included: the far side restores it for the
//! application). A request that failed before reaching the application
//! (its endpoint's sidecar could not be reached) is retried on another
//! endpoint, within a budget; idempotent requests without a body also when
//! the mesh connection failed under them. Endpoints that fail or answer
//! 5xx feed outlier detection. An allowed upgrade goes to one endpoint
//! through a TCP tunnel and is joined on 101 (see `upgrade`).

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Destination, Outbound, Target};
use crate::access_log;
use crate::http::{
    APP_PROTOCOL, Body, NOT_DELIVERED, PEER_IDENTITY, TARGET, absolute, error, idempotent,
    outgoing, strip_hop_by_hop,
};
use crate::metrics::{Peer, RequestLabels, RouteLabels, TrafficLabels};
use crate::pool::ForExchange;
use crate::resources::Name;
use crate::routes::{Entry, Redirect, RequestView, Retry};

static EMPTY: Bytes = Bytes::new();

/// Retries may add at most a fifth to the requests in flight (plus a
/// floor, so that a quiet proxy can still retry): when an outage makes
/// everything fail, retries must not multiply the load on what is left.
#[derive(Default)]
pub struct RetryBudget {
    requests: AtomicUsize,
    retries: AtomicUsize,
}

struct Counted<'a>(&'a AtomicUsize);

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl RetryBudget {
    fn request(&self) -> Counted<'_> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        Counted(&self.requests)
    }

    fn retry(&self) -> Option<Counted<'_>> {
        let allowed = (self.requests.load(Ordering::Relaxed) / 5).max(10);
        if self.retries.fetch_add(1, Ordering::Relaxed) < allowed {
            Some(Counted(&self.retries))
        } else {
            self.retries.fetch_sub(1, Ordering::Relaxed);
            None
        }
    }
}

/// Where the requests of a connection go.
#[derive(Clone, Debug)]
pub enum Route {
    /// Every request to one service port (transparent capture, CONNECT).
    Fixed { host: String, port: u16 },
    /// Each request names its destination (explicit proxy, absolute-form).
    PerRequest,
}

/// Serves an application connection with hyper's server, HTTP/1.1 or
/// HTTP/2 (prior knowledge), upgrades included.
pub(super) async fn serve_with_hyper<S>(outbound: Arc<Outbound>, io: S, route: Route)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let drain = outbound.drain.clone();
    let server = crate::http::server(outbound.config.head_timeout);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let (outbound, route) = (outbound.clone(), route.clone());
        let request = request.map(crate::http::boxed);
        async move { Ok::<_, Infallible>(forward(&outbound, &route, request).await) }
    });
    drain
        .serve(server.serve_connection_with_upgrades(TokioIo::new(io), service))
        .await;
}

fn authority_of(request: &Request<Body>) -> Option<String> {
    request
        .uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            request
                .headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
}

fn split_host_port(authority: &str) -> Option<(String, u16)> {
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.ends_with(']') || authority.starts_with('[') => {
            match port.parse() {
                Ok(port) => Some((host.trim_matches(['[', ']']).to_string(), port)),
                // An IPv6 literal without a port.
                Err(_) => Some((authority.trim_matches(['[', ']']).to_string(), 80)),
            }
        }
        _ => Some((authority.trim_matches(['[', ']']).to_string(), 80)),
    }
}

fn version_name(version: Version) -> &'static str {
    if version == Version::HTTP_2 {
        "h2"
    } else {
        "http/1.1"
    }
}

/// Routes one request from the application, as this sidecar's span of
/// its trace, and logs it where access logs are on.
pub async fn forward(
    outbound: &Arc<Outbound>,
    route: &Route,
    mut request: Request<Body>,
) -> Response<Body> {
    let trace = crate::trace_context::on_request(request.headers_mut());
    let Some(log) = &outbound.config.access_log else {
        return forward_request(outbound, route, request).await;
    };
    let me = outbound.me();
    let entry = access_log::Entry::of(
        "outbound",
        &request,
        trace,
        Some(me.principal.to_string()).filter(|p| !p.is_empty()),
        None,
    );
    let started = (std::time::SystemTime::now(), Instant::now());
    let response = forward_request(outbound, route, request).await;
    access_log::log_when_done(log, entry, started, response)
}

/// Routes one request from the application: its service's routes (a
/// VirtualService, HTTPRoute or GRPCRoute) decide where it goes and what
/// happens on the way; without one, it goes to the service it names.
async fn forward_request(
    outbound: &Arc<Outbound>,
    route: &Route,
    request: Request<Body>,
) -> Response<Body> {
    let start = Instant::now();
    let _counted = outbound.retry_budget.request();
    let authority = authority_of(&request);
    let (host, port) = match (route, authority.as_deref().and_then(split_host_port)) {
        (Route::Fixed { host, port }, _) => (host.clone(), *port),
        (Route::PerRequest, Some(found)) => found,
        (Route::PerRequest, None) => {
            return error(StatusCode::BAD_REQUEST, "the request names no host");
        }
    };
    let authority = authority.unwrap_or_else(|| format!("{host}:{port}"));
    if outbound.config.upgrades.requested(&request) {
        return upgrade(outbound, &host, port, &authority, request).await;
    }
    let version = request.version();
    let (mut parts, body) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    // weft's own headers are for sidecars to set: an app's are dropped
    // here, whether the destination has a sidecar (which sets its own) or
    // not (which must not be told an identity no one proved).
    for own in [TARGET, APP_PROTOCOL, PEER_IDENTITY] {
        parts.headers.remove(own);
    }
    let entry = {
        let snapshot = outbound.xds.snapshot.load();
        snapshot
            .service(&host, port)
            .and_then(|s| snapshot.routes_for(&s.hostname))
            .and_then(|routes| routes.route(&view(&parts, &authority, port)))
            .cloned()
    };
    let Some(entry) = entry else {
        let plan = Plan {
            target: Target::new(&host, port),
            retry: &DEFAULT_RETRY,
            per_try: None,
        };
        return send(outbound, &plan, &authority, version, parts, body, start).await;
    };
    routed(
        outbound, entry, port, authority, version, parts, body, start,
    )
    .await
}

static DEFAULT_RETRY: std::sync::LazyLock<Retry> = std::sync::LazyLock::new(|| {
    let mut retry = Retry::default();
    // weft has always retried an idempotent request without a body when
    // the mesh connection failed under it.
    retry.on |= crate::routes::retry_on::RESET;
    retry
});

/// What `routes` matches a request on.
fn view<'a>(parts: &'a http::request::Parts, authority: &'a str, port: u16) -> RequestView<'a> {
    RequestView {
        method: parts.method.as_str(),
        authority,
        scheme: parts.uri.scheme_str().unwrap_or("http"),
        path: parts.uri.path(),
        query: parts.uri.query(),
        headers: &parts.headers,
        port,
    }
}

/// Applies a matched route: faults, redirect, header edits and rewrite,
/// a weighted backend, mirrors, timeout and retries.
#[allow(clippy::too_many_arguments)]
async fn routed(
    outbound: &Arc<Outbound>,
    entry: Entry,
    port: u16,
    mut authority: String,
    version: Version,
    mut parts: http::request::Parts,
    body: Body,
    start: Instant,
) -> Response<Body> {
    let rule = &entry.rule;
    let count = |action: &'static str| {
        outbound
            .metrics
            .routed
            .get_or_create(&RouteLabels {
                route: entry.from.clone(),
                action,
            })
            .inc();
    };
    if let Some(fault) = &rule.fault {
        if let Some((delay, share)) = fault.delay
            && crate::routes::chance(share)
        {
            count("fault_delayed");
            tokio::time::sleep(delay).await;
        }
        if let Some((status, grpc, share)) = fault.abort
            && crate::routes::chance(share)
        {
            count("fault_aborted");
            return aborted(status, grpc);
        }
    }
    let matched_prefix = entry.matched_prefix();
    if let Some(redirect) = &rule.redirect {
        count("redirected");
        return redirected(redirect, &parts, &authority, matched_prefix);
    }
    if let Some(edits) = &rule.request_headers {
        edits.apply(&mut parts.headers);
    }
    if let Some(rewrite) = &rule.rewrite {
        if let Some(path) = &rewrite.path {
            let new_path = path.apply(parts.uri.path(), matched_prefix);
            let with_query = match parts.uri.query() {
                Some(query) => format!("{new_path}?{query}"),
                None => new_path,
            };
            match with_query.parse::<http::uri::PathAndQuery>() {
                Ok(path) => {
                    let mut uri = parts.uri.clone().into_parts();
                    uri.path_and_query = Some(path);
                    if let Ok(uri) = http::Uri::from_parts(uri) {
                        parts.uri = uri;
                    }
                }
                Err(_) => {
                    return error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "the rewritten path is not valid",
                    );
                }
            }
        }
        if let Some(new) = &rewrite.authority {
            authority = new.to_string();
        }
    }
    let Some(backend) = crate::routes::weighted(&rule.backends, rule.total_weight) else {
        // Gateway API: a rule whose backends all weigh 0 answers 500.
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the route has no backend with weight",
        );
    };
    let backend_port = if backend.port == 0 {
        port
    } else {
        backend.port
    };
    // The destination's policy, looked up once for the hash key and the
    // pool limit (the pick finds it again for balancing).
    let policy = {
        let snapshot = outbound.xds.snapshot.load();
        snapshot
            .destination_for(&backend.host)
            .and_then(|d| d.policy(&backend.subset, backend_port))
            .cloned()
    };
    let hash = policy
        .as_deref()
        .and_then(|p| hash_key(outbound, p, &parts));
    let limit = policy
        .as_ref()
        .and_then(|p| p.pool.as_ref())
        .map_or(0, |p| p.max_requests);
    let _slot = if limit > 0 {
        match outbound.load.admit(&backend.host, limit) {
            Some(slot) => Some(slot),
            None => {
                count("overflowed");
                outbound.metrics.overflows.inc();
                let mut response = error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connection pool overflow",
                );
                response
                    .headers_mut()
                    .insert("x-envoy-overloaded", HeaderValue::from_static("true"));
                return response;
            }
        }
    } else {
        None
    };
    for mirror in rule.mirrors.iter() {
        if crate::routes::chance(mirror.per_million) {
            if body.is_end_stream() {
                count("mirrored");
                shadow(outbound, mirror, port, &authority, version, &parts);
            } else {
                // Bodies stream through once; copying one for a mirror
                // would mean holding it whole.
                count("mirror_skipped");
            }
        }
    }
    count("forwarded");
    let plan = Plan {
        target: Target {
            host: &backend.host,
            port: backend_port,
            subset: &backend.subset,
            hash,
        },
        retry: &rule.retries,
        per_try: rule.retries.per_try,
    };
    let sent = send(outbound, &plan, &authority, version, parts, body, start);
    let mut response = match rule.timeout {
        None => sent.await,
        Some(limit) => match tokio::time::timeout(limit, sent).await {
            Ok(response) => response,
            Err(_) => {
                count("timed_out");
                error(StatusCode::GATEWAY_TIMEOUT, "upstream request timeout")
            }
        },
    };
    if let Some(edits) = &rule.response_headers {
        edits.apply(response.headers_mut());
    }
    response
}

/// A fault's abort: an HTTP status, or for gRPC an HTTP 200 whose
/// grpc-status says the code.
fn aborted(status: u16, grpc: Option<u32>) -> Response<Body> {
    if let Some(code) = grpc {
        let mut response = Response::new(crate::http::empty());
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        headers.insert("grpc-status", HeaderValue::from(code));
        headers.insert(
            "grpc-message",
            HeaderValue::from_static("fault%20filter%20abort"),
        );
        return response;
    }
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    error(status, "fault filter abort")
}

fn redirected(
    redirect: &Redirect,
    parts: &http::request::Parts,
    authority: &str,
    matched_prefix: Option<&str>,
) -> Response<Body> {
    let scheme = redirect.scheme.as_deref().unwrap_or("http");
    let (own_host, own_port) = split_host_port(authority).unwrap_or_default();
    let host = redirect.host.as_deref().unwrap_or(&own_host);
    let port = match (
        redirect.port,
        redirect.host.is_some() || redirect.scheme.is_some(),
    ) {
        (0, true) => None,
        (0, false) => authority.contains(':').then_some(own_port),
        (p, _) => Some(p),
    };
    let path = match &redirect.path {
        Some(edit) => edit.apply(parts.uri.path(), matched_prefix),
        None => parts.uri.path().to_string(),
    };
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let location = match port {
        Some(port) => format!("{scheme}://{host}:{port}{path}{query}"),
        None => format!("{scheme}://{host}{path}{query}"),
    };
    let mut response = Response::new(crate::http::empty());
    *response.status_mut() = redirect.status;
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    response
}

/// The consistent-hash key a destination's policy asks for, if any.
fn hash_key(
    outbound: &Outbound,
    policy: &crate::routes::Policy,
    parts: &http::request::Parts,
) -> Option<u64> {
    use crate::balance::hash_text;
    use crate::routes::HashKey;
    match policy.hash.as_ref()? {
        HashKey::Header(name) => parts.headers.get(name).map(|v| hash_text(v.as_bytes())),
        HashKey::Cookie(name) => parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .find_map(|pair| {
                let (key, value) = pair.trim().split_once('=')?;
                (key == &**name).then(|| hash_text(value.as_bytes()))
            }),
        HashKey::QueryParam(name) => parts.uri.query().and_then(|q| {
            q.split('&').find_map(|pair| {
                let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                (key == &**name).then(|| hash_text(value.as_bytes()))
            })
        }),
        HashKey::SourceIp => outbound
            .config
            .pod_ip
            .map(|ip| hash_text(ip.to_string().as_bytes())),
    }
}

/// Sends a copy of a bodyless request to a mirror and forgets the
/// answer. Envoy's convention: the copy's authority ends in "-shadow".
fn shadow(
    outbound: &Arc<Outbound>,
    mirror: &crate::routes::Mirror,
    port: u16,
    authority: &str,
    version: Version,
    parts: &http::request::Parts,
) {
    let mut copy = Request::new(());
    *copy.method_mut() = parts.method.clone();
    *copy.uri_mut() = parts.uri.clone();
    *copy.headers_mut() = parts.headers.clone();
    let (copy, ()) = copy.into_parts();
    let host = mirror.backend.host.clone();
    let subset = mirror.backend.subset.clone();
    let port = if mirror.backend.port == 0 {
        port
    } else {
        mirror.backend.port
    };
    let authority = match split_host_port(authority) {
        Some((h, p)) if authority.contains(':') => format!("{h}-shadow:{p}"),
        _ => format!("{authority}-shadow"),
    };
    let outbound = outbound.clone();
    crate::task::spawn(async move {
        let plan = Plan {
            target: Target {
                host: &host,
                port,
                subset: &subset,
                hash: None,
            },
            retry: &NO_RETRY,
            per_try: None,
        };
        let body = crate::http::empty();
        let _ = send_body(
            &outbound,
            &plan,
            &authority,
            version,
            copy,
            body,
            true,
            Instant::now(),
        )
        .await;
    });
}

static NO_RETRY: std::sync::LazyLock<Retry> = std::sync::LazyLock::new(|| Retry {
    attempts: 0,
    on: 0,
    ..Retry::default()
});

/// Where one request goes and how it is retried.
struct Plan<'a> {
    target: Target<'a>,
    retry: &'a Retry,
    per_try: Option<std::time::Duration>,
}

/// The gRPC status of a trailers-only answer, if it is one.
fn grpc_status<B>(response: &Response<B>) -> Option<u32> {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

async fn send(
    outbound: &Outbound,
    plan: &Plan<'_>,
    authority: &str,
    version: Version,
    parts: http::request::Parts,
    body: Body,
    start: Instant,
) -> Response<Body> {
    let empty = body.is_end_stream();
    send_body(
        outbound, plan, authority, version, parts, body, empty, start,
    )
    .await
}

/// Sends one request to an endpoint of the plan's target, retrying as
/// its policy says: a request that never left goes to another endpoint;
/// one that was answered is sent again only when it has no body (bodies
/// stream through and cannot be replayed).
#[allow(clippy::too_many_arguments)]
async fn send_body(
    outbound: &Outbound,
    plan: &Plan<'_>,
    authority: &str,
    version: Version,
    mut parts: http::request::Parts,
    body: Body,
    empty: bool,
    start: Instant,
) -> Response<Body> {
    let Some(uri) = absolute(authority, &parts) else {
        return error(
            StatusCode::BAD_REQUEST,
            "the request's authority is not valid",
        );
    };
    let replayable = idempotent(&parts.method) && empty;
    // An HTTP/1.1 app's request whose body is small and of known length
    // may take an HTTP/1.1 link, which sends it whole: it is read here
    // (it has usually arrived with the head).
    let small = empty
        || body
            .size_hint()
            .exact()
            .is_some_and(|n| n <= crate::h1_codec::MAX_REQUEST_BODY);
    let (whole, body) = if version != Version::HTTP_2 && small {
        let whole = if empty {
            Bytes::new()
        } else {
            match crate::http::whole(body).await {
                Ok(whole) => whole,
                Err(err) => {
                    tracing::debug!("a request body could not be read: {err}");
                    return error(
                        StatusCode::BAD_REQUEST,
                        "the request body could not be read",
                    );
                }
            }
        };
        let body = crate::http::full(whole.clone());
        (Some(whole), body)
    } else {
        (None, body)
    };
    let mut body = Some(body);
    let mut tried: Vec<Name> = Vec::new();
    let mut attempts = 0u32;
    let mut _retry = None;
    let me = outbound.me();
    loop {
        attempts += 1;
        let pick = match outbound.pick_target(&plan.target, &tried) {
            Ok(pick) => pick,
            Err(err) => return error(StatusCode::SERVICE_UNAVAILABLE, &format!("{err:#}")),
        };
        let service = pick.service_name();
        let destination_peer = pick.workload.as_deref().map(Peer::of).unwrap_or_default();
        let uid = pick.workload.as_ref().map(|w| w.uid.clone());
        let attempt = async {
            match &pick.destination {
                Destination::Mesh {
                    peer,
                    identity,
                    target,
                    via: None,
                    ..
                } if whole.is_some() => match outbound.pool.exchange_link(*peer, identity).await {
                    // Not sent: the body is still here for another endpoint.
                    Err(err) => Err((err, false)),
                    Ok(ForExchange::Http1(connection, idle)) => {
                        let target = crate::http::target_value(target);
                        let whole = whole.as_ref().unwrap_or(&EMPTY);
                        connection
                            .exchange(
                                &parts.method,
                                &uri,
                                &parts.headers,
                                &[(TARGET, &target)],
                                whole,
                                idle,
                            )
                            .await
                            .map_err(|failure| (failure.error, failure.sent))
                    }
                    Ok(ForExchange::Http2(link)) => {
                        mesh_request(&link, &mut parts, &mut body, empty, &uri, target, version)
                            .await
                    }
                },
                Destination::Mesh {
                    peer,
                    identity,
                    target,
                    via,
                    ..
                } => match outbound.pool.link(*peer, identity, via.as_deref()).await {
                    // Not sent: the body is still here for another endpoint.
                    Err(err) => Err((err, false)),
                    Ok(link) => {
                        mesh_request(&link, &mut parts, &mut body, empty, &uri, target, version)
                            .await
                    }
                },
                Destination::Direct(address) => {
                    let Some(send_body) = take_body(&mut body, empty) else {
                        return Err((anyhow::anyhow!("the request body was already sent"), true));
                    };
                    let http2 = version == Version::HTTP_2;
                    let client = outbound.upstreams.client(*address, http2);
                    let version = if http2 {
                        Version::HTTP_2
                    } else {
                        Version::HTTP_11
                    };
                    let request = outgoing(
                        parts.method.clone(),
                        headers_for_attempt(&mut parts.headers, empty),
                        uri.clone(),
                        version,
                        send_body,
                    );
                    match client.request(request).await {
                        Ok(response) => Ok(response.map(crate::http::boxed)),
                        Err(err) => {
                            // The client took the body even when it could not connect.
                            let sent = !err.is_connect();
                            Err((anyhow::Error::from(err), sent))
                        }
                    }
                }
            }
        };
        let result = match plan.per_try {
            None => attempt.await,
            Some(limit) => match tokio::time::timeout(limit, attempt).await {
                Ok(result) => result,
                Err(_) => Err((anyhow::anyhow!("per-try timeout after {limit:?}"), true)),
            },
        };
        // The endpoint's sidecar could not reach its app (the pod is going
        // away): the request never left, so it may go elsewhere.
        let result = match result {
            Ok(response)
                if matches!(pick.destination, Destination::Mesh { .. })
                    && response.headers().contains_key(NOT_DELIVERED) =>
            {
                Err((
                    anyhow::anyhow!("the endpoint's sidecar could not reach its app"),
                    false,
                ))
            }
            other => other,
        };
        let may_retry = attempts <= plan.retry.attempts;
        match result {
            Ok(mut response) => {
                let status = response.status().as_u16();
                if uid.is_some() {
                    if response.status().is_server_error() {
                        pick.failed(outbound);
                    } else if let Some(uid) = &uid {
                        outbound.load.outliers.success(uid);
                    }
                }
                if may_retry
                    && empty
                    && plan.retry.retries_answer(status, grpc_status(&response))
                    && let Some(retry) = outbound.retry_budget.retry()
                {
                    tracing::debug!(%service, status, "retrying an answer the route retries");
                    outbound.metrics.retries.inc();
                    _retry = Some(retry);
                    if let Some(uid) = &uid {
                        tried.push(uid.clone());
                    }
                    backoff(plan.retry, attempts).await;
                    continue;
                }
                strip_hop_by_hop(response.headers_mut());
                if outbound.config.access_log.is_some() {
                    response.extensions_mut().insert(access_log::Upstream {
                        cluster: format!("outbound|{}||{service}", plan.target.port),
                        host: match &pick.destination {
                            Destination::Mesh { target, .. } => target.to_string(),
                            Destination::Direct(address) => address.to_string(),
                        },
                        workload: uid.as_ref().map(|u| u.to_string()),
                        identity: Some(destination_peer.principal.to_string())
                            .filter(|p| !p.is_empty()),
                    });
                }
                let labels = RequestLabels {
                    traffic: TrafficLabels::new("source", &me, &service, &destination_peer),
                    response_code: status,
                };
                outbound
                    .metrics
                    .request(labels, start.elapsed().as_secs_f64());
                return response;
            }
            Err((err, sent)) => {
                if uid.is_some() {
                    pick.unreachable(outbound, &err, &mut tried);
                }
                if !sent {
                    outbound.metrics.upstream_connect_failures.inc();
                }
                // A body already handed over cannot be sent again.
                let again = if sent {
                    replayable
                } else {
                    body.is_some() || empty
                };
                if again
                    && may_retry
                    && plan.retry.retries_failure(sent)
                    && let Some(retry) = outbound.retry_budget.retry()
                {
                    tracing::debug!(%service, "retrying on another endpoint: {err:#}");
                    outbound.metrics.retries.inc();
                    _retry = Some(retry);
                    if sent {
                        backoff(plan.retry, attempts).await;
                    }
                    continue;
                }
                tracing::debug!(%service, "request failed: {err:#}");
                let code = if sent {
                    StatusCode::BAD_GATEWAY
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                let labels = RequestLabels {
                    traffic: TrafficLabels::new("source", &me, &service, &destination_peer),
                    response_code: code.as_u16(),
                };
                outbound
                    .metrics
                    .request(labels, start.elapsed().as_secs_f64());
                return error(code, "upstream connect error or disconnect before headers");
            }
        }
    }
}

/// One attempt on an HTTP/2 link: the request with weft's headers for
/// the peer sidecar, its body sent once.
async fn mesh_request(
    link: &crate::link::Link,
    parts: &mut http::request::Parts,
    body: &mut Option<Body>,
    empty: bool,
    uri: &http::Uri,
    target: &std::net::SocketAddr,
    version: Version,
) -> Result<Response<Body>, (anyhow::Error, bool)> {
    let Some(send_body) = take_body(body, empty) else {
        return Err((anyhow::anyhow!("the request body was already sent"), true));
    };
    let mut request = outgoing(
        parts.method.clone(),
        headers_for_attempt(&mut parts.headers, empty),
        uri.clone(),
        Version::HTTP_2,
        send_body,
    );
    let headers = request.headers_mut();
    headers.insert(TARGET, crate::http::target_value(target));
    headers.insert(
        APP_PROTOCOL,
        HeaderValue::from_static(version_name(version)),
    );
    link.request(request)
        .await
        .map_err(|failure| (failure.error, failure.sent))
}

/// Waits before a retry: the policy's base, doubled per attempt, with
/// jitter (Envoy's scheme), capped at ten times the base.
async fn backoff(retry: &Retry, attempt: u32) {
    let base = retry.backoff.as_millis() as u64;
    let cap = base * 10;
    let upper = (base << attempt.saturating_sub(1).min(8)).min(cap).max(1);
    let wait = rand::random_range(0..=upper);
    tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
}

/// The headers an attempt sends: cloned while another attempt may follow
/// (a request without a body), moved when none can (a body, once handed
/// over, cannot be sent again), since a header value's clone can allocate.
fn headers_for_attempt(headers: &mut http::HeaderMap, empty: bool) -> http::HeaderMap {
    if empty {
        headers.clone()
    } else {
        std::mem::take(headers)
    }
}

/// The body for one attempt: an empty one for requests without one, else
/// the request's own, once.
fn take_body(body: &mut Option<Body>, empty: bool) -> Option<Body> {
    if empty {
        Some(crate::http::empty())
    } else {
        body.take()
    }
}

/// Sends an upgrade request to an endpoint of `host:port` and, on 101,
/// joins the client's connection to the endpoint's.
async fn upgrade(
    outbound: &Arc<Outbound>,
    host: &str,
    port: u16,
    authority: &str,
    request: Request<Body>,
) -> Response<Body> {
    let start = Instant::now();
    let (pick, stream) = match outbound.connect_tcp(host, port, bytes::Bytes::new()).await {
        Ok(connected) => connected,
        Err(err) => return error(StatusCode::SERVICE_UNAVAILABLE, &format!("{err:#}")),
    };
    let (response, joined) = match crate::upgrade::relay(stream, authority, request).await {
        // weft's own header, for sidecars: not the client's business.
        Ok((mut response, joined)) => {
            response.headers_mut().remove(NOT_DELIVERED);
            (response, joined)
        }
        Err(err) => return error(StatusCode::BAD_GATEWAY, &err),
    };
    let destination = pick.workload.as_deref().map(Peer::of).unwrap_or_default();
    let labels = RequestLabels {
        traffic: TrafficLabels::new("source", &outbound.me(), &pick.service_name(), &destination),
        response_code: response.status().as_u16(),
    };
    outbound
        .metrics
        .request(labels.clone(), start.elapsed().as_secs_f64());
    if let Some(joined) = joined {
        let metrics = outbound.metrics.clone();
        let labels = labels.traffic;
        metrics.tcp_opened.get_or_create(&labels).inc();
        crate::task::spawn(async move {
            // Holds the endpoint's in-flight count while the upgraded
            // connection lives.
            let _pick = pick;
            let (sent, received) = joined.await;
            metrics.tcp(&labels, sent, received);
        });
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorities_split_into_host_and_port() {
        assert_eq!(
            split_host_port("echo.demo:8080"),
            Some(("echo.demo".into(), 8080))
        );
        assert_eq!(split_host_port("echo.demo"), Some(("echo.demo".into(), 80)));
        assert_eq!(split_host_port("[::1]:81"), Some(("::1".into(), 81)));
        assert_eq!(split_host_port("10.0.0.1:x").map(|h| h.1), Some(80));
    }

    #[test]
    fn the_budget_caps_retries() {
        let budget = RetryBudget::default();
        let _requests: Vec<_> = (0..20).map(|_| budget.request()).collect();
        let held: Vec<_> = (0..10).map_while(|_| budget.retry()).collect();
        assert_eq!(held.len(), 10, "the floor of ten");
        assert!(budget.retry().is_none());
        drop(held);
        assert!(budget.retry().is_some());
    }
}
