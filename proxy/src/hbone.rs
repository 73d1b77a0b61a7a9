//! The mesh transport (HBONE-style): mutual TLS between sidecars on 15008,
//! HTTP/2 inside, and each TCP connection an HTTP/2 CONNECT stream whose
//! authority is the target `ip:port`. The receiving side needs no capture
//! rule to learn the target, and many connections share one TLS session.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use http::{Method, Request, Response, StatusCode};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use weft_certs::Identity;
use weft_certs::tls::{self, CertStore, TrustBundle};

use crate::coalesce::Coalesce;
use crate::drain::Drain;
use crate::http::Body;
use crate::metrics::{Metrics, Peer};
use crate::upstream::Upstreams;
use crate::xds::XdsState;

/// The port sidecars accept mesh connections on.
pub const HBONE_PORT: u16 = 15008;
/// How long a connect may take before another endpoint is tried. An
/// endpoint whose pod just went away often does not refuse: its address
/// stops answering, and a long timeout would hold every request that
/// picked it in the moment before the control plane's update arrives.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The receiving sidecar: which addresses it forwards to, and who called.
pub struct Inbound {
    /// The pod's own addresses; a CONNECT to anything else is refused, so the
    /// sidecar cannot be used to reach other hosts.
    pub local_addresses: Vec<IpAddr>,
    /// Connections and requests per caller identity, for tests and debugging.
    pub callers: Mutex<HashMap<String, u64>>,
    /// Keep-alive clients to the application, for mesh HTTP requests.
    pub app: Upstreams,
    pub metrics: Arc<Metrics>,
    /// The mesh view, to label metrics with this pod's own workload.
    pub xds: Option<Arc<XdsState>>,
    pub drain: Drain,
    /// How long a request head inside a tunnel may take to arrive.
    pub head_timeout: Duration,
    /// Upgrades relayed to the app; others become plain requests.
    pub upgrades: crate::upgrade::Upgrades,
}

impl Inbound {
    pub fn new(local_addresses: Vec<IpAddr>) -> Self {
        Inbound {
            local_addresses,
            callers: Mutex::new(HashMap::new()),
            app: Upstreams::new(CONNECT_TIMEOUT),
            metrics: Arc::default(),
            xds: None,
            drain: Drain::default(),
            head_timeout: crate::outbound::HEAD_TIMEOUT,
            upgrades: Default::default(),
        }
    }

    pub fn calls_from(&self, identity: &str) -> u64 {
        self.callers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(identity)
            .copied()
            .unwrap_or(0)
    }

    pub fn count_caller(&self, peer: &Option<Identity>) {
        if let Some(identity) = peer {
            *self
                .callers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(identity.to_string())
                .or_default() += 1;
        }
    }

    /// This pod as a metrics peer.
    pub fn me(&self) -> Peer {
        self.xds
            .as_ref()
            .and_then(|xds| {
                let snapshot = xds.snapshot.load();
                self.local_addresses
                    .iter()
                    .find_map(|ip| snapshot.workload_by_ip(*ip).map(|w| Peer::of(w)))
            })
            .unwrap_or_default()
    }
}

pub(crate) fn status(code: StatusCode) -> Response<Body> {
    let mut response = Response::new(crate::http::empty());
    *response.status_mut() = code;
    response
}

/// A caller as metrics name it: all its certificate proves.
pub fn caller(peer: &Option<Identity>) -> Peer {
    peer.as_ref()
        .map(|id| Peer {
            namespace: id.namespace.as_str().into(),
            principal: id.to_string().into(),
            ..Default::default()
        })
        .unwrap_or_default()
}

/// One request on a mesh connection: CONNECT opens a TCP tunnel to the
/// app; anything else is an HTTP request for the app (see `l7`).
async fn serve_request(
    inbound: Arc<Inbound>,
    peer: Option<Identity>,
    request: Request<hyper::body::Incoming>,
) -> Result<Response<Body>, Infallible> {
    if request.method() != Method::CONNECT {
        return Ok(crate::l7::inbound(&inbound, &peer, request).await);
    }
    Ok(crate::inbound_tunnel::tunnel_in(inbound, peer, request).await)
}

