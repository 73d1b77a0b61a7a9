//! The client half of an HTTP/1.1 link: one mTLS connection to a peer
//! sidecar's 15008 (ALPN `http/1.1`) carrying one exchange at a time,
//! written and read by `h1_codec` on the task that serves the caller.
//!
//! Why a second kind of link: on the HTTP/2 link every request crosses to
//! the connection's own task and back, and is framed twice more (HPACK,
//! DATA frames, window updates). An HTTP/1.1 app's small request needs
//! none of it: here its head and body leave in one write and its answer
//! is read where it is awaited. A request whose body is larger than
//! `MAX_REQUEST_BODY` or of unknown length, HTTP/2 and gRPC, upgrades,
//! tunnels and peers behind a gateway stay on the HTTP/2 link.
//!
//! The server sidecar speaks to its own app the same way (`local_app`):
//! an HTTP/1.1 request with a small body of known length goes over a
//! kept-alive TCP connection to the app, in origin form, and the app's
//! answer is read as HTTP/1.1 servers give it (`Speaker::App`).
//!
//! Connections wait between exchanges in `Idle` for `IDLE_TIMEOUT`,
//! shorter than the server half's, so that the client is the one to close
//! an idle link. A connection goes back only once its answer has been
//! read to the end, and without a buffer. At most `MAX_OPEN` are open to
//! a peer; past that,
//! exchanges take the HTTP/2 link.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, Uri};
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use weft_certs::Identity;

use crate::h1_codec::{self, Dechunk, Decoded, Framing, Speaker};
use crate::http::{Body, BodyError, strip_hop_by_hop};
use crate::link::Failure;

/// The most HTTP/1.1 links open to one peer sidecar, idle or not. Past
/// it, exchanges take the peer's HTTP/2 link, which multiplexes: a burst
/// of callers costs no more connections and memory than this.
pub const MAX_OPEN: usize = 64;
/// How long a connection may wait idle before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// What a connection's read buffer starts with, and is cut back to when
/// it goes idle.
const BUFFER: usize = 8 << 10;
/// What a request head is written into first: most fit, and an
/// allocation this small is one of the allocator's quick ones.
const HEAD_ROOM: usize = 512;

/// A stream a link runs on: mTLS in the sidecar, anything in tests.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static> Stream for T {}

/// One HTTP/1.1 link to a peer sidecar.
pub struct Connection {
    stream: Box<dyn Stream>,
    /// Its share of its peer's open links.
    _open: Open,
    /// Read and not yet taken.
    buf: BytesMut,
    idle_since: Instant,
    /// Whether it has carried an exchange before this one.
    reused: bool,
}

