//! gRPC channels to the control plane over weft's own TLS configuration:
//! the server is verified by its SPIFFE identity, not a DNS name.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
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

/// The most of a response's data handed to gRPC's decoder at once.
///
/// The decoder gathers data in one buffer that never shrinks: it grows to
/// the largest piece handed to it plus a message's remainder. Whole frames
/// of `MAX_FRAME_SIZE` (the control plane fills them during a large
/// update) left it at about 220 KB for the rest of a sidecar's life; in
/// pieces it stays near the largest message (about 50 KB in a sync).
const PIECE: usize = 16 * 1024;

/// A response whose data reaches gRPC's decoder in pieces of at most
/// `PIECE` bytes: each frame is split without a copy.
pub fn in_pieces<B>(response: http::Response<B>) -> http::Response<Pieces<B>> {
    response.map(|body| Pieces {
        body,
        rest: Bytes::new(),
    })
}

/// A body whose data comes in pieces of at most `PIECE` bytes.
pub struct Pieces<B> {
    body: B,
    /// What is left of the frame being handed on.
    rest: Bytes,
}

impl<B> Body for Pieces<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        if this.rest.is_empty() {
            match ready!(Pin::new(&mut this.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.rest = data,
                    Err(frame) => return Poll::Ready(Some(Ok(frame))),
                },
                other => return Poll::Ready(other),
            }
        }
        let piece = this.rest.split_to(this.rest.len().min(PIECE));
        Poll::Ready(Some(Ok(Frame::data(piece))))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.body.size_hint();
        let rest = self.rest.len() as u64;
        hint.set_lower(hint.lower() + rest);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + rest);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, StreamBody};

    #[tokio::test]
    async fn frames_come_out_in_pieces_with_every_byte_and_the_trailers() {
        let big: Vec<u8> = (0..PIECE * 2 + 100).map(|i| i as u8).collect();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
        let frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = vec![
            Ok(Frame::data(Bytes::from(big.clone()))),
            Ok(Frame::data(Bytes::from_static(b"small"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = StreamBody::new(tokio_stream::iter(frames));
        let mut body = in_pieces(http::Response::new(body)).into_body();
        let mut sizes = Vec::new();
        let mut data = Vec::new();
        let mut got_trailers = None;
        while let Some(frame) = body.frame().await {
            match frame.unwrap().into_data() {
                Ok(piece) => {
                    sizes.push(piece.len());
                    data.extend_from_slice(&piece);
                }
                Err(frame) => got_trailers = frame.into_trailers().ok(),
            }
        }
        assert_eq!(sizes, vec![PIECE, PIECE, 100, 5]);
        assert_eq!(&data[..big.len()], &big[..]);
        assert_eq!(&data[big.len()..], b"small");
        assert_eq!(got_trailers.unwrap()["grpc-status"], "0");
        assert!(body.frame().await.is_none());
    }
}
