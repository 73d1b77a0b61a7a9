//! TLS for the control plane's gRPC port: connections are accepted and
//! handshaken here (concurrently, with a deadline, so one stalled client
//! cannot hold up the others), and each carries the peer's SPIFFE identity
//! into tonic's request extensions.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use weft_certs::Identity;

use weft_certs::accept::{self, HandshakeError};

use crate::metrics::RejectLabels;

/// Who is on the other end of a TLS connection: the SPIFFE identity of its
/// client certificate, if it presented one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity {
    pub identity: Option<Identity>,
    pub addr: SocketAddr,
}

pub struct MeshConn {
    inner: TlsStream<TcpStream>,
    peer: PeerIdentity,
    _slot: PeerSlot,
}

/// Bounds on one TLS port's clients: no single source can hold the
/// control plane's memory or file descriptors.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Open connections from one IP address. A proxy needs one; pods of
    /// a node share its address only with host networking.
    pub connections_per_peer: usize,
    /// TLS handshakes in progress at once, from everyone.
    pub handshakes: usize,
    /// HTTP/2 streams on one connection (a proxy uses one xDS stream and
    /// the odd CA call).
    pub streams_per_connection: u32,
    /// HTTP/2 PINGs while idle, and how long an answer may take.
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections_per_peer: 64,
            handshakes: 256,
            streams_per_connection: 16,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
        }
    }
}

/// Open connections per source address; a [`PeerSlot`] gives its place
/// back when the connection closes.
#[derive(Clone, Default)]
struct PeerCounts(Arc<std::sync::Mutex<HashMap<IpAddr, usize>>>);

struct PeerSlot {
    counts: PeerCounts,
    ip: IpAddr,
}

impl PeerCounts {
    fn take(&self, ip: IpAddr, limit: usize) -> Option<PeerSlot> {
        let mut counts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(ip).or_default();
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            counts: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = counts.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

impl tonic::transport::server::Connected for MeshConn {
    type ConnectInfo = PeerIdentity;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

impl AsyncRead for MeshConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for MeshConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Accepts TLS connections for tonic's `serve_with_incoming`, within
/// `limits`; what is refused is counted in `refused` by reason.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    limits: Limits,
    refused: Family<RejectLabels, Counter>,
) -> ReceiverStream<io::Result<MeshConn>> {
    let (tx, rx) = mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(limits.handshakes));
    let peers = PeerCounts::default();
    let refuse = move |reason: &str, addr: SocketAddr| {
        refused
            .get_or_create(&RejectLabels {
                reason: reason.into(),
            })
            .inc();
        tracing::debug!(%addr, reason, "connection refused");
    };
    tokio::spawn(async move {
        loop {
            // When the server stops, its end of the channel is dropped; the
            // listener must go with it so the port is free again.
            let (tcp, addr) = tokio::select! {
                accepted = accept::next(&listener) => accepted,
                _ = tx.closed() => return,
            };
            let Some(slot) = peers.take(addr.ip(), limits.connections_per_peer) else {
                refuse("connections_per_peer", addr);
                continue;
            };
            let Ok(permit) = handshakes.clone().try_acquire_owned() else {
                refuse("handshakes_in_progress", addr);
                continue;
            };
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            let refuse = refuse.clone();
            tokio::spawn(async move {
                let handshake = accept::handshake(&acceptor, tcp, accept::HANDSHAKE_TIMEOUT).await;
                drop(permit);
                match handshake {
                    Ok(tls) => {
                        let identity =
                            weft_certs::tls::peer_identity(tls.get_ref().1.peer_certificates());
                        let conn = MeshConn {
                            inner: tls,
                            peer: PeerIdentity { identity, addr },
                            _slot: slot,
                        };
                        let _ = tx.send(Ok(conn)).await;
                    }
                    Err(HandshakeError::Failed(err)) => {
                        refuse("handshake_failed", addr);
                        tracing::debug!(%addr, %err, "TLS handshake failed");
                    }
                    Err(HandshakeError::TimedOut) => refuse("handshake_timeout", addr),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}
