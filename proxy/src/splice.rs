//! Relays a client's TCP connection through a tunnel without the copy a
//! generic relay makes each way. A byte-stream relay reads into its own
//! buffer and writes from it, and a tunnel's write must then copy that
//! buffer into a buffer the HTTP/2 stream can own. Here what the client
//! sends is read straight into buffers handed whole to the stream, and
//! what the peer sends is written to the client from the frames it
//! arrived in.
//!
//! Semantics are those of `tokio::io::copy_bidirectional`: each direction
//! runs until its end of file, which is passed on (END_STREAM to the peer,
//! a write shutdown to the client) while the other direction goes on; an
//! error in either ends both. A peer's clean reset (NO_ERROR, CANCEL) is
//! its end of file, and ends the upload too.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::link::{Tunnel, io_error};

/// A connection's first read buffer: tokio's relay buffer, so that an idle
/// connection holds no more than it did.
const FIRST_BUFFER: usize = 8 << 10;
/// The largest read buffer, reached by doubling while reads fill it: what
/// the stream may take in one write (h2 holds what is beyond the peer's
/// window, at most one such buffer).
const MAX_BUFFER: usize = 64 << 10;
/// Below this much room left, a new buffer is taken rather than reading a
/// sliver into the old one.
const MIN_READ: usize = 2 << 10;

/// Client to peer.
struct Upload {
    send: SendStream<Bytes>,
    buffer: BytesMut,
    /// The size of the next buffer taken.
    size: usize,
    bytes: u64,
    done: bool,
}

