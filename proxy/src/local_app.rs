//! The application behind this sidecar, and the one way anything reaches
//! it: mesh requests and tunnels arriving on 15008 (`inbound`) and
//! plaintext redirected to 15006 (`inbound_passthrough`) are delivered
//! here alike. Only this pod's own addresses are delivered to, so the
//! sidecar cannot be used to reach other hosts. The identity the app is
//! told of (`x-weft-peer-identity`) is only ever the one a certificate
//! proved; whatever a caller wrote there is dropped. Every failure is an
//! `Undelivered`, turned into the caller's answer in one place.
//!
//! A connection is relayed byte for byte when the port is declared TCP
//! or the app speaks first. Otherwise the caller's first bytes are looked
//! at, and HTTP is served request by request: relayed as bytes, a request
//! would reach the app with whatever identity header the caller wrote.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::HeaderValue;
use http::{Request, Response, StatusCode, Version};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use weft_certs::Identity;

use crate::authorization::{HttpAttributes, InboundPolicy, normalize_path};
use crate::authorize::{self, Caller};
use crate::drain::Drain;
use crate::h1_codec::Speaker;
use crate::h1_link::{Connection, Links};
use crate::http::{
    APP_PROTOCOL, Body, HEAD_TIMEOUT, NOT_DELIVERED, TARGET, absolute, error, outgoing,
    set_peer_identity, strip_hop_by_hop,
};
use crate::metrics::{Metrics, Peer, RequestLabels, TrafficLabels};
use crate::name::Name;
use crate::pool::CONNECT_TIMEOUT;
use crate::sniff::{Protocol, Rewind, declared, sniff_within};
use crate::upgrade::Upgrades;
use crate::upstream::Upstreams;
use crate::xds::XdsState;

/// How the app is reached, read once from the sidecar's configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// The pod's own addresses: nothing else is delivered to.
    pub addresses: Vec<IpAddr>,
    /// How long a request head from a caller may take to arrive.
    pub head_timeout: Duration,
    /// How long connecting to the app may take.
    pub connect_timeout: Duration,
    /// Upgrades relayed to the app; others become plain requests.
    pub upgrades: Upgrades,
    /// Where each request is logged, when it is.
    pub access_log: Option<Arc<crate::access_log::AccessLog>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            addresses: Vec::new(),
            head_timeout: HEAD_TIMEOUT,
            connect_timeout: CONNECT_TIMEOUT,
            upgrades: Upgrades::default(),
            access_log: None,
        }
    }
}

/// Why something meant for the app did not reach it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Undelivered {
    /// The caller named no `ip:port` target.
    NoTarget,
    /// The target is not one of this pod's addresses.
    NotLocal,
    /// The request's authority cannot be written as a URI.
    BadAuthority,
    /// The app could not be connected to: nothing reached it, so the
    /// caller's sidecar may send the request to another endpoint.
    Unreachable,
    /// The app took the request but gave no answer.
    NoAnswer,
    /// The app closed the connection without answering a request that
    /// may be sent again (idempotent, no body): most often a keep-alive
    /// connection it closed as it shut down, just as the request went
    /// out on it. The caller's sidecar may send it to another endpoint.
    Dropped,
}

impl Undelivered {
    /// Why a request got no answer from the app: it could not be
    /// connected to, or it dropped the request, which the caller may send
    /// elsewhere only if it is `replayable`.
    fn unanswered(connect_failed: bool, replayable: bool) -> Undelivered {
        if connect_failed {
            Undelivered::Unreachable
        } else if replayable {
            Undelivered::Dropped
        } else {
            Undelivered::NoAnswer
        }
    }

