//! The server half of an HTTP/1.1 link (15008, ALPN `http/1.1`; the
//! client half is `h1_link`): one exchange at a time, each request read
//! whole by `h1_codec` and delivered by `local_app` as an HTTP/2 link's
//! request is, with the identity the caller's certificate proved.
//!
//! What a peer sends is checked as strictly as an app's request: a head
//! or body the codec refuses gets a 400 (413 for a body over the link's
//! limit) and the connection ends, since the next message's start can no
//! longer be trusted. A connection may wait `IDLE_TIMEOUT` for its next
//! request, longer than the client half keeps it; once a request has
//! begun, the rest of it must arrive within the head timeout. When the
//! sidecar drains, an idle link is closed and a busy one after its
//! answer, which says `connection: close`.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::authorize::Caller;
use crate::h1_codec::{self, WireError};
use crate::h1_link::read_some;
use crate::http::Body;
use crate::local_app::LocalApp;

/// How long a link may wait for its next request: longer than the client
/// half keeps an idle link (`h1_link::IDLE_TIMEOUT`), so that the client
/// closes first and never sends on a link being closed under it.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Why a link ends.
#[derive(Debug, thiserror::Error)]
enum Ended {
    #[error(transparent)]
    Refused(#[from] WireError),
    #[error("the rest of a request did not arrive in time")]
    Slow,
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Serves exchanges on one HTTP/1.1 link until it closes, idles out or
/// the sidecar drains.
pub async fn serve<S>(mut stream: S, caller: Caller, app: Arc<LocalApp>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let drain = app.drain().clone();
    let head_timeout = app.head_timeout();
    let mut buf = BytesMut::with_capacity(8 << 10);
    let mut out = BytesMut::with_capacity(8 << 10);
    loop {
        // The next request's first bytes, or the end of the link.
        if buf.is_empty() {
            let read = tokio::select! {
                read = tokio::time::timeout(IDLE_TIMEOUT, read_some(&mut stream, &mut buf)) => read,
                () = drain.started() => return,
            };
            if !matches!(read, Ok(Ok(1..))) {
                return;
            }
        }
        let request = match tokio::time::timeout(head_timeout, read_request(&mut stream, &mut buf))
            .await
            .unwrap_or(Err(Ended::Slow))
        {
            Ok(request) => request,
            Err(ended) => {
                tracing::debug!(peer = ?caller.identity(), "an HTTP/1.1 link ended: {ended}");
                if let Some(refusal) = refusal(&ended) {
                    app.metrics().inbound_link_refused.inc();
                    let _ =
                        crate::h1_answer::write(&mut stream, &mut out, &Method::GET, refusal, true)
                            .await;
                }
                return;
            }
        };
        let method = request.method().clone();
        let wants_close = h1_codec::closes(request.headers());
        let response = app.mesh_request(&caller, request).await;
        let close = wants_close || drain.is_draining();
        if let Err(err) =
            crate::h1_answer::write(&mut stream, &mut out, &method, response, close).await
        {
            tracing::debug!(peer = ?caller.identity(), "an answer on an HTTP/1.1 link was cut off: {err}");
            return;
        }
        if close {
            let _ = stream.shutdown().await;
            return;
        }
    }
}

/// The answer to a request the link cannot take.
fn refusal(ended: &Ended) -> Option<Response<Body>> {
    let status = match ended {
        Ended::Refused(WireError::BodyTooLarge(_)) => StatusCode::PAYLOAD_TOO_LARGE,
        Ended::Refused(_) => StatusCode::BAD_REQUEST,
        Ended::Slow => StatusCode::REQUEST_TIMEOUT,
        Ended::Io(_) => return None,
    };
    Some(crate::http::error(status, &ended.to_string()))
}

/// Reads one request, head and body, from `buf` and then `stream`.
async fn read_request<S>(stream: &mut S, buf: &mut BytesMut) -> Result<Request<Body>, Ended>
where
    S: AsyncRead + Unpin,
{
    let head = loop {
        if let Some(head) = h1_codec::parse_request(buf)? {
            break head;
        }
        if read_some(stream, buf).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    };
    // Bounded by the codec: at most MAX_REQUEST_BODY.
    let whole = head.length + head.body as usize;
    buf.reserve(whole.saturating_sub(buf.len()));
    while buf.len() < whole {
        if read_some(stream, buf).await? == 0 {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
        }
    }
    let _ = buf.split_to(head.length);
    let body = match head.body {
        0 => crate::http::empty(),
        n => crate::http::full(buf.split_to(n as usize).freeze()),
    };
    Ok(Request::from_parts(head.parts, body))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use bytes::Bytes;
    use http::header::{HeaderMap, HeaderValue};
    use http::{Method, Uri};
    use http_body_util::{BodyExt as _, StreamBody};
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::net::TcpListener;

    use std::net::SocketAddr;

    use super::*;
    use crate::drain::Drain;
    use crate::h1_link::{Connection, Links};
    use crate::http::TARGET;

    /// An HTTP/1.1 app on loopback: `/echo` answers with the request's
    /// body, `/stream` with a body of unknown length in two pieces (the
    /// second after a pause), and HEAD with a length and no body. Counts
    /// the requests it sees.
    async fn app() -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let counted = seen.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let counted = counted.clone();
                let service =
                    hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                        counted.fetch_add(1, Ordering::Relaxed);
                        async move {
                            let path = request.uri().path().to_string();
                            let response = match (request.method().clone(), path.as_str()) {
                                (Method::HEAD, _) => Response::builder()
                                    .header("content-length", "5")
                                    .body(crate::http::empty()),
                                (_, "/stream") => {
                                    let pieces = async_stream(["a", "b"]);
                                    Response::builder().body(http_body_util::BodyExt::boxed(
                                        StreamBody::new(pieces),
                                    ))
                                }
                                _ => {
                                    let body = request.into_body().collect().await?.to_bytes();
                                    Response::builder().body(crate::http::full(body))
                                }
                            };
                            Ok::<_, hyper::Error>(response.unwrap())
                        }
                    });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service),
                );
            }
        });
        (address, seen)
    }

    /// Frames of `pieces`, a pause before each.
    fn async_stream(
        pieces: [&'static str; 2],
    ) -> impl tokio_stream::Stream<Item = Result<hyper::body::Frame<Bytes>, crate::http::BodyError>>
    {
        let (send, receive) = tokio::sync::mpsc::channel(2);
        tokio::spawn(async move {
            for piece in pieces {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = send
                    .send(Ok(hyper::body::Frame::data(Bytes::from(piece))))
                    .await;
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(receive)
    }

    fn server(drain: &Drain) -> (DuplexStream, Arc<LocalApp>) {
        let app = Arc::new(LocalApp::new(
            crate::local_app::Config {
                addresses: vec!["127.0.0.1".parse().unwrap()],
                ..Default::default()
            },
            None,
            Arc::default(),
            drain.clone(),
        ));
        let (client, served) = tokio::io::duplex(64 << 10);
        let caller = Caller::new(None, "127.0.0.9".parse().unwrap());
        tokio::spawn(serve(served, caller, app.clone()));
        (client, app)
    }

    async fn exchange(
        connection: Connection,
        idle: &Arc<crate::h1_link::Idle>,
        method: Method,
        app: SocketAddr,
        path: &str,
        body: &'static str,
    ) -> (Response<()>, Bytes) {
        let uri: Uri = format!("http://echo.demo{path}").parse().unwrap();
        let target = HeaderValue::try_from(app.to_string()).unwrap();
        let response = connection
            .exchange(
                &method,
                &uri,
                &HeaderMap::new(),
                &[(TARGET, &target)],
                &Bytes::from(body),
                idle.clone(),
            )
            .await
            .unwrap();
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (Response::from_parts(parts, ()), body)
    }

    #[tokio::test]
    async fn exchanges_cross_a_link_that_is_kept_for_the_next() {
        let (address, seen) = app().await;
        let drain = Drain::default();
        let (client, _app) = server(&drain);
        let links = Links::new(crate::h1_codec::Speaker::Sidecar);
        let identity = weft_certs::Identity::new("cluster.local", "demo", "echo").unwrap();
        let idle = links.to("127.0.0.1:15008".parse().unwrap(), Some(&identity));

        let connection = Connection::new(client, &idle);
        let (answer, body) =
            exchange(connection, &idle, Method::POST, address, "/echo", "hello").await;
        assert_eq!(
            (answer.status(), &body[..]),
            (StatusCode::OK, &b"hello"[..])
        );
        assert_eq!(
            idle.len(),
            1,
            "read to its end, the link waits for the next exchange"
        );

        let connection = idle.take().expect("the same link");
        let (answer, body) = exchange(connection, &idle, Method::GET, address, "/stream", "").await;
        assert_eq!((answer.status(), &body[..]), (StatusCode::OK, &b"ab"[..]));
        assert!(
            !answer.headers().contains_key("transfer-encoding"),
            "the link's framing is not the app's business"
        );
        assert_eq!(idle.len(), 1);

        let connection = idle.take().expect("the same link");
        let (answer, body) = exchange(connection, &idle, Method::HEAD, address, "/", "").await;
        assert_eq!(answer.headers()["content-length"], "5");
        assert!(body.is_empty());
        assert_eq!(idle.len(), 1);
        assert_eq!(seen.load(Ordering::Relaxed), 3);
        assert_eq!(links.idle(), 1);
    }

    /// Sends `message` as a peer would and reads what comes back until
    /// the link closes.
    async fn raw(client: &mut DuplexStream, message: &[u8]) -> String {
        client.write_all(message).await.unwrap();
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer))
            .await
            .expect("the link closes")
            .unwrap();
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn what_the_link_cannot_frame_is_refused_and_ends_it() {
        let (address, seen) = app().await;
        let drain = Drain::default();
        let cases = [
            (
                format!(
                    "POST http://a/echo HTTP/1.1\r\nx-weft-target: {address}\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n"
                ),
                "HTTP/1.1 400 ",
            ),
            (
                format!(
                    "POST http://a/echo HTTP/1.1\r\nx-weft-target: {address}\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab"
                ),
                "HTTP/1.1 400 ",
            ),
            (
                format!(
                    "POST http://a/echo HTTP/1.1\r\nx-weft-target: {address}\r\ncontent-length: 70000\r\n\r\n"
                ),
                "HTTP/1.1 413 ",
            ),
            (
                "\x16\x03\x01\x02\x00garbage\r\n\r\n".to_string(),
                "HTTP/1.1 400 ",
            ),
        ];
        for (message, status) in cases {
            let (mut client, app) = server(&drain);
            let answer = raw(&mut client, message.as_bytes()).await;
            assert!(answer.starts_with(status), "{message:?} got {answer:?}");
            assert_eq!(app.metrics().inbound_link_refused.get(), 1);
            assert!(answer.contains("connection: close"), "{answer:?}");
        }
        assert_eq!(seen.load(Ordering::Relaxed), 0, "nothing reached the app");

        // A request without a target never reaches the app either, but
        // the link stays: it was framed well.
        let (mut client, _app) = server(&drain);
        client
            .write_all(b"GET http://a/ HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let mut head = [0u8; 12];
        client.read_exact(&mut head).await.unwrap();
        assert_eq!(&head, b"HTTP/1.1 400");
        assert_eq!(seen.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn an_idle_link_closes_when_the_sidecar_drains() {
        let drain = Drain::default();
        let (mut client, _app) = server(&drain);
        tokio::time::sleep(Duration::from_millis(20)).await;
        drain.start();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
            .await
            .expect("the idle link is closed")
            .unwrap();
        assert!(rest.is_empty());
    }
}