/// Serves 15008: mTLS with a client certificate required, then HTTP/2.
pub async fn serve_inbound(
    listener: TcpListener,
    certs: CertStore,
    bundle: TrustBundle,
    inbound: Arc<Inbound>,
) {
    let tls = match tls::server_config(&certs, &bundle) {
        Ok(tls) => tokio_rustls::TlsAcceptor::from(tls),
        Err(err) => {
            tracing::error!(%err, "cannot build the inbound TLS configuration");
            return;
        }
    };
    let drain = inbound.drain.clone();
    // The listener closes before the guard says so (locals drop in reverse).
    let _listening = drain.listening();
    let listener = listener;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.started() => return,
        };
        let Ok((tcp, addr)) = accepted else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        // Small frames must not wait for delayed ACKs (a 40 ms stall).
        let _ = tcp.set_nodelay(true);
        let (tls, inbound) = (tls.clone(), inbound.clone());
        crate::task::spawn(async move {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(err)) => {
                    tracing::debug!(%addr, %err, "inbound mTLS handshake refused");
                    return;
                }
                Err(_) => return,
            };
            let peer = tls::peer_identity(stream.get_ref().1.peer_certificates());
            let drain = inbound.drain.clone();
            let _guard = drain.track();
            let service = hyper::service::service_fn(move |request| {
                serve_request(inbound.clone(), peer.clone(), request)
            });
            let connection = hyper::server::conn::http2::Builder::new(crate::task::Executor)
                .serve_connection(TokioIo::new(stream), service);
            drain.serve(connection).await;
        });
    }
}

pub type Sender = hyper::client::conn::http2::SendRequest<Body>;

/// Pooled HTTP/2 connections to peer sidecars, one per (address, identity).
pub struct Pool {
    /// How long opening a connection to a peer sidecar may take.
    pub connect_timeout: Duration,
    certs: CertStore,
    bundle: TrustBundle,
    /// One connection per peer sidecar, with the identity it proved.
    connections: Mutex<HashMap<SocketAddr, (Identity, Sender)>>,
}

impl Pool {
    pub fn new(certs: CertStore, bundle: TrustBundle) -> Self {
        Pool {
            connect_timeout: CONNECT_TIMEOUT,
            certs,
            bundle,
            connections: Mutex::new(HashMap::new()),
        }
    }

    /// A pooled HTTP/2 connection to the sidecar at `peer`, opened (mTLS,
    /// expecting `identity`) when there is none.
    pub async fn sender(&self, peer: SocketAddr, identity: &Identity) -> Result<Sender> {
        if let Some((proven, sender)) = self
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&peer)
            && proven == identity
            && !sender.is_closed()
            && sender.is_ready()
        {
            return Ok(sender.clone());
        }
        let config = tls::client_config(&self.certs, &self.bundle, vec![identity.clone()])?;
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(peer))
            .await
            .context("connecting to the peer sidecar timed out")??;
        tcp.set_nodelay(true)?;
        let stream = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsConnector::from(config)
                .connect(tls::mesh_server_name(peer.ip()), Coalesce::new(tcp)),
        )
        .await
        .context("the mTLS handshake timed out")?
        .with_context(|| format!("mTLS to {peer} expecting {identity}"))?;
        let (sender, connection) =
            hyper::client::conn::http2::handshake(crate::task::Executor, TokioIo::new(stream))
                .await?;
        crate::task::spawn(connection);
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, (identity.clone(), sender.clone()));
        Ok(sender)
    }

    /// A tunnel to `target` through the sidecar at `peer`, which must prove
    /// to be `identity`.
    pub async fn tunnel(
        &self,
        peer: SocketAddr,
        identity: &Identity,
        target: SocketAddr,
    ) -> Result<TokioIo<Upgraded>> {
        let mut sender = self.sender(peer, identity).await?;
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(crate::http::empty())?;
        let response = sender.send_request(request).await?;
        if response.status() != StatusCode::OK {
            bail!(
                "the peer sidecar answered {} to CONNECT {target}",
                response.status()
            );
        }
        Ok(TokioIo::new(hyper::upgrade::on(response).await?))
    }

    pub fn connections(&self) -> usize {
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}
