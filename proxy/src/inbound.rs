//! Inbound capture (15006): plaintext connections the capture rules
//! redirected on their way to the app. In PERMISSIVE mode (the default, so
//! that clients outside the mesh keep working while it is rolled out) they
//! are forwarded to the address they were sent to; in STRICT mode they are
//! refused, with a log line and a counter, and only mTLS on 15008 gets in.
//!
//! Plaintext callers have no proven identity, so HTTP arriving here is
//! forwarded request by request with any `x-weft-peer-identity` header
//! removed: the application can trust the header whenever it is present.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use http::{Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use weft_certs::Identity;

use crate::drain::Drain;
use crate::http::{
    APP_PROTOCOL, Body, PEER_IDENTITY, TARGET, error, set_peer_identity, strip_hop_by_hop,
};
use crate::outbound::original_destination;
use crate::sniff::{Protocol, Rewind, sniff};
use crate::upstream::Upstreams;

/// How long a plaintext client may stay silent before it is taken for a
/// server-first protocol and relayed as TCP.
const SNIFF_TIMEOUT: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Permissive,
    Strict,
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_uppercase().as_str() {
            "PERMISSIVE" => Ok(Mode::Permissive),
            "STRICT" => Ok(Mode::Strict),
            other => Err(format!("{other:?}: expected PERMISSIVE or STRICT")),
        }
    }
}

#[derive(Default)]
pub struct Counters {
    pub forwarded: AtomicU64,
    pub refused_plaintext: AtomicU64,
}

async fn handle(
    mut client: TcpStream,
    mode: Mode,
    counters: &Counters,
    app: Arc<Upstreams>,
    head_timeout: Duration,
    drain: &Drain,
) -> Result<()> {
    let original = original_destination(&client).context("reading SO_ORIGINAL_DST")?;
    if original == client.local_addr()? {
        bail!("connection to the capture port itself; refusing to loop");
    }
    if mode == Mode::Strict {
        counters.refused_plaintext.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(peer = ?client.peer_addr().ok(), %original, "plaintext refused: inbound mode is STRICT (mTLS on 15008 only)");
        return Ok(());
    }
    counters.forwarded.fetch_add(1, Ordering::Relaxed);
    let (protocol, seen) = sniff(&mut client, SNIFF_TIMEOUT).await;
    let client = Rewind::new(seen, client);
    if protocol != Protocol::Tcp {
        let service = hyper::service::service_fn(move |request| {
            let app = app.clone();
            async move { Ok::<_, Infallible>(plaintext_request(&app, original, request).await) }
        });
        let server = crate::l7::server(head_timeout);
        drain
            .serve(server.serve_connection_with_upgrades(TokioIo::new(client), service))
            .await;
        return Ok(());
    }
    let mut client = client;
    let mut app = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(original))
        .await
        .context("connecting to the app timed out")??;
    app.set_nodelay(true)?;
    tokio::io::copy_bidirectional(&mut client, &mut app).await?;
    Ok(())
}

async fn plaintext_request(
    app: &Upstreams,
    original: SocketAddr,
    request: Request<Incoming>,
) -> Response<Body> {
    let http2 = request.version() == Version::HTTP_2;
    if crate::upgrade::requested(&request) {
        return upgrade(original, request, None).await;
    }
    let (mut parts, body) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    remove_forged(&mut parts.headers);
    let authority = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| original.to_string());
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let Ok(uri) = format!("http://{authority}{path}").parse::<http::Uri>() else {
        return error(
            StatusCode::BAD_REQUEST,
            "the request's authority is not valid",
        );
    };
    parts.uri = uri;
    parts.version = if http2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    let request = Request::from_parts(parts, body.boxed());
    match app.client(original, http2).request(request).await {
        Ok(mut response) => {
            strip_hop_by_hop(response.headers_mut());
            response.map(|b| b.boxed())
        }
        Err(err) => {
            tracing::debug!(%original, "the application did not answer: {err:#}");
            error(StatusCode::BAD_GATEWAY, "the application did not answer")
        }
    }
}

/// Headers only sidecars may set: a plaintext caller's are dropped, so the
/// application can trust them whenever they are present.
fn remove_forged(headers: &mut http::HeaderMap) {
    for forged in [PEER_IDENTITY, TARGET, APP_PROTOCOL] {
        headers.remove(forged);
    }
}

/// An upgrade (WebSocket) for the app at `original`, from a plaintext
/// caller or through a mesh tunnel from `peer`: relayed to the app on its
/// own connection, and joined on 101. The app sees the caller's identity
/// only as the mesh proved it.
pub(crate) async fn upgrade(
    original: SocketAddr,
    mut request: Request<Incoming>,
    peer: Option<&Identity>,
) -> Response<Body> {
    remove_forged(request.headers_mut());
    set_peer_identity(request.headers_mut(), peer);
    let app = match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(original)).await
    {
        Ok(Ok(app)) => app,
        _ => return error(StatusCode::BAD_GATEWAY, "the application did not answer"),
    };
    let _ = app.set_nodelay(true);
    match crate::upgrade::relay(app, &original.to_string(), request).await {
        Ok((response, joined)) => {
            if let Some(joined) = joined {
                crate::task::spawn(joined);
            }
            response
        }
        Err(err) => {
            tracing::debug!(%original, "an upgrade to the application failed: {err}");
            error(StatusCode::BAD_GATEWAY, "the application did not answer")
        }
    }
}

/// Serves 15006 until draining starts; `head_timeout` bounds how long an
/// HTTP request head may take to arrive.
pub async fn serve(
    listener: TcpListener,
    mode: Mode,
    counters: Arc<Counters>,
    head_timeout: Duration,
    drain: Drain,
) {
    let app = Arc::new(Upstreams::new(Duration::from_secs(5)));
    // The listener closes before the guard says so (locals drop in reverse).
    let _listening = drain.listening();
    let listener = listener;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.started() => return,
        };
        let Ok((client, addr)) = accepted else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let _ = client.set_nodelay(true);
        let (counters, app, drain) = (counters.clone(), app.clone(), drain.clone());
        let active = drain.track();
        crate::task::spawn(async move {
            let _active = active;
            if let Err(err) = handle(client, mode, &counters, app, head_timeout, &drain).await {
                tracing::debug!(%addr, "inbound capture: {err:#}");
            }
        });
    }
}
