//! A link: one HTTP/2 connection to a peer sidecar (mTLS underneath, kept
//! by `pool`), driven with the h2 crate itself rather than through
//! hyper's client. Three things follow, and are why:
//!
//! - a request is sent from the task that serves the caller, and its
//!   answer is awaited there: hyper's client hands each request to its
//!   dispatch task and spawns another task per stream, two hand-offs each
//!   way on every request;
//! - a tunnel's CONNECT carries the bytes the caller already sent in the
//!   same flight, so a new TCP connection costs one round trip between the
//!   sidecars, not two (the peer buffers them until the app is connected,
//!   and drops them if it answers anything but 200);
//! - a tunnel writes straight into its HTTP/2 stream, without the task
//!   and channel hyper puts behind an upgraded connection.
//!
//! The settings are hyper's client defaults, which the mesh ran on, but
//! for the send buffer (`MAX_SEND_BUFFER`).

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes};
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::http::{Body, BodyError};

const CONNECTION_WINDOW: u32 = 5 << 20;
const STREAM_WINDOW: u32 = 2 << 20;
const MAX_FRAME_SIZE: u32 = 16 << 10;
const MAX_HEADER_LIST_SIZE: u32 = 16 << 10;
/// What a stream may queue in h2 beyond what the connection has written:
/// a writer that runs further ahead (hyper's 1 MiB) sends the window in
/// bursts the peer then works through alone, and cache-cold; a tunnel's
/// single stream carried a third less (perf/results, tunnel).
const MAX_SEND_BUFFER: usize = 32 << 10;
const INITIAL_MAX_SEND_STREAMS: usize = 100;
/// The most a tunnel takes from one write: what h2 may hold past the
/// peer's window.
const MAX_WRITE: usize = 64 << 10;

/// One HTTP/2 connection to a peer sidecar; clones share it.
#[derive(Clone)]
pub struct Link {
    send: SendRequest<Bytes>,
    closed: Arc<AtomicBool>,
    /// Opened as an HTTP/1.1 link, and answered with HTTP/2: the peer
    /// sidecar has no HTTP/1.1 links.
    answered_h1_with_h2: bool,
}

/// Why a request or tunnel failed, and whether the peer may have acted on
/// it: a request that never left (or that the peer refused unprocessed,
/// RFC 9113 8.7) may go to another endpoint whatever it is.
#[derive(Debug)]
pub struct Failure {
    pub error: anyhow::Error,
    pub sent: bool,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.error)
    }
}

impl std::error::Error for Failure {}

impl Failure {
    fn unsent(error: impl Into<anyhow::Error>) -> Self {
        Failure {
            error: error.into(),
            sent: false,
        }
    }

    /// After the stream was opened: sent, unless the peer refused it.
    fn after_send(error: h2::Error) -> Self {
        let sent = error.reason() != Some(Reason::REFUSED_STREAM);
        Failure {
            error: error.into(),
            sent,
        }
    }
}

/// Opens a link over `io` (already mTLS), and drives it on a task of its
/// own until it closes.
pub async fn handshake<T>(io: T) -> Result<Link, h2::Error>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, connection) = h2::client::Builder::new()
        .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .max_header_list_size(MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .enable_push(false)
        .handshake(io)
        .await?;
    let closed = Arc::new(AtomicBool::new(false));
    let done = closed.clone();
    crate::task::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!("a link to a peer sidecar closed: {err}");
        }
        done.store(true, Ordering::Release);
    });
    Ok(Link {
        send,
        closed,
        answered_h1_with_h2: false,
    })
}

impl Link {
    /// Marks a link opened as an HTTP/1.1 link that the peer answered
    /// with HTTP/2.
    pub fn answering_h1_with_h2(mut self) -> Self {
        self.answered_h1_with_h2 = true;
        self
    }

    pub fn answered_h1_with_h2(&self) -> bool {
        self.answered_h1_with_h2
    }

    /// Whether the connection under it has ended (new streams would fail).
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Opens a stream for `head`, waiting while the peer's stream limit
    /// is reached.
    async fn open(
        &self,
        head: Request<()>,
        end_of_stream: bool,
    ) -> Result<(h2::client::ResponseFuture, SendStream<Bytes>), Failure> {
        let mut send = self.send.clone().ready().await.map_err(Failure::unsent)?;
        send.send_request(head, end_of_stream)
            .map_err(Failure::unsent)
    }

