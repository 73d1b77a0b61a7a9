//! gRPC channels to the control plane over weft's own TLS configuration:
//! the server is verified by its SPIFFE identity, not a DNS name.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};

const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest HTTP/2 frame the control plane may send: a chunk of a
/// first sync (about 50 KB) arrives as one frame instead of four of
/// HTTP/2's default 16 KiB, each of which costs a wake-up and a copy.
pub const MAX_FRAME_SIZE: u32 = 256 * 1024;

/// A lazily connecting channel to `address` (host:port) with `tls`.
pub fn mesh(address: String, tls: Arc<rustls::ClientConfig>) -> Channel {
    let connector = tower::service_fn(move |_| {
        let (address, tls) = (address.clone(), tls.clone());
        async move {
            let tcp = tokio::net::TcpStream::connect(&address).await?;
            tcp.set_nodelay(true)?;
            // The verifier ignores the name; the identity is checked.
            let name = rustls_pki_types::ServerName::try_from("weft-control")
                .map_err(std::io::Error::other)?;
            let stream = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await?;
            Ok::<_, std::io::Error>(TokioIo::new(stream))
        }
    });
    // The URI only names the scheme for tonic; the connector decides where to go.
    // HTTP/2 PINGs notice a control plane that vanished without closing
    // (a node lost, a NAT entry dropped) in under a minute, so the proxy
    // reconnects elsewhere instead of waiting on a dead stream.
    Endpoint::from_static("http://weft-control")
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .max_frame_size(MAX_FRAME_SIZE)
        .connect_with_connector_lazy(connector)
}
