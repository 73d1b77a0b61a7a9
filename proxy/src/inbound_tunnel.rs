//! A CONNECT tunnel arriving on 15008 on its way to the app.
//!
//! Most tunnels carry TCP and are relayed byte for byte. But a tunnel can
//! carry HTTP too: an HTTP/1.1 upgrade (WebSocket) goes to its endpoint
//! this way, and any workload holding a mesh certificate can open a
//! tunnel to an HTTP port without going through its own sidecar. Relayed
//! as bytes, such a request would reach the app with whatever
//! `x-weft-peer-identity` the caller wrote. So unless the port is declared
//! TCP, the caller's first bytes are looked at, and HTTP is served request
//! by request like any mesh request: the identity the app sees is the one
//! the caller's certificate proved. The app speaking first (a server-first
//! protocol) settles it as TCP at once, so nothing waits on a timeout.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode, Version};
use hyper::body::Incoming;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use weft_certs::Identity;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::hbone::{CONNECT_TIMEOUT, Inbound, caller, status};
use crate::http::{APP_PROTOCOL, Body, TARGET, error, set_peer_identity};
use crate::metrics::TrafficLabels;
use crate::sniff::{Protocol, Rewind, declared, sniff_within};

pub async fn tunnel_in(
    inbound: Arc<Inbound>,
    peer: Option<Identity>,
    mut request: Request<Incoming>,
) -> Response<Body> {
    let Some(target) = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        return status(StatusCode::BAD_REQUEST);
    };
    if !inbound.local_addresses.contains(&target.ip()) {
        tracing::warn!(%target, caller = ?peer, "refused a tunnel to an address that is not this pod's");
        return status(StatusCode::FORBIDDEN);
    }
    // Connected before answering, so that the caller learns of a dead app
    // from the status.
    let app = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(app)) => app,
        _ => return status(StatusCode::BAD_GATEWAY),
    };
    let _ = app.set_nodelay(true);
    inbound.count_caller(&peer);
    let guard = inbound.drain.track();
    crate::task::spawn(async move {
        let _guard = guard;
        match hyper::upgrade::on(&mut request).await {
            Ok(upgraded) => {
                let client: TokioIo<Upgraded> = TokioIo::new(upgraded);
                carry(inbound, peer, target, client, app).await
            }
            Err(err) => tracing::debug!(%err, "tunnel upgrade failed"),
        }
    });
    status(StatusCode::OK)
}

/// Delivers one client connection to the app at `target` (already
/// connected as `app`): relayed as bytes if the port is declared TCP or
/// the app speaks first, else served as HTTP with `peer` as the caller the
/// app is told of. Mesh tunnels and 15006's plaintext both come here.
pub(crate) async fn carry<C>(
    inbound: Arc<Inbound>,
    peer: Option<Identity>,
    target: SocketAddr,
    mut client: C,
    mut app: TcpStream,
) where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (protocol, seen) = if declared_tcp(&inbound, target) {
        (Protocol::Tcp, Bytes::new())
    } else {
        // The app speaking first settles it: not HTTP. A caller that
        // stalls inside a request line is cut off, not relayed.
        let app_speaks = async {
            let _ = app.readable().await;
        };
        match sniff_within(&mut client, app_speaks, Some(inbound.head_timeout)).await {
            Some(decided) => decided,
            None => {
                tracing::debug!(%target, "a caller stalled inside a request line; closed");
                return;
            }
        }
    };
    let mut client = Rewind::new(seen, client);
    if protocol == Protocol::Tcp {
        let labels = TrafficLabels::new("destination", &caller(&peer), &"".into(), &inbound.me());
        inbound.metrics.tcp_opened.get_or_create(&labels).inc();
        let (received, sent) = tokio::io::copy_bidirectional(&mut client, &mut app)
            .await
            .unwrap_or((0, 0));
        // Seen from the server side: "sent" goes to the app.
        inbound.metrics.tcp(&labels, received, sent);
        return;
    }
    // HTTP: each request goes to the app as a mesh request does.
    drop(app);
    let (drain, head_timeout) = (inbound.drain.clone(), inbound.head_timeout);
    let service = hyper::service::service_fn(move |request| {
        let (inbound, peer) = (inbound.clone(), peer.clone());
        async move { Ok::<_, Infallible>(request_in_tunnel(&inbound, &peer, target, request).await) }
    });
    let server = crate::l7::server(head_timeout);
    drain
        .serve(server.serve_connection_with_upgrades(TokioIo::new(client), service))
        .await;
}

/// Whether a service of this pod declares `target`'s port TCP: then its
/// bytes are not looked at, whatever they look like.
fn declared_tcp(inbound: &Inbound, target: SocketAddr) -> bool {
    let Some(xds) = &inbound.xds else {
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

async fn request_in_tunnel(
    inbound: &Inbound,
    peer: &Option<Identity>,
    target: SocketAddr,
    request: Request<Incoming>,
) -> Response<Body> {
    if inbound.upgrades.requested(&request) {
        return upgrade_to_app(target, request, peer.as_ref()).await;
    }
    // The tunnel's target, and the version spoken in it; whatever the
    // caller wrote in weft's own headers is dropped on the way.
    let http2 = request.version() == Version::HTTP_2;
    crate::l7::to_app(inbound, peer, target, http2, request).await
}

/// An upgrade (WebSocket) for the app at `target`, through a tunnel from
/// `peer` or as plaintext: relayed to the app on its own connection and
/// joined on 101. The app sees the caller's identity only as the mesh
/// proved it.
async fn upgrade_to_app(
    target: SocketAddr,
    mut request: Request<Incoming>,
    peer: Option<&Identity>,
) -> Response<Body> {
    for own in [TARGET, APP_PROTOCOL] {
        request.headers_mut().remove(own);
    }
    set_peer_identity(request.headers_mut(), peer);
    let app = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target)).await {
        Ok(Ok(app)) => app,
        _ => return error(StatusCode::BAD_GATEWAY, "the application did not answer"),
    };
    let _ = app.set_nodelay(true);
    match crate::upgrade::relay(app, &target.to_string(), request).await {
        Ok((response, joined)) => {
            if let Some(joined) = joined {
                crate::task::spawn(joined);
            }
            response
        }
        Err(err) => {
            tracing::debug!(%target, "an upgrade to the application failed: {err}");
            error(StatusCode::BAD_GATEWAY, "the application did not answer")
        }
    }
}
