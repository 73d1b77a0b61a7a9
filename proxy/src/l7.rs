//! HTTP through the mesh. On the client side each request is routed on
//! its own: an endpoint is chosen per request, and the request travels to
//! the endpoint's sidecar as an HTTP/2 request on a pooled mTLS connection
//! (HTTP/1.1 included: the far side restores it for the application). A
//! request that failed before reaching the application (its endpoint's
//! sidecar could not be reached) is retried on another endpoint, within a
//! budget; idempotent requests without a body also when the mesh
//! connection failed under them. Endpoints that fail or answer 5xx feed
//! outlier detection.
//!
//! On the server side the request goes to the application over keep-alive
//! connections, with the caller's proven SPIFFE ID in `x-weft-peer-identity`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use weft_certs::Identity;

use crate::hbone::Inbound;
use crate::http::{
    APP_PROTOCOL, Body, NOT_DELIVERED, PEER_IDENTITY, TARGET, error, idempotent, set_peer_identity,
    strip_hop_by_hop,
};
use crate::metrics::{Peer, RequestLabels, TrafficLabels};
use crate::outbound::{Destination, Outbound};
use crate::resources::Name;

/// Attempts after the first.
const MAX_RETRIES: usize = 2;
/// The largest request head accepted from an application (how long it may
/// take to arrive is `Outbound::head_timeout`).
const MAX_HEAD: usize = 64 * 1024;

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

/// Serves HTTP/1.1 or HTTP/2 (prior knowledge) from an application
/// connection, routing each request.
pub async fn serve_outbound<S>(outbound: std::sync::Arc<Outbound>, io: S, route: Route)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let drain = outbound.drain.clone();
    let head_timeout = outbound.head_timeout;
    let service = hyper::service::service_fn(move |request| {
        let (outbound, route) = (outbound.clone(), route.clone());
        async move { Ok::<_, Infallible>(forward(&outbound, &route, request).await) }
    });
    drain
        .serve(server(head_timeout).serve_connection_with_upgrades(TokioIo::new(io), service))
        .await;
}

/// An HTTP server for connections from callers: a slow or oversized
/// request head must not hold a connection or memory for long (slowloris).
pub(crate) fn server(
    head_timeout: Duration,
) -> hyper_util::server::conn::auto::Builder<crate::task::Executor> {
    let mut builder = hyper_util::server::conn::auto::Builder::new(crate::task::Executor);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(head_timeout)
        .max_buf_size(MAX_HEAD);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD as u32);
    builder
}

fn authority_of(request: &Request<Incoming>) -> Option<String> {
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

/// The request to send on: same method and headers, a new URI and body.
fn outgoing(parts: &Parts, uri: Uri, version: Version, body: Body) -> Request<Body> {
    let mut request = Request::new(body);
    *request.method_mut() = parts.method.clone();
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = parts.headers.clone();
    request
}

fn absolute(authority: &str, parts: &Parts) -> Option<Uri> {
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
        .ok()
}

fn version_name(version: Version) -> &'static str {
    if version == Version::HTTP_2 {
        "h2"
    } else {
        "http/1.1"
    }
}

