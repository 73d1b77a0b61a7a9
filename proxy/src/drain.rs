//! Graceful drain: on SIGTERM the sidecar stops accepting, tells HTTP
//! clients to go away (`connection: close` on HTTP/1.1, GOAWAY on HTTP/2)
//! after their in-flight requests, and waits for open connections to end,
//! up to a deadline. The application's own shutdown runs meanwhile, and
//! its last responses still get out.

use std::pin::pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hyper_util::server::graceful::GracefulConnection;
use tokio::sync::{Notify, watch};

struct Inner {
    started: watch::Sender<bool>,
    active: AtomicUsize,
    /// Accept loops still running: a listener is closed only when its loop
    /// has seen the drain start and returned.
    listening: AtomicUsize,
    idle: Notify,
}

#[derive(Clone)]
pub struct Drain {
    inner: Arc<Inner>,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            inner: Arc::new(Inner {
                started: watch::channel(false).0,
                active: AtomicUsize::new(0),
                listening: AtomicUsize::new(0),
                idle: Notify::new(),
            }),
        }
    }
}

/// One open connection (or tunnel), counted until dropped.
pub struct Active(Arc<Inner>);

impl Drop for Active {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// One accept loop that stops when draining starts, counted until it
/// returns (and its listener is closed).
pub struct Listening(Arc<Inner>);

impl Drop for Listening {
    fn drop(&mut self) {
        if self.0.listening.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Drain {
    pub fn start(&self) {
        self.inner.started.send_replace(true);
    }

    pub fn is_draining(&self) -> bool {
        *self.inner.started.borrow()
    }

    /// Resolves once draining has begun.
    pub async fn started(&self) {
        let mut rx = self.inner.started.subscribe();
        let _ = rx.wait_for(|started| *started).await;
    }

    pub fn track(&self) -> Active {
        self.inner.active.fetch_add(1, Ordering::AcqRel);
        Active(self.inner.clone())
    }

    pub fn active(&self) -> usize {
        self.inner.active.load(Ordering::Acquire)
    }

    /// Held by an accept loop for as long as it accepts.
    pub fn listening(&self) -> Listening {
        self.inner.listening.fetch_add(1, Ordering::AcqRel);
        Listening(self.inner.clone())
    }

    /// Drives an HTTP connection; when draining starts, it finishes its
    /// in-flight requests and closes.
    pub async fn serve<C: GracefulConnection>(&self, connection: C) {
        let mut connection = pin!(connection);
        tokio::select! {
            _ = connection.as_mut() => return,
            _ = self.started() => connection.as_mut().graceful_shutdown(),
        }
        let _ = connection.await;
    }

    /// Waits until no connection is open and every draining listener is
    /// closed, or `deadline`. True if idle.
    pub async fn idle(&self, deadline: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.inner.idle.notified();
                if self.active() == 0 && self.inner.listening.load(Ordering::Acquire) == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(deadline, wait).await.is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_open_connections_up_to_the_deadline() {
        let drain = Drain::default();
        assert!(drain.idle(Duration::from_millis(10)).await);
        let open = drain.track();
        drain.start();
        assert!(drain.is_draining());
        drain.started().await;
        assert!(idle_once_dropped(&drain, open).await);
    }

    #[tokio::test]
    async fn idle_waits_for_accept_loops_to_close_their_listeners() {
        let drain = Drain::default();
        let listening = drain.listening();
        drain.start();
        assert!(idle_once_dropped(&drain, listening).await);
    }

    /// `idle` is not reached while `held` lives (up to a deadline), and a
    /// waiter is released once it is dropped.
    async fn idle_once_dropped<T: Send + 'static>(drain: &Drain, held: T) -> bool {
        assert!(
            !drain.idle(Duration::from_millis(50)).await,
            "idle while something is still open"
        );
        let later = drain.clone();
        let waiter = tokio::spawn(async move { later.idle(Duration::from_secs(10)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(held);
        waiter.await.unwrap()
    }
}
