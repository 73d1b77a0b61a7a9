//! The client half of the mesh transport (HBONE-style): mutual TLS to a
//! peer sidecar's 15008, HTTP/2 inside, and each TCP connection an HTTP/2
//! CONNECT stream whose authority is the target `ip:port`. One connection
//! per peer sidecar is kept and shared by every request and tunnel to it.
//! The server half is `inbound`.
//!
//! A peer on another network is reached through its network's east-west
//! gateway (double HBONE): an outer mTLS connection to the gateway, pooled
//! like any other, carries a CONNECT to the peer's 15008, and the mTLS
//! connection to the peer runs inside that tunnel. The gateway relays
//! bytes it cannot read; the peer sees this pod's own certificate.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use tokio::net::TcpStream;
use weft_certs::Identity;
use weft_certs::tls::{self, CertStore, TrustBundle};

use crate::coalesce::Coalesce;
use crate::h1_link::{Connection, Idle, Links};
use crate::link::{Carrier, Failure, Link, Tunnel};
use crate::network::{Gateway, Resolver};

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

/// Pooled HTTP/2 connections to peer sidecars, one per (address, identity).
pub struct Pool {
    /// How long opening a connection to a peer sidecar may take.
    connect_timeout: Duration,
    certs: CertStore,
    bundle: TrustBundle,
    /// One connection per peer sidecar, with the identity it proved.
    connections: Mutex<HashMap<SocketAddr, (Identity, Link)>>,
    /// Idle HTTP/1.1 links to peer sidecars.
    links: Links,
    /// Addresses of gateways known by hostname.
    pub resolver: Resolver,
}

/// Marks an error as the gateway's, not the peer's: the caller steps
/// around the gateway rather than the endpoint.
#[derive(Debug)]
pub struct GatewayUnreachable(pub crate::name::Name);

impl std::fmt::Display for GatewayUnreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the east-west gateway {} could not be reached", self.0)
    }
}

impl Pool {
    pub fn new(certs: CertStore, bundle: TrustBundle, connect_timeout: Duration) -> Self {
        Pool {
            connect_timeout,
            certs,
            bundle,
            connections: Mutex::new(HashMap::new()),
            links: Links::new(crate::h1_codec::Speaker::Sidecar),
            resolver: Resolver::default(),
        }
    }

