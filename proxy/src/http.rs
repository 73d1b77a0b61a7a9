//! What every HTTP path of the sidecar shares: the body type that carries
//! requests and responses across hyper's client and server halves, the
//! headers weft adds between sidecars, the hop-by-hop headers that must
//! not cross a proxy, the server builder for callers' connections, and
//! the loop for the small local HTTP ports.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioTimer;

use crate::drain::Drain;

/// Bodies stream through the proxy; they are never buffered whole.
pub type Body = http_body_util::combinators::BoxBody<Bytes, BodyError>;
/// Why a body stopped: hyper's errors and the mesh link's (h2) alike. A
/// type of its own, not a bare `Box<dyn Error>`, which hyper's bounds on
/// body errors trip over inside spawned futures.
#[derive(Debug)]
pub struct BodyError(Box<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for BodyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

impl From<hyper::Error> for BodyError {
    fn from(error: hyper::Error) -> Self {
        BodyError(error.into())
    }
}

impl From<h2::Error> for BodyError {
    fn from(error: h2::Error) -> Self {
        BodyError(error.into())
    }
}

impl From<std::io::Error> for BodyError {
    fn from(error: std::io::Error) -> Self {
        BodyError(error.into())
    }
}

impl From<crate::h1_codec::WireError> for BodyError {
    fn from(error: crate::h1_codec::WireError) -> Self {
        BodyError(error.into())
    }
}

impl From<std::convert::Infallible> for BodyError {
    fn from(never: std::convert::Infallible) -> Self {
        match never {}
    }
}

/// A received body, boxed as every body the proxy passes on is.
pub fn boxed<B>(body: B) -> Body
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BodyError>,
{
    body.map_err(body_error::<B::Error>).boxed()
}

fn body_error<E: Into<BodyError>>(error: E) -> BodyError {
    error.into()
}

/// Set by the client sidecar on mesh HTTP requests: the `ip:port` of the
/// application behind the peer sidecar (the L7 twin of CONNECT's authority).
pub const TARGET: HeaderName = HeaderName::from_static("x-weft-target");

/// `target` as `TARGET`'s value, formatted on the stack: `to_string`
/// would grow a `String` three times, on every request.
pub fn target_value(target: &std::net::SocketAddr) -> HeaderValue {
    use std::io::Write as _;
    // The longest address, `[v6%scope]:port`, is 58 bytes.
    let mut text = [0u8; 64];
    let mut rest = &mut text[..];
    let length = match write!(rest, "{target}") {
        Ok(()) => 64 - rest.len(),
        Err(_) => 0,
    };
    // An address's text is always a valid value.
    HeaderValue::from_bytes(&text[..length]).unwrap_or(HeaderValue::from_static(""))
}
/// Set by the client sidecar: the HTTP version the application spoke
/// (`http/1.1` or `h2`), so the far side restores it for the server app.
pub const APP_PROTOCOL: HeaderName = HeaderName::from_static("x-weft-app-protocol");
/// Set by the server sidecar for the application: the caller's SPIFFE ID,
/// proven by its mTLS certificate. Any value a client sent is replaced.
pub const PEER_IDENTITY: HeaderName = HeaderName::from_static("x-weft-peer-identity");

/// Set by the server sidecar on its own error answer when the request never
/// reached the app (it could not connect: the pod is going away), so the
/// client sidecar may send it to another endpoint. Removed from every
/// answer the app itself gives.
pub const NOT_DELIVERED: HeaderName = HeaderName::from_static("x-weft-not-delivered");

/// Says who called, as the mesh proved it (the SPIFFE ID, as
/// `Caller::identity_header` has it): whatever identity header the
/// caller wrote is dropped first, so the app can trust the header whenever
/// it is present.
pub fn set_peer_identity(headers: &mut HeaderMap, peer: Option<&HeaderValue>) {
    headers.remove(PEER_IDENTITY);
    if let Some(identity) = peer {
        headers.insert(PEER_IDENTITY, identity.clone());
    }
}

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// All of `body`'s data, its trailers dropped. A body of one frame, as a
/// small one usually is, is that frame, uncopied.
pub async fn whole(mut body: Body) -> Result<Bytes, BodyError> {
    let mut first = Bytes::new();
    let mut joined: Option<bytes::BytesMut> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        if data.is_empty() {
            continue;
        }
        match &mut joined {
            None if first.is_empty() => first = data,
            None => {
                let mut both = bytes::BytesMut::with_capacity(first.len() + data.len());
                both.extend_from_slice(&first);
                both.extend_from_slice(&data);
                joined = Some(both);
            }
            Some(joined) => joined.extend_from_slice(&data),
        }
    }
    Ok(joined.map_or(first, bytes::BytesMut::freeze))
}

/// A response the proxy itself makes, with a one-line reason the caller
/// can read and an `x-weft-error` header that says it came from weft and
/// not from the application.
pub fn error(status: StatusCode, reason: &str) -> Response<Body> {
    let mut response = Response::new(full(format!("{reason}\n")));
    *response.status_mut() = status;
    if let Ok(value) = HeaderValue::from_str(reason) {
        response
            .headers_mut()
            .insert(HeaderName::from_static("x-weft-error"), value);
    }
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Headers that describe one connection, not the message (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    header::PROXY_AUTHORIZATION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
];

/// Removes `HOP_BY_HOP`'s headers, any the `connection` header names, and
/// a `te` other than `trailers`. HTTP/2 forbids them outright.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Most messages carry none: one pass comparing names is cheaper than
    // the lookups below, each a hash.
    if !headers
        .keys()
        .any(|name| *name == header::TE || HOP_BY_HOP.contains(name))
    {
        return;
    }
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    // `te: trailers` is how gRPC says it understands trailers; HTTP/2
    // allows exactly that value and nothing else.
    if headers
        .get(header::TE)
        .is_some_and(|v| !v.as_bytes().eq_ignore_ascii_case(b"trailers"))
    {
        headers.remove(header::TE);
    }
}