/// One open link, counted while it lasts.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connection {
    /// A new link to the peer whose idle links are `idle`.
    pub fn new(stream: impl Stream, idle: &Idle) -> Self {
        idle.open.fetch_add(1, Ordering::Relaxed);
        Connection {
            stream: Box::new(stream),
            _open: Open(idle.open.clone()),
            buf: BytesMut::with_capacity(BUFFER),
            idle_since: Instant::now(),
            reused: false,
        }
    }

    /// Whether it has carried an exchange before.
    pub fn is_reused(&self) -> bool {
        self.reused
    }

    /// Whether the peer has neither closed it nor sent anything unasked,
    /// looked at without waiting.
    fn is_open(&mut self) -> bool {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut probe = [0u8; 1];
        let mut read = tokio::io::ReadBuf::new(&mut probe);
        matches!(
            Pin::new(&mut self.stream).poll_read(&mut cx, &mut read),
            Poll::Pending
        )
    }

    /// Sends one request, whole, and reads its answer's head; the
    /// answer's body streams from this connection, which goes back to
    /// `idle` once the body has been read to its end.
    pub async fn exchange(
        mut self,
        method: &Method,
        uri: &Uri,
        headers: &HeaderMap,
        own: &[(HeaderName, &HeaderValue)],
        body: &Bytes,
        idle: Arc<Idle>,
    ) -> Result<Response<Body>, Failure> {
        let to = idle.speaker;
        let mut head = BytesMut::with_capacity(HEAD_ROOM);
        h1_codec::put_request_head(&mut head, method, uri, headers, own, body.len(), to);
        // Head and body go out in one vectored write (one TLS record to a
        // peer, one segment to the app), not copied together first. A
        // write that fails leaves the message's last TLS record
        // incomplete: the peer cannot have acted on it.
        let written = async {
            self.stream
                .write_all_buf(&mut Buf::chain(&head[..], &body[..]))
                .await?;
            self.stream.flush().await
        };
        if let Err(err) = written.await {
            return Err(Failure {
                error: anyhow::Error::from(err).context("writing to the peer sidecar"),
                sent: false,
            });
        }
        let head = loop {
            match h1_codec::parse_response(&self.buf, method, to) {
                // An app's 100 Continue or 103 Early Hints: the answer
                // follows it.
                Ok(Some(head)) if head.parts.status.is_informational() => {
                    let _ = self.buf.split_to(head.length);
                    continue;
                }
                Ok(Some(head)) => break head,
                Ok(None) => {}
                Err(err) => return Err(sent(anyhow::Error::from(err))),
            }
            room(&mut self.buf);
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => {
                    return Err(sent(anyhow::anyhow!(
                        "the peer sidecar closed the link before answering{}",
                        if self.reused { " (a reused link)" } else { "" }
                    )));
                }
                Ok(_) => {}
                Err(err) => return Err(sent(anyhow::Error::from(err))),
            }
        };
        let _ = self.buf.split_to(head.length);
        let reusable = head.keep_alive;
        let mut parts = head.parts;
        strip_hop_by_hop(&mut parts.headers);
        let idle = reusable.then_some(idle);
        let body = match head.framing {
            Framing::Length(0) => {
                if let Some(idle) = idle {
                    idle.put(self);
                }
                crate::http::empty()
            }
            framing => http_body_util::BodyExt::boxed(Answer {
                connection: Some(self),
                reading: match framing {
                    Framing::Length(left) => Reading::Length(left),
                    Framing::Chunked => Reading::Chunked(Dechunk::default()),
                    Framing::UntilClose => Reading::UntilClose,
                },
                idle,
            }),
        };
        Ok(Response::from_parts(parts, body))
    }
}

/// Room for a read of a useful size: `read_buf` into a full buffer
/// would grow it 64 bytes at a time.
pub fn room(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < BUFFER / 2 {
        buf.reserve(BUFFER);
    }
}

/// One read into `buf`, with room for a useful one.
pub async fn read_some<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
) -> std::io::Result<usize> {
    room(buf);
    io.read_buf(buf).await
}

/// After the request left: the peer may have acted on it.
fn sent(error: anyhow::Error) -> Failure {
    Failure { error, sent: true }
}

enum Reading {
    Length(u64),
    Chunked(Dechunk),
    /// To the connection's end (an app's answer without a length).
    UntilClose,
}

/// An answer's body as it arrives on its link.
struct Answer {
    /// `None` once the body has ended (or failed).
    connection: Option<Connection>,
    reading: Reading,
    /// Where the connection goes when the body has ended; `None`: it is
    /// closed then (the peer said so).
    idle: Option<Arc<Idle>>,
}

impl Answer {
    /// The body has ended: the connection may carry the next exchange,
    /// unless the peer sent more than it was asked for.
    fn end(&mut self) {
        if let (Some(connection), Some(idle)) = (self.connection.take(), self.idle.take())
            && connection.buf.is_empty()
        {
            idle.put(connection);
        }
    }

    fn fail(
        &mut self,
        error: impl Into<BodyError>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.connection = None;
        Poll::Ready(Some(Err(error.into())))
    }
}