    /// A pooled HTTP/2 connection to the sidecar at `peer`, opened (mTLS,
    /// expecting `identity`) when there is none: directly, or through
    /// the gateway `via` when the peer is on another network.
    pub async fn link(
        &self,
        peer: SocketAddr,
        identity: &Identity,
        via: Option<&Gateway>,
    ) -> Result<Link> {
        if let Some(link) = self.pooled(peer, identity, |_| true) {
            return Ok(link);
        }
        let carrier = match via {
            None => Carrier::Tcp(self.connect(peer).await?),
            Some(gateway) => Carrier::Tunnel(
                Box::pin(self.through_gateway(gateway, peer))
                    .await
                    .context(GatewayUnreachable(gateway.name.clone()))?,
            ),
        };
        let config = tls::client_config(&self.certs, &self.bundle, vec![identity.clone()])?;
        let stream = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsConnector::from(config)
                .connect(tls::mesh_server_name(peer.ip()), Coalesce::new(carrier)),
        )
        .await
        .context("the mTLS handshake timed out")?
        .with_context(|| format!("mTLS to {peer} expecting {identity}"))?;
        let link = crate::link::handshake(stream).await?;
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, (identity.clone(), link.clone()));
        Ok(link)
    }

    /// A link for one HTTP/1.1 exchange with the sidecar at `peer`
    /// (which must prove `identity`), on the same network: an idle one,
    /// or a new one, or past the most a peer may have open, its HTTP/2
    /// link. A peer that answers a new one with HTTP/2 (a weft
    /// without HTTP/1.1 links) gets that as its pooled HTTP/2 link, and
    /// its exchanges take it for as long as it lasts.
    pub async fn exchange_link(
        &self,
        peer: SocketAddr,
        identity: &Identity,
    ) -> Result<ForExchange> {
        if let Some(link) = self.pooled(peer, identity, Link::answered_h1_with_h2) {
            return Ok(ForExchange::Http2(link));
        }
        let idle = self.links.to(peer, Some(identity));
        if let Some(connection) = idle.take() {
            return Ok(ForExchange::Http1(connection, idle));
        }
        if !idle.may_open() {
            return Ok(ForExchange::Http2(self.link(peer, identity, None).await?));
        }
        let tcp = self.connect(peer).await?;
        let config = tls::link_h1_client_config(&self.certs, &self.bundle, vec![identity.clone()])?;
        let stream = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsConnector::from(config).connect(tls::mesh_server_name(peer.ip()), tcp),
        )
        .await
        .context("the mTLS handshake timed out")?
        .with_context(|| format!("mTLS to {peer} expecting {identity}"))?;
        if stream.get_ref().1.alpn_protocol() == Some(tls::LINK_H1_ALPN) {
            let connection = Connection::new(stream, &idle);
            return Ok(ForExchange::Http1(connection, idle));
        }
        let link = crate::link::handshake(stream).await?.answering_h1_with_h2();
        self.connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(peer, (identity.clone(), link.clone()));
        Ok(ForExchange::Http2(link))
    }

    /// The open HTTP/2 link to `peer`, if it proved `identity` and is
    /// `wanted`: looked at before it is cloned (a clone takes h2's lock),
    /// since each HTTP/1.1 exchange asks.
    fn pooled(
        &self,
        peer: SocketAddr,
        identity: &Identity,
        wanted: impl Fn(&Link) -> bool,
    ) -> Option<Link> {
        let connections = self.connections.lock().unwrap_or_else(|p| p.into_inner());
        let (proven, link) = connections.get(&peer)?;
        (proven == identity && !link.is_closed() && wanted(link)).then(|| link.clone())
    }

    async fn connect(&self, peer: SocketAddr) -> Result<TcpStream> {
        let tcp = tokio::time::timeout(self.connect_timeout, TcpStream::connect(peer))
            .await
            .context("connecting to the peer sidecar timed out")??;
        tcp.set_nodelay(true)?;
        Ok(tcp)
    }

    /// The outer tunnel: a CONNECT to `peer`'s mesh port on a pooled
    /// connection to `gateway`, which must prove one of its identities.
    async fn through_gateway(&self, gateway: &Gateway, peer: SocketAddr) -> Result<Tunnel> {
        let addresses = self
            .resolver
            .addresses(gateway)
            .await
            .with_context(|| format!("resolving {}", gateway.hostname))?;
        let mut last = None;
        for address in addresses {
            for identity in gateway.identities.iter() {
                match self
                    .tunnel(address, identity, peer, None, Bytes::new())
                    .await
                {
                    Ok(tunnel) => return Ok(tunnel),
                    Err(failure) => last = Some(failure.error),
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("the gateway has no address")))
    }

    /// A tunnel to `target` through the sidecar at `peer`, which must prove
    /// to be `identity`; `via`: through that gateway first. `early`: bytes
    /// the caller already sent, carried with the CONNECT.
    pub async fn tunnel(
        &self,
        peer: SocketAddr,
        identity: &Identity,
        target: SocketAddr,
        via: Option<&Gateway>,
        early: Bytes,
    ) -> Result<Tunnel, Failure> {
        let link = self
            .link(peer, identity, via)
            .await
            .map_err(|error| Failure { error, sent: false })?;
        link.tunnel(&target.to_string(), early).await
    }

    /// Open connections to peer sidecars: HTTP/2 links, and HTTP/1.1
    /// links waiting idle.
    pub fn connections(&self) -> usize {
        let http2 = self
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len();
        http2 + self.links.idle()
    }
}

/// What an HTTP/1.1 exchange with a peer sidecar goes on.
pub enum ForExchange {
    /// An HTTP/1.1 link, which goes back to its peer's idle links once
    /// its answer has been read.
    Http1(Connection, std::sync::Arc<Idle>),
    /// The peer's HTTP/2 link: it answered an HTTP/1.1 link with HTTP/2.
    Http2(Link),
}
