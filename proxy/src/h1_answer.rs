//! Writing an answer on an HTTP/1.1 connection with weft's own codec:
//! the server half of an HTTP/1.1 link (`inbound_h1`) and the sidecar's
//! side of an application's connection (`outbound::h1`) both answer this
//! way. The head and as much of the body as is ready leave in one write;
//! a body of unknown length is chunked.

use bytes::BytesMut;
use http::{Method, Response};
use http_body_util::BodyExt as _;
use hyper::body::Body as _;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::h1_codec::{self, Framing};
use crate::http::Body;

/// Past this much, a response's body is written before more is taken.
const WRITE_AT: usize = 64 << 10;

/// Writes an answer: the head and as much body as is ready in one write,
/// then the rest as it comes, flushed whenever the app pauses.
pub async fn write<S>(
    stream: &mut S,
    out: &mut BytesMut,
    method: &Method,
    response: Response<Body>,
    close: bool,
) -> std::io::Result<()>
where
    S: AsyncWrite + Unpin,
{
    let (parts, mut body) = response.into_parts();
    out.clear();
    if h1_codec::bodiless(method, parts.status) {
        h1_codec::put_response_head(out, &parts, None, close);
        return send(stream, out, true).await;
    }
    // Chunked when the app's body did not say its length.
    let length = body.size_hint().exact();
    let framing = length.map_or(Framing::Chunked, Framing::Length);
    h1_codec::put_response_head(out, &parts, Some(framing), close);
    let mut left = length.unwrap_or(u64::MAX);
    loop {
        // What the body has ready now goes with what is written already;
        // when it has nothing ready, what is written leaves first.
        let frame = match now_or_never(&mut body) {
            Some(frame) => frame,
            None => {
                send(stream, out, true).await?;
                body.frame().await
            }
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(std::io::Error::other)?;
        match (frame.into_data(), length) {
            (Ok(data), Some(_)) => {
                // A body longer than it said would be read as the next
                // answer.
                if data.len() as u64 > left {
                    return Err(std::io::Error::other("a body longer than its length"));
                }
                left -= data.len() as u64;
                out.extend_from_slice(&data);
            }
            (Ok(data), None) => h1_codec::put_chunk(out, &data),
            (Err(frame), None) => {
                if let Ok(trailers) = frame.into_trailers() {
                    h1_codec::put_last_chunk(out, Some(&trailers));
                    return send(stream, out, true).await;
                }
            }
            // Trailers cannot follow a body framed by its length; an app
            // speaking HTTP/1.1 sends them only on a chunked body.
            (Err(_), Some(_)) => {}
        }
        if out.len() >= WRITE_AT {
            send(stream, out, false).await?;
        }
    }
    match length {
        None => h1_codec::put_last_chunk(out, None),
        Some(_) if left > 0 => {
            return Err(std::io::Error::other("a body shorter than its length"));
        }
        Some(_) => {}
    }
    send(stream, out, true).await
}

/// The body's next frame if it is ready without waiting.
fn now_or_never(
    body: &mut Body,
) -> Option<Option<Result<hyper::body::Frame<bytes::Bytes>, crate::http::BodyError>>> {
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match std::pin::Pin::new(body).poll_frame(&mut cx) {
        std::task::Poll::Ready(frame) => Some(frame),
        std::task::Poll::Pending => None,
    }
}

/// Writes what `out` holds, and flushes it when `flush`.
async fn send<S: AsyncWrite + Unpin>(
    stream: &mut S,
    out: &mut BytesMut,
    flush: bool,
) -> std::io::Result<()> {
    if !out.is_empty() {
        stream.write_all(out).await?;
        out.clear();
    }
    if flush {
        stream.flush().await?;
    }
    Ok(())
}