/// Methods whose requests may be sent again after a failure that happened
/// before the application saw them (RFC 9110 9.2.2).
pub fn idempotent(method: &http::Method) -> bool {
    use http::Method;
    [
        Method::GET,
        Method::HEAD,
        Method::OPTIONS,
        Method::TRACE,
        Method::PUT,
        Method::DELETE,
    ]
    .contains(method)
}

/// How long a caller may take to send a whole request head, from its
/// first byte (slowloris), unless configured otherwise.
pub const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The largest request head accepted from a caller (how long it may take
/// to arrive is each listener's head timeout).
const MAX_HEAD: usize = 64 * 1024;

/// An HTTP server (HTTP/1.1 or HTTP/2 by prior knowledge) for connections
/// from callers: a slow or oversized request head must not hold a
/// connection or memory for long (slowloris).
pub fn server(
    head_timeout: std::time::Duration,
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

/// A response with only a status, for answers that need no reason.
pub fn status(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(empty());
    *response.status_mut() = code;
    response
}

/// The request to send on: the received method and headers (moved: a
/// caller that may send again clones them first, and a header value's
/// clone can allocate), a new URI and body.
pub fn outgoing(
    method: Method,
    headers: HeaderMap,
    uri: Uri,
    version: Version,
    body: Body,
) -> Request<Body> {
    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.version_mut() = version;
    *request.headers_mut() = headers;
    request
}

/// The absolute `http://` URI for a request to `authority`, keeping its
/// path and query.
pub fn absolute(authority: &str, parts: &Parts) -> Option<Uri> {
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

/// Serves plain HTTP/1.1 on `listener` with `handle`, for the sidecar's
/// small local ports (admin, metrics, health, app probes): a request head
/// must arrive within 10 s. Runs until the task is aborted.
pub async fn serve_http1<F, Fut>(listener: tokio::net::TcpListener, handle: F)
where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    // Never drained: these ports answer until the process exits.
    crate::serve::accept(listener, Drain::default(), move |tcp, _| {
        let handle = handle.clone();
        async move {
            let service = hyper::service::service_fn(move |request| {
                let handle = handle.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(std::time::Duration::from_secs(10))
                .timer(TokioTimer::new())
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                .await;
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::body::Frame;

    #[tokio::test]
    async fn a_whole_body_is_its_one_frame_or_all_its_frames_joined() {
        let body = |frames: Vec<Frame<Bytes>>| {
            let frames = frames.into_iter().map(Ok::<_, std::convert::Infallible>);
            boxed(http_body_util::StreamBody::new(tokio_stream::iter(frames)))
        };
        let one = Bytes::from(vec![7u8; 1024]);
        let mut trailers = HeaderMap::new();
        trailers.insert("x-sum", HeaderValue::from_static("7"));
        let got = whole(body(vec![
            Frame::data(one.clone()),
            Frame::trailers(trailers),
        ]))
        .await
        .unwrap();
        assert_eq!(got, one);
        assert_eq!(got.as_ptr(), one.as_ptr(), "one frame is not copied");
        let pieces = ["ab", "", "cd", "e"].map(|p| Frame::data(Bytes::from_static(p.as_bytes())));
        assert_eq!(whole(body(pieces.into())).await.unwrap(), "abcde");
        assert_eq!(whole(body(vec![])).await.unwrap(), "");
        assert_eq!(whole(empty()).await.unwrap(), "");
    }

    #[test]
    fn a_target_is_written_whole_up_to_the_longest_address() {
        for target in [
            "10.1.2.3:8080",
            "[::1]:80",
            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535",
        ] {
            let address: std::net::SocketAddr = match target.parse() {
                Ok(address) => address,
                // `SocketAddr` parses no scope; build the longest by hand.
                Err(_) => std::net::SocketAddr::V6(std::net::SocketAddrV6::new(
                    std::net::Ipv6Addr::from(u128::MAX),
                    65535,
                    0,
                    u32::MAX,
                )),
            };
            assert_eq!(target_value(&address), address.to_string().as_str());
            assert_eq!(target_value(&address), target);
        }
    }

    #[test]
    fn hop_by_hop_headers_do_not_cross() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        headers.insert(header::TE, HeaderValue::from_static("gzip"));
        headers.insert("x-kept", HeaderValue::from_static("yes"));
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers.len(), 1, "{headers:?}");
        assert!(headers.contains_key("x-kept"));

        let mut grpc = HeaderMap::new();
        grpc.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut grpc);
        assert!(
            grpc.contains_key(header::TE),
            "gRPC's te: trailers must survive"
        );
    }

    #[test]
    fn errors_say_they_come_from_the_proxy() {
        let response = error(StatusCode::SERVICE_UNAVAILABLE, "no healthy endpoint");
        assert_eq!(response.status(), 503);
        assert_eq!(response.headers()["x-weft-error"], "no healthy endpoint");
    }
}
