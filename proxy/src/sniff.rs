//! Which protocol a client speaks, when the service port does not say:
//! the first bytes are read and matched against the HTTP/2 connection
//! preface and the HTTP/1 request line (any method). Anything else is
//! plain TCP; so is silence, where the caller decides when to stop waiting
//! (the outbound side after a short time; the inbound side only when the
//! app speaks first, so that a caller cannot pass HTTP as bytes by waiting).
//! The bytes read are replayed in front of the connection by [`Rewind`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
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
/// A request line longer than this that still looks like one is taken for
/// HTTP: the HTTP server then refuses it, rather than the bytes going to
/// the app unparsed.
const MAX_REQUEST_LINE: usize = 8 * 1024;

/// RFC 9110's `tchar`, what a method is made of.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Classifies the first bytes of a connection; `None` while they are too
/// few to tell. Any HTTP/1 request line is HTTP, whatever its method: a
/// request relayed as bytes would reach the app with whatever identity
/// header its sender wrote, so only what cannot be HTTP/1 is TCP.
pub fn classify(bytes: &[u8]) -> Option<Protocol> {
    // Servers skip empty lines before a request (RFC 9112 2.2).
    let start = bytes
        .iter()
        .position(|b| *b != b'\r' && *b != b'\n')
        .unwrap_or(bytes.len());
    let bytes = &bytes[start..];
    if bytes.is_empty() {
        return None;
    }
    let n = bytes.len().min(PREFACE.len());
    if bytes[..n] == PREFACE[..n] {
        return (n == PREFACE.len()).then_some(Protocol::Http2);
    }
    request_line(bytes)
}

/// Whether `bytes` start with `method SP target SP HTTP/d.d CRLF`:
/// `Some(Http)` once a whole request line is there, `Some(Tcp)` as soon as
/// the bytes can no longer begin one (so a TCP client's text is passed on
/// at once), `None` while they still could.
fn request_line(bytes: &[u8]) -> Option<Protocol> {
    // Past the limit, what is still a request line is taken for one, and
    // the HTTP server refuses it.
    line_so_far(bytes).or((bytes.len() > MAX_REQUEST_LINE).then_some(Protocol::Http))
}