impl Upload {
    fn poll<C: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
    ) -> Poll<std::io::Result<()>> {
        while !self.done {
            // Read only once the window has room, so that a peer that
            // stops reading stops the client too.
            self.send.reserve_capacity(1);
            while self.send.capacity() == 0 {
                match ready!(self.send.poll_capacity(cx)) {
                    None => return Poll::Ready(Err(std::io::ErrorKind::BrokenPipe.into())),
                    Some(granted) => granted.map_err(io_error)?,
                };
            }
            if self.buffer.capacity() < MIN_READ {
                // The old buffer's bytes are in frames h2 may still hold:
                // this takes a new one (or the old one back, once they
                // are written).
                self.buffer.reserve(self.size);
            }
            let room = self.buffer.capacity();
            let n = ready!(tokio_util::io::poll_read_buf(
                Pin::new(&mut *client),
                cx,
                &mut self.buffer
            ))?;
            if n == room {
                // The client has more than the buffer held: read more at once.
                self.size = (self.size * 2).min(MAX_BUFFER);
            }
            if n == 0 {
                self.send.send_data(Bytes::new(), true).map_err(io_error)?;
                self.done = true;
            } else {
                self.bytes += n as u64;
                let chunk = self.buffer.split().freeze();
                self.send.send_data(chunk, false).map_err(io_error)?;
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Peer to client.
struct Download {
    recv: RecvStream,
    /// Received and not yet written to the client.
    pending: Bytes,
    flushed: bool,
    /// The peer's stream ended: the client's write side is being shut.
    ending: bool,
    /// The peer reset the stream cleanly (NO_ERROR, CANCEL): it wants no
    /// more, so what the client still sends has nowhere to go, and that
    /// is the end of the upload rather than an error.
    peer_gone: bool,
    bytes: u64,
    done: bool,
}

impl Download {
    fn poll<C: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        client: &mut C,
    ) -> Poll<std::io::Result<()>> {
        while !self.done {
            if !self.pending.is_empty() {
                let n = ready!(Pin::new(&mut *client).poll_write(cx, &self.pending))?;
                if n == 0 {
                    return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
                }
                self.pending.advance(n);
                self.bytes += n as u64;
                self.flushed = false;
                // Window is given back only for what the client took.
                let _ = self.recv.flow_control().release_capacity(n);
                continue;
            }
            if self.ending {
                ready!(Pin::new(&mut *client).poll_shutdown(cx))?;
                self.done = true;
                continue;
            }
            if !self.flushed {
                ready!(Pin::new(&mut *client).poll_flush(cx))?;
                self.flushed = true;
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => self.pending = data,
                None => self.ending = true,
                // The peer ending the stream abruptly but cleanly is an
                // end of file, as a TCP FIN would be.
                Some(Err(err))
                    if matches!(err.reason(), Some(Reason::NO_ERROR | Reason::CANCEL)) =>
                {
                    self.ending = true;
                    self.peer_gone = true;
                }
                Some(Err(err)) => return Poll::Ready(Err(io_error(err))),
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// Relays `client` through `tunnel` until both directions end; returns
/// the bytes sent (client to peer) and received (peer to client).
pub async fn splice<C>(tunnel: Tunnel, client: &mut C) -> std::io::Result<(u64, u64)>
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let (send, recv, received) = tunnel.into_parts();
    let mut upload = Upload {
        send,
        buffer: BytesMut::new(),
        size: FIRST_BUFFER,
        bytes: 0,
        done: false,
    };
    let mut download = Download {
        recv,
        pending: received,
        flushed: true,
        ending: false,
        peer_gone: false,
        bytes: 0,
        done: false,
    };
    poll_fn(|cx| {
        let down = download.poll(cx, client)?;
        let up = match upload.poll(cx, client) {
            Poll::Ready(Err(_)) if download.peer_gone => Poll::Ready(Ok(())),
            up => up,
        }?;
        if up.is_ready() && down.is_ready() {
            Poll::Ready(Ok((upload.bytes, download.bytes)))
        } else {
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::Response;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::link::tests::{all_data, linked};

    #[tokio::test]
    async fn a_spliced_connection_carries_both_ways_and_passes_each_end_on() {
        // The peer answers only once the client's end has reached it, in
        // frames of its own size, then ends its side.
        let link = linked(|request, mut respond| async move {
            let mut body = request.into_body();
            let mut send = respond.send_response(Response::new(()), false).unwrap();
            let all = all_data(&mut body).await;
            for chunk in all.chunks(10_000) {
                send.send_data(Bytes::copy_from_slice(chunk), false)
                    .unwrap();
            }
            send.send_data(Bytes::new(), true).unwrap();
        })
        .await;
        let tunnel = link.tunnel("10.0.0.1:80", Bytes::new()).await.unwrap();
        let (mut app, mut sidecar) = tokio::io::duplex(16 << 10);
        let spliced = tokio::spawn(async move { splice(tunnel, &mut sidecar).await });
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (mut read, mut write) = tokio::io::split(&mut app);
        let writer = async {
            write.write_all(&sent).await.unwrap();
            write.shutdown().await.unwrap();
        };
        let reader = async {
            let mut echoed = Vec::new();
            read.read_to_end(&mut echoed).await.unwrap();
            echoed
        };
        let ((), echoed) = tokio::join!(writer, reader);
        assert!(echoed == sent, "{} bytes came back", echoed.len());
        let counted = spliced.await.unwrap().unwrap();
        assert_eq!(counted, (300_000, 300_000));
    }

    #[tokio::test]
    async fn a_peer_that_does_not_read_stops_the_client() {
        // The peer takes the stream and never reads it: its window (2 MiB
        // here) fills, and the client must then wait rather than have its
        // bytes queued without bound.
        let link = linked(|request, mut respond| async move {
            let _send = respond.send_response(Response::new(()), false).unwrap();
            let _unread = request.into_body();
            tokio::time::sleep(Duration::from_secs(30)).await;
        })
        .await;
        let tunnel = link.tunnel("10.0.0.1:80", Bytes::new()).await.unwrap();
        let (mut app, mut sidecar) = tokio::io::duplex(16 << 10);
        tokio::spawn(async move { splice(tunnel, &mut sidecar).await });
        let much = vec![1u8; 20 << 20];
        let wrote = tokio::time::timeout(Duration::from_millis(500), app.write_all(&much)).await;
        assert!(wrote.is_err(), "20 MiB went into a peer that reads nothing");
    }

    #[tokio::test]
    async fn a_reset_ends_the_splice_as_an_error_or_as_an_end() {
        for (reason, clean) in [(Reason::INTERNAL_ERROR, false), (Reason::CANCEL, true)] {
            let link = linked(move |_request, mut respond| async move {
                let mut send = respond.send_response(Response::new(()), false).unwrap();
                send.send_data(Bytes::from_static(b"partial"), false)
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
                send.send_reset(reason);
            })
            .await;
            let tunnel = link.tunnel("10.0.0.1:80", Bytes::new()).await.unwrap();
            let (mut app, mut sidecar) = tokio::io::duplex(16 << 10);
            let spliced = tokio::spawn(async move { splice(tunnel, &mut sidecar).await });
            let mut got = Vec::new();
            let _ = app.read_to_end(&mut got).await;
            assert_eq!(got, b"partial");
            app.shutdown().await.unwrap();
            // The client's end, sent after the reset: a clean reset makes
            // it the upload's end, another leaves the splice an error.
            let result = spliced.await.unwrap();
            assert_eq!(result.is_ok(), clean, "{reason:?}: {result:?}");
        }
    }
}
