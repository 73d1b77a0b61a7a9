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

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::{Destination, Outbound};
use crate::http::{
    APP_PROTOCOL, Body, NOT_DELIVERED, PEER_IDENTITY, TARGET, absolute, error, idempotent,
    outgoing, strip_hop_by_hop,
};
use crate::metrics::{Peer, RequestLabels, TrafficLabels};
use crate::resources::Name;

/// Attempts after the first.
const MAX_RETRIES: usize = 2;

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
pub(super) async fn serve<S>(outbound: Arc<Outbound>, io: S, route: Route)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let drain = outbound.drain.clone();
    let server = crate::http::server(outbound.config.head_timeout);
    let service = hyper::service::service_fn(move |request| {
        let (outbound, route) = (outbound.clone(), route.clone());
        async move { Ok::<_, Infallible>(forward(&outbound, &route, request).await) }
    });
    drain
        .serve(server.serve_connection_with_upgrades(TokioIo::new(io), service))
        .await;
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

/// Sends an upgrade request to an endpoint of `host:port` and, on 101,
/// joins the client's connection to the endpoint's.
async fn upgrade(
    outbound: &Outbound,
    host: &str,
    port: u16,
    authority: &str,
    request: Request<Incoming>,
) -> Response<Body> {
    let start = Instant::now();
    let (pick, stream) = match outbound.connect_tcp(host, port).await {
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