    /// The caller's answer: weft's own error, with `x-weft-not-delivered`
    /// when the request may safely go elsewhere.
    pub fn respond(self) -> Response<Body> {
        let (code, reason) = match self {
            Undelivered::NoTarget => (
                StatusCode::BAD_REQUEST,
                "a mesh request needs an ip:port target",
            ),
            Undelivered::NotLocal => (StatusCode::FORBIDDEN, "not this pod's address"),
            Undelivered::BadAuthority => (
                StatusCode::BAD_REQUEST,
                "the request's authority is not valid",
            ),
            Undelivered::Unreachable | Undelivered::NoAnswer => {
                (StatusCode::BAD_GATEWAY, "the application did not answer")
            }
            Undelivered::Dropped => (
                StatusCode::BAD_GATEWAY,
                "the application closed the connection without answering",
            ),
        };
        let mut response = error(code, reason);
        if matches!(self, Undelivered::Unreachable | Undelivered::Dropped) {
            response
                .headers_mut()
                .insert(NOT_DELIVERED, HeaderValue::from_static("1"));
        }
        response
    }
}

/// The app behind this sidecar: its configuration, keep-alive clients to
/// it, the mesh view (to name this pod in metrics and learn declared
/// protocols), metrics and the drain.
pub struct LocalApp {
    config: Config,
    clients: Upstreams,
    /// Idle connections to the app, for weft's own HTTP/1.1 codec.
    apps: Links,
    xds: Option<Arc<XdsState>>,
    metrics: Arc<Metrics>,
    drain: Drain,
}

impl LocalApp {
    pub fn new(
        config: Config,
        xds: Option<Arc<XdsState>>,
        metrics: Arc<Metrics>,
        drain: Drain,
    ) -> Self {
        LocalApp {
            clients: Upstreams::new(config.connect_timeout),
            apps: Links::new(Speaker::App),
            config,
            xds,
            metrics,
            drain,
        }
    }

    /// The app at `addresses`, with defaults for the rest and no mesh
    /// view (tools and tests).
    pub fn at(addresses: Vec<IpAddr>) -> Self {
        let config = Config {
            addresses,
            ..Config::default()
        };
        LocalApp::new(config, None, Arc::default(), Drain::default())
    }

    /// How long a request head from a caller may take to arrive.
    pub fn head_timeout(&self) -> std::time::Duration {
        self.config.head_timeout
    }

    pub fn drain(&self) -> &Drain {
        &self.drain
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether `ip` is one of this pod's addresses.
    pub fn is_local(&self, ip: IpAddr) -> bool {
        self.config.addresses.contains(&ip)
    }

    /// This pod as a metrics peer.
    pub fn me(&self) -> Peer {
        self.xds
            .as_ref()
            .and_then(|xds| {
                let snapshot = xds.snapshot.load();
                self.config
                    .addresses
                    .iter()
                    .find_map(|ip| snapshot.workload_by_ip(*ip).map(|w| Peer::of(w)))
            })
            .unwrap_or_default()
    }

    /// Refuses a target that is not this pod's, saying so in the log.
    fn admit(&self, target: SocketAddr, peer: Option<&Identity>) -> Result<(), Undelivered> {
        if self.is_local(target.ip()) {
            return Ok(());
        }
        tracing::warn!(%target, caller = ?peer, "refused delivery to an address that is not this pod's");
        Err(Undelivered::NotLocal)
    }

    /// A connection to the app at `target`, which must be this pod's.
    pub async fn connect(
        &self,
        target: SocketAddr,
        caller: &Caller,
    ) -> Result<TcpStream, Undelivered> {
        self.dial(target, caller.identity()).await
    }

    async fn dial(
        &self,
        target: SocketAddr,
        peer: Option<&Identity>,
    ) -> Result<TcpStream, Undelivered> {
        self.admit(target, peer)?;
        let app = tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(target))
            .await
            .map_err(|_| Undelivered::Unreachable)?
            .map_err(|_| Undelivered::Unreachable)?;
        let _ = app.set_nodelay(true);
        Ok(app)
    }

