//! An application's HTTP/1.1, read by weft's own codec (`h1_codec`) for
//! as long as its requests are plain: HTTP/1.1, no body or a
//! `Content-Length` body of at most 64 KiB, a head of at most 16 KiB that
//! parses, and no `Transfer-Encoding`, `Expect` or `Upgrade`. Each is
//! read whole, routed by `l7::forward` and answered by `h1_answer`, on
//! the connection's own task.
//!
//! The first request that is anything else (HTTP/2's preface, HTTP/1.0,
//! a chunked or large body, an upgrade, two lengths, a head that does
//! not parse or is too long) hands the connection, that request's bytes
//! first, to hyper's server for the rest of its life: what the codec does
//! not take on is answered as before, never guessed at. As with hyper, a
//! connection's first request must arrive within the head timeout of its
//! first bytes, and each later one within the head timeout of when it is
//! awaited, idle keep-alive time included.

use std::sync::Arc;

use bytes::BytesMut;
use http::{Method, Request, header};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::Outbound;
use super::l7::{Route, forward, serve_with_hyper};
use crate::h1_codec::{self, RequestHead};
use crate::h1_link::read_some;
use crate::sniff::Rewind;

/// Serves HTTP/1.1 or HTTP/2 (prior knowledge) from an application
/// connection, routing each request, until it closes, drains, or hands
/// over to hyper.
pub(super) async fn serve<S>(outbound: Arc<Outbound>, mut io: S, route: Route)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let drain = outbound.drain.clone();
    let head_timeout = outbound.config.head_timeout;
    let mut buf = BytesMut::with_capacity(8 << 10);
    let mut out = BytesMut::with_capacity(8 << 10);
    let mut first = true;
    loop {
        // As hyper's server: a connection's first head within the head
        // timeout of its first bytes; each later one within the head
        // timeout of when it is awaited, idle keep-alive time included.
        let mut deadline = tokio::time::Instant::now() + head_timeout;
        if buf.is_empty() {
            let next = async {
                match first {
                    true => Ok(read_some(&mut io, &mut buf).await),
                    false => tokio::time::timeout_at(deadline, read_some(&mut io, &mut buf)).await,
                }
            };
            let read = tokio::select! {
                read = next => read,
                () = drain.started() => return,
            };
            if !matches!(read, Ok(Ok(1..))) {
                return;
            }
            if first {
                deadline = tokio::time::Instant::now() + head_timeout;
            }
        }
        first = false;
        let head = match tokio::time::timeout_at(deadline, plain_request(&mut io, &mut buf)).await {
            Ok(Ok(Some(head))) => head,
            Ok(Ok(None)) => {
                // Not plain: hyper takes the connection from this
                // request on.
                let rest = buf.split().freeze();
                return serve_with_hyper(outbound, Rewind::new(rest, io), route).await;
            }
            // A head or body too slow to arrive, or a broken connection.
            Ok(Err(_)) | Err(_) => return,
        };
        let _ = buf.split_to(head.length);
        let body = match head.body {
            0 => crate::http::empty(),
            n => crate::http::full(buf.split_to(n as usize).freeze()),
        };
        let request = Request::from_parts(head.parts, body);
        let method = request.method().clone();
        let wants_close = h1_codec::closes(request.headers());
        let response = forward(&outbound, &route, request).await;
        let close = wants_close || drain.is_draining();
        if crate::h1_answer::write(&mut io, &mut out, &method, response, close)
            .await
            .is_err()
        {
            return;
        }
        if close {
            let _ = io.shutdown().await;
            return;
        }
    }
}

/// Reads a request's head and body into `buf`, if the request is plain;
/// `None` (nothing taken from `buf`) if it is not.
async fn plain_request<S>(io: &mut S, buf: &mut BytesMut) -> std::io::Result<Option<RequestHead>>
where
    S: AsyncRead + Unpin,
{
    let head = loop {
        match h1_codec::parse_request(buf) {
            Ok(Some(head)) => break head,
            Ok(None) => {}
            // HTTP/2's preface, HTTP/1.0, chunked, two lengths, too
            // large, not HTTP: hyper's to answer.
            Err(_) => return Ok(None),
        }
        if read_some(io, buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    };
    let headers = &head.parts.headers;
    if head.parts.method == Method::CONNECT
        || headers.contains_key(header::EXPECT)
        || headers.contains_key(header::UPGRADE)
    {
        return Ok(None);
    }
    let whole = head.length + head.body as usize;
    buf.reserve(whole.saturating_sub(buf.len()));
    while buf.len() < whole {
        if read_some(io, buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(Some(head))
}
