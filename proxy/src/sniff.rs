//! Which protocol a client speaks, when the service port does not say:
//! the first bytes are read (for a short time at most) and matched against
//! the HTTP/2 connection preface and HTTP/1 request lines. Anything else,
//! or silence (server-first protocols such as MySQL), is plain TCP. The
//! bytes read are replayed in front of the connection by [`Rewind`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use weft_xds_proto::mesh::AppProtocol;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    /// HTTP/1.1, possibly upgraded to HTTP/2 by prior knowledge.
    Http,
    /// HTTP/2 only (also gRPC).
    Http2,
}

/// What the service port declares; `None` means "find out".
pub fn declared(protocol: AppProtocol) -> Option<Protocol> {
    match protocol {
        AppProtocol::Tcp => Some(Protocol::Tcp),
        AppProtocol::Http => Some(Protocol::Http),
        AppProtocol::Http2 | AppProtocol::Grpc => Some(Protocol::Http2),
        AppProtocol::Unspecified => None,
    }
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const METHODS: [&[u8]; 9] = [
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH", b"TRACE", b"CONNECT",
];

/// Classifies the first bytes of a connection; `None` while they are too
/// few to tell.
pub fn classify(bytes: &[u8]) -> Option<Protocol> {
    if bytes.is_empty() {
        return None;
    }
    let n = bytes.len().min(PREFACE.len());
    if bytes[..n] == PREFACE[..n] {
        return (n == PREFACE.len()).then_some(Protocol::Http2);
    }
    match bytes.iter().position(|b| *b == b' ') {
        Some(end) if METHODS.contains(&&bytes[..end]) => Some(Protocol::Http),
        Some(_) => Some(Protocol::Tcp),
        // Still inside the first word: keep reading while it could be a method.
        None if bytes.len() < 8 && bytes.iter().all(u8::is_ascii_uppercase) => None,
        None => Some(Protocol::Tcp),
    }
}

/// Reads from `stream` until the protocol is known or `timeout` passes.
/// Returns the protocol and the bytes consumed.
pub async fn sniff<S: AsyncRead + Unpin>(stream: &mut S, timeout: Duration) -> (Protocol, Bytes) {
    sniff_until(stream, tokio::time::sleep(timeout)).await
}

/// `sniff`, giving up (TCP) when `give_up` resolves instead of after a
/// time: a tunnel gives up when the app speaks first.
pub async fn sniff_until<S: AsyncRead + Unpin>(
    stream: &mut S,
    give_up: impl Future<Output = ()>,
) -> (Protocol, Bytes) {
    let mut give_up = std::pin::pin!(give_up);
    let mut seen = BytesMut::with_capacity(PREFACE.len());
    loop {
        if let Some(protocol) = classify(&seen) {
            return (protocol, seen.freeze());
        }
        let mut chunk = [0u8; 64];
        // Bytes that are there win over giving up; a read that loses the
        // race reads nothing (it is cancel-safe).
        tokio::select! {
            biased;
            read = stream.read(&mut chunk) => match read {
                Ok(n) if n > 0 => seen.extend_from_slice(&chunk[..n]),
                // Closed or failed: whatever it is, it is not HTTP we can
                // route; pass the bytes on untouched.
                _ => return (Protocol::Tcp, seen.freeze()),
            },
            // Silent: a server-first protocol, or nothing routable.
            () = &mut give_up => return (Protocol::Tcp, seen.freeze()),
        }
    }
}

/// A stream with bytes already read from it put back in front.
pub struct Rewind<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: Bytes, inner: S) -> Self {
        Rewind { prefix, inner }
    }

    /// Puts bytes just read through this stream back in front of it.
    pub fn unread(&mut self, seen: Bytes) {
        if self.prefix.is_empty() {
            self.prefix = seen;
        } else if !seen.is_empty() {
            let mut joined = BytesMut::with_capacity(seen.len() + self.prefix.len());
            joined.extend_from_slice(&seen);
            joined.extend_from_slice(&self.prefix);
            self.prefix = joined.freeze();
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn request_lines_and_the_preface_are_recognised() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http));
        assert_eq!(classify(b"POST /x"), Some(Protocol::Http));
        assert_eq!(classify(PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"PRI * HTTP/2.0"), None, "half a preface");
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"\x16\x03\x01\x02"), Some(Protocol::Tcp), "TLS");
        assert_eq!(classify(b"SSH-2.0-x"), Some(Protocol::Tcp));
        assert_eq!(classify(b"FETCH / x"), Some(Protocol::Tcp));
        assert_eq!(classify(b"ABCDEFGHIJ"), Some(Protocol::Tcp));
    }

    #[tokio::test]
    async fn silence_is_tcp_and_bytes_are_replayed() {
        let (mut a, mut b) = tokio::io::duplex(256);
        let (protocol, seen) = sniff(&mut b, Duration::from_millis(20)).await;
        assert_eq!((protocol, seen.len()), (Protocol::Tcp, 0));

        a.write_all(b"GET /").await.unwrap();
        let (protocol, seen) = sniff(&mut b, Duration::from_secs(5)).await;
        assert_eq!(protocol, Protocol::Http);
        a.write_all(b" HTTP/1.1").await.unwrap();
        drop(a);
        let mut rewound = Rewind::new(seen, b);
        let mut all = String::new();
        rewound.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "GET / HTTP/1.1");
    }

    #[tokio::test]
    async fn sniffing_through_a_rewind_loses_no_bytes() {
        // Bytes that came with a CONNECT head, then more from the socket:
        // sniffed through the rewind and put back, all reach the reader
        // once and in order, whether the sniff stops inside the prefix or
        // reads past it.
        let long = format!("GET / HTTP/1.1\r\nx-fill: {}\r\n", "a".repeat(80));
        for (early, rest) in [("GE", "T / HTTP/1.1"), (long.as_str(), "\r\n")] {
            let (mut a, b) = tokio::io::duplex(256);
            a.write_all(rest.as_bytes()).await.unwrap();
            drop(a);
            let mut rewound = Rewind::new(Bytes::copy_from_slice(early.as_bytes()), b);
            let (protocol, seen) = sniff(&mut rewound, Duration::from_secs(5)).await;
            assert_eq!(protocol, Protocol::Http, "{early:?}");
            rewound.unread(seen);
            let mut all = String::new();
            rewound.read_to_string(&mut all).await.unwrap();
            assert_eq!(all, format!("{early}{rest}"));
        }
    }
}
