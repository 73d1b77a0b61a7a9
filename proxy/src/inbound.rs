//! Inbound from the mesh (15008): mutual TLS with a client certificate
//! required, HTTP/2 inside, or an HTTP/1.1 link (`inbound_h1`) when the
//! client offers one. A CONNECT is a tunnel whose authority is the
//! target `ip:port` (HBONE-style), so no capture rule is needed to learn
//! it; any other request is an HTTP request for the app, its target in
//! `x-weft-target`. Both are delivered by `local_app` with the identity
//! the caller's certificate proved. The client half is `pool`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use weft_certs::tls::{self, CertStore, TrustBundle};

use weft_certs::accept;

use crate::authorize::Caller;
use crate::http::{Body, status};
use crate::local_app::{LocalApp, Undelivered};
use crate::pool::HANDSHAKE_TIMEOUT;

/// Serves 15008 until draining starts.
pub async fn serve(
    listener: TcpListener,
    certs: CertStore,
    bundle: TrustBundle,
    app: Arc<LocalApp>,
) {
    let tls = match tls::link_server_config(&certs, &bundle) {
        Ok(tls) => tokio_rustls::TlsAcceptor::from(tls),
        Err(err) => {
            tracing::error!(%err, "cannot build the inbound TLS configuration");
            return;
        }
    };
    let drain = app.drain().clone();
    crate::serve::accept(listener, drain, move |tcp, addr| {
        let (tls, app) = (tls.clone(), app.clone());
        async move {
            let stream = match accept::handshake(&tls, tcp, HANDSHAKE_TIMEOUT).await {
                Ok(stream) => stream,
                Err(err) => {
                    tracing::debug!(%addr, %err, "inbound mTLS handshake refused");
                    return;
                }
            };
            let identity = tls::peer_identity(stream.get_ref().1.peer_certificates());
            let caller = Caller::new(identity, addr.ip());
            if stream.get_ref().1.alpn_protocol() == Some(tls::LINK_H1_ALPN) {
                return crate::inbound_h1::serve(stream, caller, app).await;
            }
            let drain = app.drain().clone();
            let service = hyper::service::service_fn(move |request| {
                let (app, caller) = (app.clone(), caller.clone());
                async move { Ok::<_, Infallible>(serve_request(app, caller, request).await) }
            });
            let connection = hyper::server::conn::http2::Builder::new(crate::task::Executor)
                .serve_connection(TokioIo::new(stream), service);
            drain.serve(connection).await;
        }
    })
    .await
}

/// One request on a mesh connection.
async fn serve_request(
    app: Arc<LocalApp>,
    caller: Caller,
    request: Request<Incoming>,
) -> Response<Body> {
    if request.method() == Method::CONNECT {
        return tunnel(app, caller, request)
            .await
            .unwrap_or_else(Undelivered::respond);
    }
    app.mesh_request(&caller, request.map(crate::http::boxed))
        .await
}

/// A CONNECT tunnel: the app is connected to before answering, so that
/// the caller learns of a dead app from the status, then the tunnel's
/// bytes are delivered once the stream is upgraded.
async fn tunnel(
    app: Arc<LocalApp>,
    caller: Caller,
    mut request: Request<Incoming>,
) -> Result<Response<Body>, Undelivered> {
    let target = request
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        .ok_or(Undelivered::NoTarget)?;
    let connected = app.connect(target, &caller).await?;
    let guard = app.drain().track();
    crate::task::spawn(async move {
        let _guard = guard;
        match hyper::upgrade::on(&mut request).await {
            Ok(upgraded) => {
                app.carry(caller, target, TokioIo::new(upgraded), connected)
                    .await
            }
            Err(err) => tracing::debug!(%err, "tunnel upgrade failed"),
        }
    });
    Ok(status(StatusCode::OK))
}