impl hyper::body::Body for Answer {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        loop {
            let Some(connection) = this.connection.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut this.reading {
                Reading::Length(0) => {
                    this.end();
                    return Poll::Ready(None);
                }
                Reading::Length(left) => {
                    if !connection.buf.is_empty() {
                        let n = (*left).min(connection.buf.len() as u64) as usize;
                        *left -= n as u64;
                        let data = connection.buf.split_to(n).freeze();
                        if *left == 0 {
                            // Back to the pool now: the caller may stop
                            // polling once the body says it has ended.
                            this.end();
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Reading::Chunked(dechunk) => match dechunk.next(&mut connection.buf) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::End(trailers)) => {
                        this.end();
                        return Poll::Ready(
                            (!trailers.is_empty()).then(|| Ok(Frame::trailers(trailers))),
                        );
                    }
                    Ok(Decoded::Short) => {}
                    Err(err) => return this.fail(err),
                },
                Reading::UntilClose => {
                    if !connection.buf.is_empty() {
                        let data = connection.buf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            room(&mut connection.buf);
            match tokio_util::io::poll_read_buf(
                Pin::new(&mut connection.stream),
                cx,
                &mut connection.buf,
            ) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if matches!(this.reading, Reading::UntilClose) => {
                    this.connection = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    return this.fail(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the peer sidecar closed the link in the middle of an answer",
                    ));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(err)) => return this.fail(err),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.connection.is_none() || matches!(self.reading, Reading::Length(0))
    }

    fn size_hint(&self) -> SizeHint {
        match self.reading {
            Reading::Length(left) => SizeHint::with_exact(left),
            Reading::Chunked(_) | Reading::UntilClose => SizeHint::default(),
        }
    }
}

/// The idle links to one peer sidecar, which proved `identity`, or to
/// the app behind this sidecar (no identity).
pub struct Idle {
    identity: Option<Identity>,
    /// Who answers on these links.
    speaker: Speaker,
    connections: Mutex<Vec<Connection>>,
    /// Links open to the peer, idle or carrying an exchange.
    open: Arc<AtomicUsize>,
}

impl Idle {
    fn new(identity: Option<Identity>, speaker: Speaker) -> Self {
        Idle {
            identity,
            speaker,
            connections: Mutex::new(Vec::new()),
            open: Arc::default(),
        }
    }

    /// Whether another link may be opened to the peer.
    pub fn may_open(&self) -> bool {
        self.open.load(Ordering::Relaxed) < MAX_OPEN
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Connection>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The most recently used connection that is still open.
    pub fn take(&self) -> Option<Connection> {
        let mut connections = self.lock();
        while let Some(mut connection) = connections.pop() {
            if connection.idle_since.elapsed() < IDLE_TIMEOUT && connection.is_open() {
                connection.reused = true;
                return Some(connection);
            }
        }
        None
    }

    fn put(&self, mut connection: Connection) {
        // An idle link holds no buffer of its own (what is left may be
        // shared with the last answer's body); the next exchange takes
        // one.
        connection.buf = BytesMut::new();
        connection.idle_since = Instant::now();
        self.lock().push(connection);
    }

    /// Closes the connections idle for too long.
    fn expire(&self) {
        self.lock()
            .retain(|c| c.idle_since.elapsed() < IDLE_TIMEOUT);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The idle links of every peer sidecar, or to the app.
pub struct Links {
    peers: Arc<Mutex<HashMap<SocketAddr, Arc<Idle>>>>,
    speaker: Speaker,
}

impl Links {
    /// Links whose answers come from `speaker`.
    pub fn new(speaker: Speaker) -> Self {
        Links {
            peers: Arc::default(),
            speaker,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<Idle>>> {
        self.peers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The idle links to `peer`, which must prove `identity` (the app:
    /// none): a peer address now held by another identity starts afresh.
    pub fn to(&self, peer: SocketAddr, identity: Option<&Identity>) -> Arc<Idle> {
        let mut peers = self.lock();
        if peers.is_empty() {
            crate::task::spawn(expire(Arc::downgrade(&self.peers)));
        }
        match peers.get(&peer) {
            Some(idle) if idle.identity.as_ref() == identity => idle.clone(),
            _ => {
                let idle = Arc::new(Idle::new(identity.cloned(), self.speaker));
                peers.insert(peer, idle.clone());
                idle
            }
        }
    }

    /// Idle links, over all peers.
    pub fn idle(&self) -> usize {
        self.lock().values().map(|idle| idle.len()).sum()
    }
}

/// Closes links idle for too long, and forgets peers with none, until the
/// pool is gone.
async fn expire(peers: Weak<Mutex<HashMap<SocketAddr, Arc<Idle>>>>) {
    loop {
        tokio::time::sleep(IDLE_TIMEOUT / 2).await;
        let Some(peers) = peers.upgrade() else {
            return;
        };
        let mut peers = peers.lock().unwrap_or_else(|p| p.into_inner());
        for idle in peers.values() {
            idle.expire();
        }
        // A peer still in use keeps its entry while an exchange holds it.
        peers.retain(|_, idle| !idle.is_empty() || Arc::strong_count(idle) > 1);
        if peers.is_empty() {
            // Started again with the next peer.
            return;
        }
    }
}
