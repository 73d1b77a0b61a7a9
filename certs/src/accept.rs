//! Accepting TLS on the server side, as every weft server that speaks it
//! does (the control plane's ports, the lab API server, the sidecar's
//! 15008): the next connection off a listener, surviving accept errors,
//! and a handshake bounded in time, so that a client that connects and
//! says nothing holds a socket for seconds, not forever.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client may take to finish a TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The next connection on `listener`, with no-delay set (small frames must
/// not wait for delayed ACKs). An accept error (out of descriptors and the
/// like) is logged and retried after a pause: the server keeps serving.
pub async fn next(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((tcp, addr)) => {
                let _ = tcp.set_nodelay(true);
                return (tcp, addr);
            }
            Err(err) => {
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake failed: {0}")]
    Failed(std::io::Error),
    #[error("TLS handshake timed out")]
    TimedOut,
}

/// The server side of a TLS handshake on `tcp`, within `timeout`.
pub async fn handshake(
    acceptor: &TlsAcceptor,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, HandshakeError> {
    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(err)) => Err(HandshakeError::Failed(err)),
        Err(_) => Err(HandshakeError::TimedOut),
    }
}