    /// Delivers one client connection to the app at `target` (already
    /// connected as `app`): relayed as bytes if the port is declared TCP
    /// or the app speaks first (and authorization allows the connection,
    /// now and after each policy change), else served as HTTP with
    /// `caller` as the caller the app is told of.
    pub async fn carry<C>(
        self: Arc<Self>,
        caller: Caller,
        target: SocketAddr,
        mut client: C,
        mut app: TcpStream,
    ) where
        C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (protocol, seen) = if self.declared_tcp(target) {
            (Protocol::Tcp, Bytes::new())
        } else {
            // The app speaking first settles it: not HTTP. A caller that
            // stalls inside a request line is cut off, not relayed.
            let app_speaks = async {
                let _ = app.readable().await;
            };
            match sniff_within(&mut client, app_speaks, Some(self.config.head_timeout)).await {
                Some(decided) => decided,
                None => {
                    tracing::debug!(%target, "a caller stalled inside a request line; closed");
                    return;
                }
            }
        };
        let mut client = Rewind::new(seen, client);
        if protocol == Protocol::Tcp {
            let labels = self.labels(&caller);
            if !self.authorize_connection(&caller, target, &labels) {
                return;
            }
            self.metrics.tcp_opened.get_or_create(&labels).inc();
            let mut changes = self.xds.as_ref().map(|xds| xds.changes.subscribe());
            let relay = tokio::io::copy_bidirectional(&mut client, &mut app);
            tokio::pin!(relay);
            let (received, sent) = loop {
                let changed = async {
                    match changes.as_mut() {
                        Some(changes) => changes.changed().await.is_ok(),
                        None => std::future::pending().await,
                    }
                };
                tokio::select! {
                    done = &mut relay => break done.unwrap_or((0, 0)),
                    alive = changed => {
                        if !alive {
                            changes = None;
                        } else if !self.authorize_connection(&caller, target, &labels) {
                            // As ztunnel does: a connection the policy now
                            // denies is closed.
                            tracing::info!(%target, caller = ?caller.identity(), "closing a connection that a policy change denies");
                            break (0, 0);
                        }
                    }
                }
            };
            // Seen from the server side: "sent" goes to the app.
            self.metrics.tcp(&labels, received, sent);
            return;
        }
        // HTTP: each request goes to the app as a mesh request does, in
        // the version the caller speaks.
        drop(app);
        let drain = self.drain.clone();
        let server = crate::http::server(self.config.head_timeout);
        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
            let (app, caller) = (self.clone(), caller.clone());
            async move {
                let http2 = request.version() == Version::HTTP_2;
                let request = request.map(crate::http::boxed);
                Ok::<_, Infallible>(app.request(&caller, target, http2, request).await)
            }
        });
        drain
            .serve(server.serve_connection_with_upgrades(TokioIo::new(client), service))
            .await;
    }

    /// Whether a service of this pod declares `target`'s port TCP: then
    /// its bytes are not looked at, whatever they look like.
    fn declared_tcp(&self, target: SocketAddr) -> bool {
        let Some(xds) = &self.xds else {
            return false;
        };
        let snapshot = xds.snapshot.load();
        let Some(workload) = snapshot.workload_by_ip(target.ip()) else {
            return false;
        };
        workload
            .profile
            .services
            .iter()
            .filter_map(|binding| snapshot.service_by_host(&binding.hostname))
            .flat_map(|service| service.ports.iter().map(move |port| (service, port)))
            .filter(|(service, port)| workload.target_port(service, port) == Some(target.port()))
            .any(|(_, port)| declared(port.app_protocol) == Some(Protocol::Tcp))
    }

    /// The PeerAuthentication mode of this pod's `target` port, as the
    /// control plane resolved it; `MtlsUnset` when no policy says.
    pub fn mtls_mode(&self, target: SocketAddr) -> weft_xds_proto::mesh::MtlsMode {
        self.xds
            .as_ref()
            .and_then(|xds| {
                let snapshot = xds.snapshot.load();
                snapshot
                    .workload_by_ip(target.ip())
                    .map(|w| w.profile.inbound_mtls.on(target.port()))
            })
            .unwrap_or_default()
    }

    /// The inbound policy of this pod's address `target`, if any policy
    /// applies to it.
    fn policy(&self, target: SocketAddr) -> Option<Arc<InboundPolicy>> {
        let snapshot = self.xds.as_ref()?.snapshot.load();
        snapshot
            .inbound(target.ip())
            .filter(|policy| !policy.is_empty())
            .cloned()
    }

    /// Whether a TCP connection from `caller` to `target` is allowed.
    /// `labels`: the connection as metrics name it.
    pub fn authorize_connection(
        &self,
        caller: &Caller,
        target: SocketAddr,
        labels: &TrafficLabels,
    ) -> bool {
        let Some(policy) = self.policy(target) else {
            return true;
        };
        let attributes = caller.attributes(target.port(), None);
        let decision = authorize::check(&policy, &attributes, target, &self.metrics, labels);
        if !decision.allowed() {
            tracing::debug!(%target, "connection closed by authorization policy");
        }
        decision.allowed()
    }

    /// Whether an HTTP request is allowed. Under a policy its path is
    /// normalized first (RFC 3986), and the app is sent that form, so
    /// that what was authorized is what the app serves.
    fn authorize_request<B>(
        &self,
        caller: &Caller,
        target: SocketAddr,
        request: &mut Request<B>,
        labels: &TrafficLabels,
    ) -> bool {
        let Some(policy) = self.policy(target) else {
            return true;
        };
        let raw = request.uri().path();
        if let std::borrow::Cow::Owned(normal) = normalize_path(raw) {
            let query = request
                .uri()
                .query()
                .map(|q| format!("?{q}"))
                .unwrap_or_default();
            let mut parts = request.uri().clone().into_parts();
            match format!("{normal}{query}").parse() {
                Ok(path) => parts.path_and_query = Some(path),
                Err(_) => return false,
            }
            match http::Uri::from_parts(parts) {
                Ok(uri) => *request.uri_mut() = uri,
                Err(_) => return false,
            }
        }
        let host = request
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                request
                    .headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or_default();
        let http = HttpAttributes {
            method: request.method().as_str(),
            host,
            path: request.uri().path(),
            headers: request.headers(),
        };
        let attributes = caller.attributes(target.port(), Some(http));
        authorize::check(&policy, &attributes, target, &self.metrics, labels).allowed()
    }

    /// Traffic from `peer` to this pod, as the server side reports it.
    fn labels(&self, caller: &Caller) -> TrafficLabels {
        TrafficLabels::new("destination", caller.peer(), &Name::default(), &self.me())
    }

    /// A mesh HTTP request from `caller`, on either kind of link: its
    /// target is in `x-weft-target`, and the HTTP version the app is
    /// spoken to in `x-weft-app-protocol`.
    pub async fn mesh_request(&self, caller: &Caller, request: Request<Body>) -> Response<Body> {
        let Some(target) = request
            .headers()
            .get(TARGET)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<SocketAddr>().ok())
        else {
            return Undelivered::NoTarget.respond();
        };
        let http2 = request
            .headers()
            .get(APP_PROTOCOL)
            .is_some_and(|v| v.as_bytes() == b"h2");
        self.request(caller, target, http2, request).await
    }

    /// A request from `caller` for the app at `target` (a mesh request, or
    /// HTTP inside a tunnel or from 15006), spoken to it in HTTP/2 or
    /// HTTP/1.1, if authorization allows it. Counted in the request
    /// metrics whatever the outcome.
    pub async fn request(
        &self,
        caller: &Caller,
        target: SocketAddr,
        http2: bool,
        mut request: Request<Body>,
    ) -> Response<Body> {
        let start = Instant::now();
        // This sidecar's span of the request's trace.
        let trace = crate::trace_context::on_request(request.headers_mut());
        let logged = self.config.access_log.as_ref().map(|log| {
            let me = self.me().principal.to_string();
            let entry = crate::access_log::Entry::of(
                "inbound",
                &request,
                trace,
                caller.identity().map(|i| i.to_string()),
                Some(me).filter(|p| !p.is_empty()),
            );
            (log, entry, std::time::SystemTime::now())
        });
        // Named once: for the authorization count and the request metric.
        let traffic = self.labels(caller);
        let response = if !self.authorize_request(caller, target, &mut request, &traffic) {
            Ok(authorize::denied(&request))
        } else if self.config.upgrades.requested(&request) {
            self.upgrade(caller, target, request).await
        } else {
            self.exchange(caller, target, http2, request).await
        };
        let mut response = response.unwrap_or_else(Undelivered::respond);
        let labels = RequestLabels {
            traffic,
            response_code: response.status().as_u16(),
        };
        self.metrics.request(labels, start.elapsed().as_secs_f64());
        match logged {
            None => response,
            Some((log, entry, at)) => {
                response
                    .extensions_mut()
                    .insert(crate::access_log::Upstream {
                        cluster: format!("inbound|{}||", target.port()),
                        host: target.to_string(),
                        workload: None,
                        identity: None,
                    });
                crate::access_log::log_when_done(log, entry, (at, start), response)
            }
        }
    }

    async fn exchange(
        &self,
        caller: &Caller,
        target: SocketAddr,
        http2: bool,
        request: Request<Body>,
    ) -> Result<Response<Body>, Undelivered> {
        self.admit(target, caller.identity())?;
        let (mut parts, body) = request.into_parts();
        parts.headers.remove(TARGET);
        parts.headers.remove(APP_PROTOCOL);
        strip_hop_by_hop(&mut parts.headers);
        set_peer_identity(&mut parts.headers, caller.identity_header());
        // A mesh request arrives in absolute form, which is what the app
        // is sent: kept whole rather than rebuilt (five allocations). One
        // in origin form (a sniffed connection's) gets the target as its
        // authority.
        let uri = if parts.uri.scheme() == Some(&http::uri::Scheme::HTTP)
            && parts.uri.authority().is_some()
        {
            std::mem::take(&mut parts.uri)
        } else {
            let authority = parts
                .uri
                .authority()
                .map(|a| a.as_str().to_string())
                .unwrap_or_else(|| target.to_string());
            absolute(&authority, &parts).ok_or(Undelivered::BadAuthority)?
        };
        let replayable = crate::http::idempotent(&parts.method) && body.is_end_stream();
        // An HTTP/1.1 request whose body is small and of known length
        // (every request an HTTP/1.1 link brings) goes through weft's own
        // codec; HTTP/2, streamed and large bodies through hyper's client.
        if !http2
            && body
                .size_hint()
                .exact()
                .is_some_and(|n| n <= crate::h1_codec::MAX_REQUEST_BODY)
        {
            let whole = match crate::http::whole(body).await {
                Ok(whole) => whole,
                Err(err) => {
                    tracing::debug!(%target, "a request body could not be read: {err}");
                    return Err(Undelivered::NoAnswer);
                }
            };
            let response = self.exchange_h1(target, &parts, &uri, whole, replayable);
            return response.await.map(answered);
        }
        let version = if http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        let request = outgoing(parts.method, parts.headers, uri, version, body);
        match self.clients.client(target, http2).request(request).await {
            Ok(response) => Ok(answered(response.map(crate::http::boxed))),
            Err(err) => {
                tracing::debug!(%target, "the application did not answer: {err:#}");
                Err(Undelivered::unanswered(err.is_connect(), replayable))
            }
        }
    }

    /// One exchange with the app through weft's HTTP/1.1 codec, on a
    /// kept-alive connection when one is idle. One that the app closed
    /// before the request was written is replaced, once: the request
    /// never reached the app; so is one that failed under a request that
    /// may be sent again.
    async fn exchange_h1(
        &self,
        target: SocketAddr,
        parts: &http::request::Parts,
        uri: &http::Uri,
        body: Bytes,
        replayable: bool,
    ) -> Result<Response<Body>, Undelivered> {
        let idle = self.apps.to(target, None);
        let mut kept = idle.take();
        loop {
            let connection = match kept.take() {
                Some(connection) => connection,
                None => Connection::new(self.dial(target, None).await?, &idle),
            };
            let reused = connection.is_reused();
            let answer =
                connection.exchange(&parts.method, uri, &parts.headers, &[], &body, idle.clone());
            match answer.await {
                Ok(response) => return Ok(response),
                // Or closed it as the request went out: a request that
                // may be sent again is, once (as HTTP clients do).
                Err(failure) if reused && (!failure.sent || replayable) => continue,
                Err(failure) => {
                    tracing::debug!(%target, "the application did not answer: {failure}");
                    return Err(Undelivered::unanswered(!failure.sent, replayable));
                }
            }
        }
    }

    /// An upgrade (WebSocket): relayed to the app on its own connection
    /// and joined on 101.
    async fn upgrade(
        &self,
        caller: &Caller,
        target: SocketAddr,
        mut request: Request<Body>,
    ) -> Result<Response<Body>, Undelivered> {
        let peer = caller.identity();
        for own in [TARGET, APP_PROTOCOL] {
            request.headers_mut().remove(own);
        }
        set_peer_identity(request.headers_mut(), caller.identity_header());
        let app = self.dial(target, peer).await?;
        match crate::upgrade::relay(app, &target.to_string(), request).await {
            Ok((mut response, joined)) => {
                response.headers_mut().remove(NOT_DELIVERED);
                if let Some(joined) = joined {
                    crate::task::spawn(joined);
                }
                Ok(response)
            }
            Err(err) => {
                tracing::debug!(%target, "an upgrade to the application failed: {err}");
                Err(Undelivered::NoAnswer)
            }
        }
    }
}