    /// Sends one HTTP request (absolute URI, no connection-specific
    /// headers) and gives its answer, whose body streams from the peer.
    /// A request body is sent on a task of its own while the answer is
    /// awaited, as a streaming call needs.
    pub async fn request(&self, request: Request<Body>) -> Result<Response<Body>, Failure> {
        let (mut head, body) = request.into_parts();
        // HTTP/2 forbids them; a header rule could have added one.
        crate::http::strip_hop_by_hop(&mut head.headers);
        let empty = body.is_end_stream();
        let (answer, stream) = self.open(Request::from_parts(head, ()), empty).await?;
        if !empty {
            send_body_now(body, stream);
        }
        let response = answer.await.map_err(Failure::after_send)?;
        Ok(response.map(|received| Received::new(received).boxed()))
    }

    /// A tunnel to `target` through the peer: a CONNECT stream, carrying
    /// `early` (what the caller already sent) right behind its headers.
    /// Fails unless the peer answers 200, which it does once the app is
    /// connected; any other answer means nothing reached the app.
    pub async fn tunnel(&self, target: &str, early: Bytes) -> Result<Tunnel, Failure> {
        let head = Request::builder()
            .method(Method::CONNECT)
            .uri(target)
            .body(())
            .map_err(Failure::unsent)?;
        let (answer, mut send) = self.open(head, false).await?;
        let sent = !early.is_empty();
        if sent {
            // Buffered by h2 until the peer's window admits it; a few KiB
            // at most (what one read found waiting).
            send.send_data(early, false).map_err(|err| Failure {
                error: err.into(),
                sent,
            })?;
        }
        let response = answer.await.map_err(|err| {
            let mut failure = Failure::after_send(err);
            // A CONNECT alone acted on nothing.
            failure.sent &= sent;
            failure
        })?;
        if response.status() != StatusCode::OK {
            return Err(Failure::unsent(anyhow::anyhow!(
                "the peer sidecar answered {} to CONNECT {target}",
                response.status()
            )));
        }
        Ok(Tunnel {
            send,
            recv: response.into_body(),
            received: Bytes::new(),
            finished: false,
        })
    }
}

/// Sends a request body that is already here whole (most are: a small
/// body arrives with its headers) in one DATA frame that also ends the
/// stream, on the caller's task; anything else streams on a task of its
/// own. The stream's end rides on the last data whenever the body says
/// it has ended: sent apart, it can reach a peer that has already
/// answered and reset the stream, and HTTP/2 servers count frames for
/// streams they reset, closing the whole connection (with every request
/// on it) past a limit: h2's is 1,024, which a busy link reached.
fn send_body_now(mut body: Body, mut stream: SendStream<Bytes>) {
    // A no-op waker: if the body is not ready, the task below polls it
    // again with its own.
    let mut cx = Context::from_waker(std::task::Waker::noop());
    let first = match Pin::new(&mut body).poll_frame(&mut cx) {
        Poll::Pending => None,
        Poll::Ready(Some(Ok(frame))) if frame.is_data() && body.is_end_stream() => {
            let data = frame.into_data().unwrap_or_default();
            stream.reserve_capacity(data.len());
            if stream.capacity() >= data.len() {
                if let Err(err) = stream.send_data(data, true) {
                    tracing::debug!("a request body was cut off: {err}");
                    stream.send_reset(Reason::CANCEL);
                }
                return;
            }
            Some(Some(Ok(Frame::data(data))))
        }
        Poll::Ready(polled) => Some(polled),
    };
    crate::task::spawn(send_body(first, body, stream));
}

/// A body's next frame, as `Body::frame` gives it.
type Polled = Option<Result<Frame<Bytes>, BodyError>>;

