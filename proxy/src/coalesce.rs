//! Fewer, larger writes on the connections to peer sidecars.
//!
//! An HTTP/2 client sends a request with a body as two flushes: the
//! HEADERS frame when the connection task first runs, and the DATA frames
//! after the task that streams the body has run (the h2 crate opens a new
//! stream only from the connection task). Over TLS on a socket each flush
//! is a record and a system call, and on loopback the kernel's wake-up of
//! the peer sidecar dominates the cost of a small request.
//!
//! `Coalesce` sits between TLS and the socket. Writes are buffered; the
//! first flush of buffered data yields once to the runtime (the task is
//! woken at once, behind the tasks already ready) instead of writing, so
//! that frames queued by those tasks leave in the same system call. The
//! next flush writes everything. What is lost is one scheduler turn, never
//! a timer: a flush always completes as soon as the task runs again.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::AsyncWrite;

/// Past this much buffered data, writes go to the socket without waiting.
const LIMIT: usize = 64 * 1024;

pub struct Coalesce<S> {
    inner: S,
    buffer: Vec<u8>,
    /// Bytes of `buffer` already written.
    written: usize,
    /// Set when a flush has yielded once for this buffer.
    yielded: bool,
}

impl<S> Coalesce<S> {
    pub fn new(inner: S) -> Self {
        Coalesce {
            inner,
            buffer: Vec::new(),
            written: 0,
            yielded: false,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncWrite + Unpin> Coalesce<S> {
    /// Writes out what is buffered.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buffer.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buffer[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.buffer.clear();
        self.written = 0;
        self.yielded = false;
        if self.buffer.capacity() > LIMIT {
            // A burst grew the buffer: do not keep it per connection.
            self.buffer = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    fn room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.buffer.len() >= LIMIT {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(LIMIT - self.buffer.len()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let room = ready!(self.room(cx))?;
        let n = data.len().min(room);
        self.buffer.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut room = ready!(self.room(cx))?;
        let mut total = 0;
        for buf in bufs {
            let n = buf.len().min(room);
            self.buffer.extend_from_slice(&buf[..n]);
            total += n;
            room -= n;
            if room == 0 {
                break;
            }
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.written < self.buffer.len() {
            if !self.yielded {
                self.yielded = true;
                // Runs this task again after the ones already woken: a
                // yield, as tokio reschedules a task that woke itself.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(self.poll_drain(cx))?;
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_drain(cx))?;
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

crate::through::read!(Coalesce);

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the writes that reach the socket.
    struct Counting {
        writes: usize,
        data: Vec<u8>,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes += 1;
            // A socket that takes at most 1000 bytes at a time.
            let n = data.len().min(1000);
            self.data.extend_from_slice(&data[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_queued_before_the_next_turn_leave_together() {
        let mut stream = Coalesce::new(Counting {
            writes: 0,
            data: Vec::new(),
        });
        stream.write_all(b"headers").await.unwrap();
        // The first flush yields: nothing reaches the socket yet...
        let mut flush = std::pin::pin!(async {
            stream.flush().await.unwrap();
        });
        assert!(futures_poll_once(flush.as_mut()).is_pending());
        // ...and completes on the next turn.
        flush.await;
        assert_eq!(stream.get_ref().writes, 1);
        stream.write_all(b"data").await.unwrap();
        stream.write_all(b"more").await.unwrap();
        stream.flush().await.unwrap();
        assert_eq!(stream.get_ref().writes, 2);
        assert_eq!(stream.get_ref().data, b"headersdatamore");
        // Large amounts go out in the socket's own pieces, in order.
        let big: Vec<u8> = (0..200_000u32).map(|i| i as u8).collect();
        stream.write_all(&big).await.unwrap();
        stream.shutdown().await.unwrap();
        assert_eq!(&stream.get_ref().data[15..], &big[..]);
    }

    #[tokio::test]
    async fn a_real_socket_carries_both_ways() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut a = Coalesce::new(a);
        a.write_all(b"ping").await.unwrap();
        a.flush().await.unwrap();
        let mut got = [0u8; 4];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        b.write_all(b"pong").await.unwrap();
        a.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong");
    }

    fn futures_poll_once<F: std::future::Future>(f: Pin<&mut F>) -> Poll<F::Output> {
        let waker = std::task::Waker::noop();
        f.poll(&mut Context::from_waker(waker))
    }
}