/// The app's answer as it leaves for the caller: no hop-by-hop headers,
/// and never weft's own word that the request was not delivered.
fn answered(mut response: Response<Body>) -> Response<Body> {
    strip_hop_by_hop(response.headers_mut());
    response.headers_mut().remove(NOT_DELIVERED);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt as _;

    #[test]
    fn each_refusal_has_its_answer_and_only_unreached_may_go_elsewhere() {
        let table = [
            (Undelivered::NoTarget, 400, false),
            (Undelivered::NotLocal, 403, false),
            (Undelivered::BadAuthority, 400, false),
            (Undelivered::Unreachable, 502, true),
            (Undelivered::NoAnswer, 502, false),
            (Undelivered::Dropped, 502, true),
        ];
        for (refusal, code, elsewhere) in table {
            let response = refusal.respond();
            assert_eq!(response.status(), code, "{refusal:?}");
            assert!(
                response.headers().contains_key("x-weft-error"),
                "{refusal:?}"
            );
            assert_eq!(
                response.headers().contains_key(NOT_DELIVERED),
                elsewhere,
                "{refusal:?}"
            );
        }
    }

    #[test]
    fn only_a_dropped_request_that_may_be_sent_again_goes_elsewhere() {
        assert_eq!(
            Undelivered::unanswered(true, false),
            Undelivered::Unreachable
        );
        assert_eq!(
            Undelivered::unanswered(true, true),
            Undelivered::Unreachable
        );
        assert_eq!(Undelivered::unanswered(false, true), Undelivered::Dropped);
        assert_eq!(
            Undelivered::unanswered(false, false),
            Undelivered::NoAnswer,
            "a POST, or a request with a body, may have been acted on"
        );
    }

    #[test]
    fn only_the_pods_own_addresses_are_admitted() {
        let app = LocalApp::new(
            Config {
                addresses: vec!["10.0.0.1".parse().unwrap()],
                ..Config::default()
            },
            None,
            Arc::default(),
            Drain::default(),
        );
        assert!(app.admit("10.0.0.1:80".parse().unwrap(), None).is_ok());
        assert_eq!(
            app.admit("10.0.0.2:80".parse().unwrap(), None),
            Err(Undelivered::NotLocal)
        );
    }

    /// An app on loopback that reads one request head per connection and
    /// answers each with the next of `answers`, then after `linger` ends
    /// its half of the connection (a FIN; the socket stays open, so what
    /// is sent to it later is taken, not reset). Counts connections.
    async fn raw_app(
        answers: Vec<&'static str>,
        linger: Duration,
    ) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = connections.clone();
        tokio::spawn(async move {
            let mut answers = answers.into_iter();
            let mut held = Vec::new();
            while let Ok((mut tcp, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(answer) = answers.next() else { return };
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8; 1];
                    if tcp.read(&mut byte).await.unwrap_or(0) == 0 {
                        break;
                    }
                    head.push(byte[0]);
                }
                let _ = tcp.write_all(answer.as_bytes()).await;
                tokio::time::sleep(linger).await;
                let _ = tcp.shutdown().await;
                held.push(tcp);
            }
        });
        (address, connections)
    }

    fn mesh_app() -> LocalApp {
        LocalApp::new(
            Config {
                addresses: vec!["127.0.0.1".parse().unwrap()],
                ..Config::default()
            },
            None,
            Arc::default(),
            Drain::default(),
        )
    }

    async fn get(app: &LocalApp, target: SocketAddr) -> (StatusCode, Bytes) {
        let request = Request::get("http://echo.demo/")
            .header(TARGET, target.to_string())
            .body(crate::http::empty())
            .unwrap();
        exchange(app, request).await
    }

    async fn exchange(app: &LocalApp, request: Request<Body>) -> (StatusCode, Bytes) {
        let caller = Caller::new(None, "127.0.0.9".parse().unwrap());
        let response = app.mesh_request(&caller, request).await;
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, body)
    }

    #[tokio::test]
    async fn an_apps_answer_after_an_interim_one_or_without_a_length_arrives_whole() {
        let (address, _) = raw_app(
            vec![
                "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
                "HTTP/1.1 200 OK\r\n\r\nuntil the end",
                "HTTP/1.0 200 OK\r\n\r\nold",
            ],
            Duration::ZERO,
        )
        .await;
        let app = mesh_app();
        assert_eq!(
            get(&app, address).await,
            (StatusCode::OK, Bytes::from("ok"))
        );
        assert_eq!(
            get(&app, address).await,
            (StatusCode::OK, Bytes::from("until the end"))
        );
        assert_eq!(
            get(&app, address).await,
            (StatusCode::OK, Bytes::from("old"))
        );
    }

    #[tokio::test]
    async fn a_kept_connection_the_app_closed_is_not_used() {
        // Each connection answers once and is closed by the app soon
        // after, as an app with a short keep-alive timeout does.
        let answer = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        let (address, connections) = raw_app(vec![answer, answer], Duration::from_millis(10)).await;
        let app = mesh_app();
        // POSTs, which are not sent twice: only seeing the close before
        // using the connection saves the second.
        let post = || {
            Request::post("http://echo.demo/")
                .header(TARGET, address.to_string())
                .body(crate::http::full("x"))
                .unwrap()
        };
        assert_eq!(exchange(&app, post()).await.0, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(exchange(&app, post()).await.0, StatusCode::OK);
        assert_eq!(connections.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn an_app_that_answers_with_two_framings_is_refused() {
        let (address, _) = raw_app(
            vec!["HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"],
            Duration::ZERO,
        )
        .await;
        let (status, _) = get(&mesh_app(), address).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
    }
}