/// Streams a request body into its HTTP/2 stream, `first` (what a poll
/// already took from it) ahead, as the peer's window allows; resets the
/// stream if the body fails or the peer resets it.
async fn send_body(first: Option<Polled>, mut body: Body, mut stream: SendStream<Bytes>) {
    let sent = async {
        let mut taken = first;
        loop {
            let frame = match taken.take() {
                Some(frame) => frame,
                None => tokio::select! {
                    frame = body.frame() => frame,
                    reset = poll_fn(|cx| stream.poll_reset(cx)) => {
                        let reason = reset.map_or_else(|e| e.to_string(), |r| r.to_string());
                        return Err(format!("the peer reset the request: {reason}"));
                    }
                },
            };
            let Some(frame) = frame else {
                return stream
                    .send_data(Bytes::new(), true)
                    .map_err(|e| e.to_string());
            };
            let data = match frame.map_err(|e| e.to_string())?.into_data() {
                Ok(data) => data,
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => {
                        return stream.send_trailers(trailers).map_err(|e| e.to_string());
                    }
                    Err(_) => continue,
                },
            };
            let end = body.is_end_stream();
            send_all(&mut stream, data, end)
                .await
                .map_err(|e| e.to_string())?;
            if end {
                return Ok(());
            }
        }
    };
    if let Err(err) = sent.await {
        tracing::debug!("a request body was cut off: {err}");
        stream.send_reset(Reason::CANCEL);
    }
}

/// Sends `data`, a window's worth at a time, the last piece ending the
/// stream when `end`.
async fn send_all(
    stream: &mut SendStream<Bytes>,
    mut data: Bytes,
    end: bool,
) -> Result<(), h2::Error> {
    if data.is_empty() {
        return if end {
            stream.send_data(data, true)
        } else {
            Ok(())
        };
    }
    while data.has_remaining() {
        stream.reserve_capacity(data.len());
        let mut granted = stream.capacity();
        while granted == 0 {
            granted = match poll_fn(|cx| stream.poll_capacity(cx)).await {
                Some(granted) => granted?,
                None => return Err(h2::Error::from(Reason::STREAM_CLOSED)),
            };
        }
        let chunk = data.split_to(granted.min(data.len()));
        stream.send_data(chunk, end && data.is_empty())?;
    }
    Ok(())
}

/// An answer's body as it arrives, returning each chunk's flow-control
/// credit as it is handed on.
struct Received {
    stream: RecvStream,
    data_done: bool,
}

impl Received {
    fn new(stream: RecvStream) -> Self {
        Received {
            stream,
            data_done: false,
        }
    }
}

impl hyper::body::Body for Received {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        if !self.data_done {
            match ready!(self.stream.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = self.stream.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(err.into()))),
                None => self.data_done = true,
            }
        }
        Poll::Ready(match ready!(self.stream.poll_trailers(cx)) {
            Ok(Some(trailers)) => Some(Ok(Frame::trailers(trailers))),
            Ok(None) => None,
            Err(err) => Some(Err(err.into())),
        })
    }

    fn is_end_stream(&self) -> bool {
        self.stream.is_end_stream()
    }
}

/// A TCP connection carried as a CONNECT stream.
#[derive(Debug)]
pub struct Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received and not yet read.
    received: Bytes,
    /// Our half is closed (end of stream sent).
    finished: bool,
}

pub(crate) fn io_error(err: h2::Error) -> std::io::Error {
    if err.is_io() {
        err.into_io()
            .unwrap_or_else(|| std::io::ErrorKind::BrokenPipe.into())
    } else {
        std::io::Error::other(err)
    }
}

impl Tunnel {
    /// The stream's two halves and what was received and not yet read,
    /// for a relay that moves whole buffers (`splice`).
    pub(crate) fn into_parts(self) -> (SendStream<Bytes>, RecvStream, Bytes) {
        (self.send, self.recv, self.received)
    }
}