fn line_so_far(bytes: &[u8]) -> Option<Protocol> {
    const VERSION: &[u8] = b"HTTP/d.d";
    let method = bytes.iter().take_while(|b| is_token(**b)).count();
    match bytes.get(method)? {
        b' ' if method > 0 => {}
        _ => return Some(Protocol::Tcp),
    }
    // Spaces between the parts: some servers take more than one.
    let rest = &bytes[method..];
    let target_at = rest.iter().take_while(|b| **b == b' ').count();
    let rest = &rest[target_at..];
    let target = rest.iter().take_while(|b| b.is_ascii_graphic()).count();
    let after_target = rest.get(target)?;
    if target == 0 || *after_target != b' ' {
        return Some(Protocol::Tcp);
    }
    let rest = &rest[target..];
    let version = &rest[rest.iter().take_while(|b| **b == b' ').count()..];
    for (i, want) in VERSION.iter().enumerate() {
        let got = version.get(i)?;
        let fits = if *want == b'd' {
            got.is_ascii_digit()
        } else {
            got == want
        };
        if !fits {
            return Some(Protocol::Tcp);
        }
    }
    match &version[VERSION.len()..] {
        [] | [b'\r'] => None,
        [b'\n', ..] | [b'\r', b'\n', ..] => Some(Protocol::Http),
        _ => Some(Protocol::Tcp),
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
    let seen = sniff_within(stream, give_up, None).await;
    // Without patience there is no stall to report.
    seen.unwrap_or((Protocol::Tcp, Bytes::new()))
}

/// [`sniff_until`] for the side in front of the app: once bytes that could
/// begin an HTTP request have arrived, the request line must be whole
/// within `patience`, or `None`: the caller closes the connection. Relaying
/// it as bytes instead would let a caller stop half-way through a request
/// line, wait, and finish it with whatever headers it likes.
pub async fn sniff_within<S: AsyncRead + Unpin>(
    stream: &mut S,
    give_up: impl Future<Output = ()>,
    patience: Option<Duration>,
) -> Option<(Protocol, Bytes)> {
    let mut give_up = std::pin::pin!(give_up);
    let mut seen = BytesMut::with_capacity(64);
    let mut stalled = std::pin::pin!(tokio::time::sleep(Duration::MAX));
    loop {
        if let Some(protocol) = classify(&seen) {
            return Some((protocol, seen.freeze()));
        }
        let mut chunk = [0u8; 64];
        // Bytes that are there win over giving up; a read that loses the
        // race reads nothing (it is cancel-safe).
        tokio::select! {
            biased;
            read = stream.read(&mut chunk) => match read {
                Ok(n) if n > 0 => {
                    if seen.is_empty()
                        && let Some(patience) = patience
                    {
                        stalled.as_mut().reset(tokio::time::Instant::now() + patience);
                    }
                    seen.extend_from_slice(&chunk[..n]);
                }
                // Closed or failed: whatever it is, it is not HTTP we can
                // route; pass the bytes on untouched.
                _ => return Some((Protocol::Tcp, seen.freeze())),
            },
            () = &mut stalled, if patience.is_some() && !seen.is_empty() => return None,
            // Silent: a server-first protocol, or nothing routable.
            () = &mut give_up => return Some((Protocol::Tcp, seen.freeze())),
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

impl Rewind<tokio::net::TcpStream> {
    /// What the peer sent that nobody has read: the bytes put back, else
    /// whatever already waits in the socket (up to `limit`, without
    /// waiting for more).
    pub fn take_waiting(&mut self, limit: usize) -> Bytes {
        if !self.prefix.is_empty() {
            return std::mem::take(&mut self.prefix);
        }
        let mut waiting = BytesMut::with_capacity(limit);
        match self.inner.try_read_buf(&mut waiting) {
            Ok(n) if n > 0 => waiting.freeze(),
            // Nothing yet, the end of the stream or an error: the relay's
            // first read sees the same.
            _ => Bytes::new(),
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

crate::through::write!(Rewind);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn what_waits_in_a_just_accepted_socket_is_taken_without_waiting() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        client.write_all(b"PING\r\n").await.unwrap();
        // Served in the turn that accepted it, as the sidecar serves a
        // connection.
        let (accepted, _) = listener.accept().await.unwrap();
        let mut served = Rewind::new(Bytes::new(), accepted);
        assert_eq!(&served.take_waiting(1024)[..], b"PING\r\n");
        // Nothing more waits: nothing is taken, nothing blocks.
        assert!(served.take_waiting(1024).is_empty());
        client.write_all(b"more").await.unwrap();
        let mut more = [0u8; 4];
        served.read_exact(&mut more).await.unwrap();
        assert_eq!(&more, b"more");
        // Bytes put back come first, and alone.
        served.unread(Bytes::from_static(b"seen"));
        assert_eq!(&served.take_waiting(1024)[..], b"seen");
    }

    #[test]
    fn request_lines_and_the_preface_are_recognised() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http));
        assert_eq!(classify(b"POST /x"), None, "the line is not whole yet");
        assert_eq!(classify(PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"PRI * HTTP/2.0"), None, "half a preface");
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"\x16\x03\x01\x02"), Some(Protocol::Tcp), "TLS");
        assert_eq!(classify(b"SSH-2.0-x\r\n"), Some(Protocol::Tcp));
        assert_eq!(classify(b"FETCH / x\r\n"), Some(Protocol::Tcp));
        assert_eq!(
            classify(b"SET key value\r\n"),
            Some(Protocol::Tcp),
            "Redis inline"
        );
        assert_eq!(classify(b"ABCDEFGHIJ"), None);
        assert_eq!(
            classify(&[b'A'; 9000]),
            Some(Protocol::Http),
            "refused by the server"
        );
        // Text that cannot become a request line is TCP at once, with no
        // line end needed: a client-first TCP protocol must not wait.
        assert_eq!(classify(b"across the mesh"), Some(Protocol::Tcp));
        assert_eq!(classify(b"SET key value"), Some(Protocol::Tcp));
        assert_eq!(
            classify(b"hello world"),
            None,
            "could be hello world HTTP/1.1"
        );
        assert_eq!(classify(b"GET / HTTP/1.1x\r\n"), Some(Protocol::Tcp));
        assert_eq!(classify(b"GET / HT"), None, "still a request line");
        assert_eq!(classify(b"GET / HTTP/1.1\r"), None);
    }

    #[test]
    fn any_method_token_is_http() {
        // Methods outside any fixed list, lower case, WebDAV, extension
        // tokens, HTTP/1.0, a bare LF and leading empty lines: an app's
        // HTTP server would parse each, so the sidecar must too.
        for line in [
            &b"PROPFIND /dav HTTP/1.1\r\n"[..],
            b"get / HTTP/1.1\r\n",
            b"X-CUSTOM_1 /a?b HTTP/1.1\r\n",
            b"GET / HTTP/1.0\n",
            b"\r\n\r\nFOO / HTTP/1.1\r\n",
            b"GET  /  HTTP/1.1\r\n",
        ] {
            assert_eq!(
                classify(line),
                Some(Protocol::Http),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        let long = format!("GET /{} HTTP/1.1", "a".repeat(9000));
        assert_eq!(
            classify(long.as_bytes()),
            Some(Protocol::Http),
            "refused by the server, not relayed"
        );
    }

    #[tokio::test]
    async fn silence_is_tcp_and_bytes_are_replayed() {
        let (mut a, mut b) = tokio::io::duplex(256);
        let (protocol, seen) = sniff(&mut b, Duration::from_millis(20)).await;
        assert_eq!((protocol, seen.len()), (Protocol::Tcp, 0));

        a.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        let (protocol, seen) = sniff(&mut b, Duration::from_secs(5)).await;
        assert_eq!(protocol, Protocol::Http);
        a.write_all(b"host: x").await.unwrap();
        drop(a);
        let mut rewound = Rewind::new(seen, b);
        let mut all = String::new();
        rewound.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "GET / HTTP/1.1\r\nhost: x");
    }

    #[tokio::test]
    async fn a_caller_stalled_inside_a_request_line_is_not_relayed() {
        let (mut a, mut b) = tokio::io::duplex(256);
        a.write_all(b"GET / HTTP/1").await.unwrap();
        let never = std::future::pending::<()>();
        let seen = sniff_within(&mut b, never, Some(Duration::from_millis(50))).await;
        assert_eq!(seen, None);
        // A whole line in time is HTTP; text that cannot be one is TCP.
        let (mut a, mut b) = tokio::io::duplex(256);
        a.write_all(b"across the mesh").await.unwrap();
        let never = std::future::pending::<()>();
        let seen = sniff_within(&mut b, never, Some(Duration::from_millis(50))).await;
        assert_eq!(seen.map(|s| s.0), Some(Protocol::Tcp));
    }

    #[tokio::test]
    async fn sniffing_through_a_rewind_loses_no_bytes() {
        // Bytes that came with a CONNECT head, then more from the socket:
        // sniffed through the rewind and put back, all reach the reader
        // once and in order, whether the sniff stops inside the prefix or
        // reads past it.
        let long = format!("GET / HTTP/1.1\r\nx-fill: {}\r\n", "a".repeat(80));
        for (early, rest) in [("GE", "T / HTTP/1.1\r\n"), (long.as_str(), "\r\n")] {
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
