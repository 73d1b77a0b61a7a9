//! The client half of the mesh transport (HBONE-style): mutual TLS to a
//! peer sidecar's 15008, HTTP/2 inside, and each TCP connection an HTTP/2
//! CONNECT stream whose authority is the target `ip:port`. One connection
//! per peer sidecar is kept and shared by every request and tunnel to it.
//! The server half is `inbound`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use http::{Method, Request, StatusCode};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use weft_certs::Identity;
use weft_certs::tls::{self, CertStore, TrustBundle};

use crate::coalesce::Coalesce;
use crate::http::Body;

/// The port sidecars accept mesh connections on.
pub const HBONE_PORT: u16 = 15008;
/// How long a connect may take before another endpoint is tried. An
/// endpoint whose pod just went away often does not refuse: its address
/// stops answering, and a long timeout would hold every request that
/// picked it in the moment before the control plane's update arrives.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long an mTLS handshake between sidecars may take, either side:
/// as long as any weft server gives one.
pub const HANDSHAKE_TIMEOUT: Duration = weft_certs::accept::HANDSHAKE_TIMEOUT;

pub type Sender = hyper::client::conn::http2::SendRequest<Body>;

/// Pooled HTTP/2 connections to peer sidecars, one per (address, identity).
pub struct Pool {
    /// How long opening a connection to a peer sidecar may take.
    connect_timeout: Duration,
    certs: CertStore,
    bundle: TrustBundle,
    /// One connection per peer sidecar, with the identity it proved.
    connections: Mutex<HashMap<SocketAddr, (Identity, Sender)>>,
}

impl Pool {
    pub fn new(certs: CertStore, bundle: TrustBundle, connect_timeout: Duration) -> Self {
        Pool {
            connect_timeout,
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