impl AsyncRead for Tunnel {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        while self.received.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => self.received = data,
                // The peer ending the stream abruptly but cleanly is an
                // end of file, as a TCP FIN would be.
                Some(Err(err))
                    if matches!(err.reason(), Some(Reason::NO_ERROR | Reason::CANCEL)) =>
                {
                    return Poll::Ready(Ok(()));
                }
                Some(Err(err)) => return Poll::Ready(Err(io_error(err))),
            }
        }
        let n = self.received.len().min(buf.remaining());
        buf.put_slice(&self.received[..n]);
        self.received.advance(n);
        let _ = self.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Tunnel {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        // Whole writes as soon as the window has any room: h2 holds what
        // is beyond it (one write at most), so that a window update finds
        // data ready to go, and frames stay as large as the writes.
        self.send.reserve_capacity(1);
        while self.send.capacity() == 0 {
            match ready!(self.send.poll_capacity(cx)) {
                None => return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
                Some(granted) => granted.map_err(io_error)?,
            };
        }
        let n = buf.len().min(MAX_WRITE);
        self.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // The link's task writes whatever the stream has queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.finished {
            self.finished = true;
            self.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// A TCP connection, or one carried as a CONNECT stream. What the mesh
/// mTLS to a peer sidecar runs over (directly, or through a gateway), and
/// what an outbound TCP connection is relayed to. One type, so that the
/// TLS, HTTP/2 and upgrade code over it exists once in the binary.
pub enum Carrier {
    Tcp(TcpStream),
    Tunnel(Tunnel),
}

impl tokio::io::AsyncRead for Carrier {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Carrier::Tcp(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Carrier::Tunnel(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for Carrier {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Carrier::Tcp(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Carrier::Tunnel(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Carrier::Tcp(s) => std::pin::Pin::new(s).poll_flush(cx),
            Carrier::Tunnel(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Carrier::Tcp(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Carrier::Tunnel(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use http_body_util::StreamBody;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A link to an h2 server on the other end of an in-memory pipe,
    /// whose streams `serve` gets one at a time.
    pub(crate) async fn linked<F, Fut>(serve: F) -> Link
    where
        F: Fn(Request<RecvStream>, h2::server::SendResponse<Bytes>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let (near, far) = tokio::io::duplex(1 << 20);
        tokio::spawn(async move {
            let mut server = h2::server::handshake(far).await.unwrap();
            while let Some(Ok((request, respond))) = server.accept().await {
                tokio::spawn(serve(request, respond));
            }
        });
        handshake(near).await.unwrap()
    }

    pub(crate) async fn all_data(stream: &mut RecvStream) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(data) = stream.data().await {
            let data = data.unwrap();
            let _ = stream.flow_control().release_capacity(data.len());
            all.extend_from_slice(&data);
        }
        all
    }

    #[tokio::test]
    async fn a_request_streams_its_body_and_trailers_both_ways() {
        let link = linked(|request, mut respond| async move {
            let (head, mut body) = request.into_parts();
            assert_eq!(head.uri, "http://echo.demo/call");
            assert!(head.headers.get("connection").is_none());
            let got = all_data(&mut body).await;
            let trailers = body.trailers().await.unwrap().unwrap();
            let mut send = respond.send_response(Response::new(()), false).unwrap();
            send.send_data(Bytes::from(got), false).unwrap();
            send.send_trailers(trailers).unwrap();
        })
        .await;
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        let frames: Vec<Result<Frame<Bytes>, BodyError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"one "))),
            Ok(Frame::data(Bytes::from(vec![b'x'; 100_000]))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = StreamBody::new(tokio_stream::iter(frames)).boxed();
        let request = Request::post("http://echo.demo/call")
            .header("connection", "close")
            .body(body)
            .unwrap();
        let response = link.request(request).await.unwrap();
        let collected = response.into_body().collect().await.unwrap();
        let trailers = collected.trailers().cloned().unwrap();
        let bytes = collected.to_bytes();
        assert_eq!(bytes.len(), 4 + 100_000);
        assert!(bytes.starts_with(b"one x"));
        assert_eq!(trailers["grpc-status"], "0");
    }

    /// A body that says it has ended once its one chunk is out, and then
    /// never yields its end; on `wait_first`, not ready when first asked.
    struct Ending {
        data: Option<Bytes>,
        wait_first: bool,
    }

    impl hyper::body::Body for Ending {
        type Data = Bytes;
        type Error = BodyError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
            if std::mem::take(&mut self.wait_first) {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            match self.data.take() {
                Some(data) => Poll::Ready(Some(Ok(Frame::data(data)))),
                None => Poll::Pending,
            }
        }

        fn is_end_stream(&self) -> bool {
            self.data.is_none()
        }
    }

    #[tokio::test]
    async fn a_request_body_ends_its_stream_with_its_last_data() {
        let link = linked(|request, mut respond| async move {
            let mut body = request.into_body();
            let data = body.data().await.unwrap().unwrap();
            // The end came with the data: nothing more is awaited.
            let next = tokio::time::timeout(std::time::Duration::from_secs(5), body.data())
                .await
                .expect("the stream's end, with the data");
            assert!(next.is_none());
            let mut send = respond.send_response(Response::new(()), false).unwrap();
            send.send_data(data, true).unwrap();
        })
        .await;
        // Ready at once (sent on the caller's task), then not (on a task).
        for wait_first in [false, true] {
            let body = Ending {
                data: Some(Bytes::from(vec![b'x'; 1024])),
                wait_first,
            };
            let request = Request::post("http://echo.demo/call")
                .body(body.boxed())
                .unwrap();
            let response = link.request(request).await.unwrap();
            let echoed = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(echoed.len(), 1024, "wait_first: {wait_first}");
        }
    }

    #[tokio::test]
    async fn a_tunnel_carries_the_early_bytes_with_its_connect() {
        let link = linked(|request, mut respond| async move {
            assert_eq!(request.method(), Method::CONNECT);
            let mut body = request.into_body();
            // Read before answering: the bytes came with the CONNECT, not
            // after a 200 (which a client waiting for one would need).
            let early = body.data().await.unwrap().unwrap();
            let _ = body.flow_control().release_capacity(early.len());
            let mut send = respond.send_response(Response::new(()), false).unwrap();
            send.send_data(early, false).unwrap();
            let rest = all_data(&mut body).await;
            send.send_data(Bytes::from(rest), true).unwrap();
        })
        .await;
        let mut tunnel = link
            .tunnel("10.0.0.1:6379", Bytes::from_static(b"PING\r\n"))
            .await
            .unwrap();
        let mut echoed = [0u8; 6];
        tunnel.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"PING\r\n");
        tunnel.write_all(&vec![7u8; 300_000]).await.unwrap();
        tunnel.shutdown().await.unwrap();
        let mut rest = Vec::new();
        tunnel.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest.len(), 300_000);
    }

    #[tokio::test]
    async fn a_refused_tunnel_says_whether_its_early_bytes_may_have_reached_an_app() {
        let link = linked(|request, mut respond| async move {
            match request.uri().port_u16() {
                // Refused by status: the app was never connected to.
                Some(1) => {
                    let mut forbidden = Response::new(());
                    *forbidden.status_mut() = StatusCode::FORBIDDEN;
                    let _ = respond.send_response(forbidden, true);
                }
                // Refused unprocessed (RFC 9113 8.7).
                Some(2) => respond.send_reset(Reason::REFUSED_STREAM),
                // Failed after taking the bytes: they may have gone on.
                _ => respond.send_reset(Reason::INTERNAL_ERROR),
            }
        })
        .await;
        let early = || Bytes::from_static(b"hello");
        let status = link.tunnel("10.0.0.1:1", early()).await.unwrap_err();
        assert!(
            !status.sent && status.to_string().contains("403"),
            "{status}"
        );
        let refused = link.tunnel("10.0.0.1:2", early()).await.unwrap_err();
        assert!(!refused.sent, "{refused}");
        let failed = link.tunnel("10.0.0.1:3", early()).await.unwrap_err();
        assert!(failed.sent, "{failed}");
        // Without early bytes a failed CONNECT acted on nothing.
        let bare = link.tunnel("10.0.0.1:3", Bytes::new()).await.unwrap_err();
        assert!(!bare.sent, "{bare}");
        assert!(!link.is_closed());
    }

    #[tokio::test]
    async fn a_closed_link_says_so_and_its_requests_were_not_sent() {
        let (near, far) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(async move {
            let mut server = h2::server::handshake(far).await.unwrap();
            // Accept nothing; go away once the client has spoken.
            server.graceful_shutdown();
            while let Some(Ok(_)) = server.accept().await {}
        });
        let link = handshake(near).await.unwrap();
        let _ = server.await;
        let request = Request::get("http://echo.demo/")
            .body(crate::http::empty())
            .unwrap();
        let failure = link.request(request).await.unwrap_err();
        assert!(!failure.sent, "{failure}");
        for _ in 0..100 {
            if link.is_closed() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the link did not notice its connection closed");
    }
}
