//! HTTP/1.1 exchanges passed on whole, without an HTTP library: the stack
//! floor's `own` link. A request is read until its head parses and its
//! `Content-Length` of body has arrived, then written to the other side
//! in one write as it came; the response comes back the same way.
//!
//! It reads framing and nothing else: no header is added, removed or
//! checked beyond what the length needs. A chunked message ends the
//! connection; one without `Content-Length` is taken to have no body,
//! which is right for a request, and a response read to its close would
//! end the connection when its body fails to parse as the next head.
//! That is all the bench's exchange needs, and it is the least any HTTP
//! proxy does per request: what a codec of weft's own could cost before
//! weft's own work.

use std::io;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The most a message head may take.
const MAX_HEAD: usize = 16 << 10;
/// The most a message body may take: the floor holds each message whole.
const MAX_BODY: usize = 1 << 20;
const HEADERS: usize = 64;

/// Carries exchanges between `down` (the caller) and `up` until either
/// closes or sends what the floor does not frame.
pub async fn carry<D, U>(mut down: D, mut up: U) -> io::Result<()>
where
    D: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let mut requests = BytesMut::with_capacity(4096);
    let mut responses = BytesMut::with_capacity(4096);
    loop {
        let Some(length) = next(&mut down, &mut requests, request_length).await? else {
            return Ok(());
        };
        pass(&mut up, &mut requests, length).await?;
        let Some(length) = next(&mut up, &mut responses, response_length).await? else {
            return Ok(());
        };
        pass(&mut down, &mut responses, length).await?;
    }
}

/// Writes the first `length` bytes of `buf` to `to` and drops them.
async fn pass<W: AsyncWrite + Unpin>(
    to: &mut W,
    buf: &mut BytesMut,
    length: usize,
) -> io::Result<()> {
    to.write_all(&buf[..length]).await?;
    to.flush().await?;
    buf.advance(length);
    Ok(())
}

/// Reads from `from` into `buf` until it holds a whole message, and
/// returns its length; `None` when `from` closed between messages.
async fn next<R, F>(from: &mut R, buf: &mut BytesMut, length: F) -> io::Result<Option<usize>>
where
    R: AsyncRead + Unpin,
    F: Fn(&[u8]) -> io::Result<Option<usize>>,
{
    loop {
        if let Some(whole) = length(buf)?
            && buf.len() >= whole
        {
            return Ok(Some(whole));
        }
        if buf.capacity() == buf.len() {
            buf.reserve(buf.len().max(4096));
        }
        if from.read_buf(buf).await? == 0 {
            return match buf.is_empty() {
                true => Ok(None),
                false => Err(io::ErrorKind::UnexpectedEof.into()),
            };
        }
    }
}

/// A request's whole length (head and body), once its head has arrived.
fn request_length(buf: &[u8]) -> io::Result<Option<usize>> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    let status = request.parse(buf).map_err(invalid)?;
    whole(status, buf.len(), request.headers)
}

/// A response's whole length, once its head has arrived.
fn response_length(buf: &[u8]) -> io::Result<Option<usize>> {
    let mut headers = [httparse::EMPTY_HEADER; HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let status = response.parse(buf).map_err(invalid)?;
    whole(status, buf.len(), response.headers)
}

/// The whole message's length from its parsed head; `None` while the
/// head is still arriving (`read` bytes so far).
fn whole(
    status: httparse::Status<usize>,
    read: usize,
    headers: &[httparse::Header],
) -> io::Result<Option<usize>> {
    let httparse::Status::Complete(head) = status else {
        return match read > MAX_HEAD {
            true => Err(invalid("a message head over 16 KiB")),
            false => Ok(None),
        };
    };
    let mut body = None;
    for header in headers {
        if header.name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid(
                "a chunked message (the floor frames by length only)",
            ));
        }
        if header.name.eq_ignore_ascii_case("content-length") {
            let length = std::str::from_utf8(header.value)
                .ok()
                .and_then(|v| v.trim().parse::<usize>().ok())
                .filter(|&n| n <= MAX_BODY)
                .ok_or_else(|| invalid("a bad or too large Content-Length"))?;
            // Two lengths that disagree are how requests are smuggled.
            if body.is_some_and(|b| b != length) {
                return Err(invalid("Content-Lengths that disagree"));
            }
            body = Some(length);
        }
    }
    Ok(Some(head + body.unwrap_or(0)))
}

fn invalid(err: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const POST: &[u8] = b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc";

    #[test]
    fn a_message_is_whole_with_its_body() {
        assert_eq!(request_length(POST).unwrap(), Some(POST.len()));
        assert_eq!(
            request_length(&POST[..10]).unwrap(),
            None,
            "head still arriving"
        );
        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        assert_eq!(response_length(ok).unwrap(), Some(ok.len()));
        let get = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n";
        assert_eq!(
            request_length(get).unwrap(),
            Some(get.len()),
            "no length, no body"
        );
    }

    #[test]
    fn what_the_floor_cannot_frame_is_refused() {
        let chunked = b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n";
        assert!(request_length(chunked).is_err());
        let twice = b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n";
        assert!(request_length(twice).is_err());
        let bad = b"POST / HTTP/1.1\r\ncontent-length: -1\r\n\r\n";
        assert!(request_length(bad).is_err());
        let mut endless = b"GET / HTTP/1.1\r\nx: ".to_vec();
        endless.resize(MAX_HEAD + 1, b'a');
        assert!(request_length(&endless).is_err(), "a head past 16 KiB");
        assert!(request_length(b"\x00garbage\r\n\r\n").is_err());
    }

    /// The next whole message from `from`, taken out of `buf`.
    async fn take<R, F>(from: &mut R, buf: &mut BytesMut, length: F) -> BytesMut
    where
        R: AsyncRead + Unpin,
        F: Fn(&[u8]) -> io::Result<Option<usize>>,
    {
        let whole = next(from, buf, length).await.unwrap().unwrap();
        buf.split_to(whole)
    }

    /// Two pipelined requests in one write are passed on one at a time,
    /// each after the answer to the one before, and the answers come back
    /// in order.
    #[tokio::test]
    async fn pipelined_requests_go_one_exchange_at_a_time() {
        let (mut caller, down) = tokio::io::duplex(1 << 16);
        let (up, mut app) = tokio::io::duplex(1 << 16);
        let carried = tokio::spawn(carry(down, up));
        caller.write_all(&[POST, POST].concat()).await.unwrap();
        let mut received = BytesMut::new();
        for answer in ["one", "two"] {
            let request = take(&mut app, &mut received, request_length).await;
            assert_eq!(&request[..], POST);
            assert!(
                received.is_empty(),
                "the second request waits for this answer"
            );
            let response = format!("HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n{answer}");
            app.write_all(response.as_bytes()).await.unwrap();
        }
        let mut answers = BytesMut::new();
        for answer in ["one", "two"] {
            let response = take(&mut caller, &mut answers, response_length).await;
            assert!(response.ends_with(answer.as_bytes()));
        }
        drop(caller);
        assert!(
            carried.await.unwrap().is_ok(),
            "a close between exchanges is clean"
        );
    }
}