/// Routes one request from the application.
pub async fn forward(
    outbound: &Outbound,
    route: &Route,
    request: Request<Incoming>,
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
    if outbound.upgrades.requested(&request) {
        return crate::upgrade::forward(outbound, &host, port, &authority, request).await;
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
    let Some(uri) = absolute(&authority, &parts) else {
        return error(
            StatusCode::BAD_REQUEST,
            "the request's authority is not valid",
        );
    };
    let replayable = idempotent(&parts.method) && body.is_end_stream();
    let mut body = Some(body.boxed());
    let mut tried: Vec<Name> = Vec::new();
    let mut _retry = None;
    let me = outbound.me();
    loop {
        let pick = match outbound.pick(&host, port, &tried) {
            Ok(pick) => pick,
            Err(err) => return error(StatusCode::SERVICE_UNAVAILABLE, &format!("{err:#}")),
        };
        let service = pick.service_name();
        let destination_peer = pick.workload.as_deref().map(Peer::of).unwrap_or_default();
        let uid = pick.workload.as_ref().map(|w| w.uid.clone());
        let result = match &pick.destination {
            Destination::Mesh {
                peer,
                identity,
                target,
                ..
            } => match outbound.pool.sender(*peer, identity).await {
                // Not sent: the body is still here for another endpoint.
                Err(err) => Err((err, false)),
                Ok(mut sender) => {
                    let Some(send_body) = take_body(&mut body, replayable) else {
                        return error(StatusCode::BAD_GATEWAY, "the request body was already sent");
                    };
                    let mut request = outgoing(&parts, uri.clone(), Version::HTTP_2, send_body);
                    let headers = request.headers_mut();
                    if let Ok(value) = HeaderValue::from_str(&target.to_string()) {
                        headers.insert(TARGET, value);
                    }
                    headers.insert(
                        APP_PROTOCOL,
                        HeaderValue::from_static(version_name(version)),
                    );
                    sender
                        .send_request(request)
                        .await
                        .map_err(|err| (anyhow::Error::from(err), true))
                }
            },
            Destination::Direct(address) => {
                let Some(send_body) = take_body(&mut body, replayable) else {
                    return error(StatusCode::BAD_GATEWAY, "the request body was already sent");
                };
                let http2 = version == Version::HTTP_2;
                let client = outbound.upstreams.client(*address, http2);
                let version = if http2 {
                    Version::HTTP_2
                } else {
                    Version::HTTP_11
                };
                let request = outgoing(&parts, uri.clone(), version, send_body);
                client.request(request).await.map_err(|err| {
                    // The client took the body even when it could not connect.
                    let sent = !err.is_connect();
                    (anyhow::Error::from(err), sent)
                })
            }
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
                    true,
                ))
            }
            other => other,
        };
        match result {
            Ok(mut response) => {
                if let Some(uid) = &uid {
                    if response.status().is_server_error() {
                        outbound.load.outliers.failure(uid);
                    } else {
                        outbound.load.outliers.success(uid);
                    }
                }
                strip_hop_by_hop(response.headers_mut());
                let labels = RequestLabels {
                    traffic: TrafficLabels::new("source", &me, &service, &destination_peer),
                    response_code: response.status().as_u16(),
                };
                outbound
                    .metrics
                    .request(labels, start.elapsed().as_secs_f64());
                return response.map(|b| b.boxed());
            }
            Err((err, sent)) => {
                if let Some(uid) = &uid {
                    outbound.load.outliers.failure(uid);
                    tried.push(uid.clone());
                }
                if !sent {
                    outbound.metrics.upstream_connect_failures.inc();
                }
                // A body already handed over cannot be sent again.
                let again = replayable || body.is_some();
                if again
                    && tried.len() <= MAX_RETRIES
                    && let Some(retry) = outbound.retry_budget.retry()
                {
                    tracing::debug!(%service, "retrying on another endpoint: {err:#}");
                    outbound.metrics.retries.inc();
                    _retry = Some(retry);
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

/// The body for one attempt: an empty one for replayable requests (they
/// have none), else the request's own, once.
fn take_body(body: &mut Option<Body>, replayable: bool) -> Option<Body> {
    if replayable {
        Some(crate::http::empty())
    } else {
        body.take()
    }
}

/// A mesh HTTP request arriving on 15008, for the application.
pub async fn inbound(
    inbound: &Inbound,
    peer: &Option<Identity>,
    request: Request<Incoming>,
) -> Response<Body> {
    let target = request
        .headers()
        .get(TARGET)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<SocketAddr>().ok());
    let Some(target) = target else {
        return error(
            StatusCode::BAD_REQUEST,
            "a mesh request needs x-weft-target",
        );
    };
    let http2 = request
        .headers()
        .get(APP_PROTOCOL)
        .is_some_and(|v| v.as_bytes() == b"h2");
    to_app(inbound, peer, target, http2, request).await
}

/// A request from `peer` for the application at `target` (a mesh request,
/// or HTTP inside a tunnel), spoken to it in HTTP/2 or HTTP/1.1.
pub(crate) async fn to_app(
    inbound: &Inbound,
    peer: &Option<Identity>,
    target: SocketAddr,
    http2: bool,
    request: Request<Incoming>,
) -> Response<Body> {
    let start = Instant::now();
    if !inbound.local_addresses.contains(&target.ip()) {
        tracing::warn!(%target, caller = ?peer, "refused a request for an address that is not this pod's");
        return error(StatusCode::FORBIDDEN, "not this pod's address");
    }
    let (mut parts, body) = request.into_parts();
    parts.headers.remove(TARGET);
    parts.headers.remove(APP_PROTOCOL);
    strip_hop_by_hop(&mut parts.headers);
    set_peer_identity(&mut parts.headers, peer.as_ref());
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .unwrap_or_else(|| target.to_string());
    let Some(uri) = absolute(&authority, &parts) else {
        return error(
            StatusCode::BAD_REQUEST,
            "the request's authority is not valid",
        );
    };
    let version = if http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let request = outgoing(&parts, uri, version, body.boxed());
    inbound.count_caller(peer);
    let caller = crate::hbone::caller(peer);
    let me = inbound.me();
    let response = match inbound.app.client(target, http2).request(request).await {
        Ok(mut response) => {
            strip_hop_by_hop(response.headers_mut());
            response.headers_mut().remove(NOT_DELIVERED);
            response.map(|b| b.boxed())
        }
        Err(err) => {
            tracing::debug!(%target, "the application did not answer: {err:#}");
            let mut response = error(StatusCode::BAD_GATEWAY, "the application did not answer");
            if err.is_connect() {
                response
                    .headers_mut()
                    .insert(NOT_DELIVERED, HeaderValue::from_static("1"));
            }
            response
        }
    };
    let labels = RequestLabels {
        traffic: TrafficLabels::new("destination", &caller, &"".into(), &me),
        response_code: response.status().as_u16(),
    };
    inbound
        .metrics
        .request(labels, start.elapsed().as_secs_f64());
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
