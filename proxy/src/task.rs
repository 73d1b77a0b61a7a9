//! Spawning the sidecar's tasks. Each distinct future type handed to
//! `tokio::spawn` gets its own copy of tokio's task machinery (poll,
//! completion, cancellation: about 3 KB of code each), and hyper spawns a
//! task per connection and per HTTP/2 stream through its executor. Boxed
//! first, every task is the same type and that code exists once: the
//! sidecar's code is smaller and so is its resident memory, for one small
//! allocation per task.

use std::future::Future;
use std::pin::Pin;

use tokio::task::JoinHandle;

type Boxed = Pin<Box<dyn Future<Output = ()> + Send>>;

/// `tokio::spawn` for the sidecar's tasks; what the future returns is
/// dropped (tasks report their own errors).
pub fn spawn<F>(future: F) -> JoinHandle<()>
where
    F: Future + Send + 'static,
{
    let boxed: Boxed = Box::pin(async move {
        future.await;
    });
    tokio::spawn(boxed)
}

/// hyper's executor (connections, HTTP/2 streams), spawning through
/// `spawn`.
#[derive(Clone, Copy, Debug, Default)]
pub struct Executor;

impl<F> hyper::rt::Executor<F> for Executor
where
    F: Future + Send + 'static,
{
    fn execute(&self, future: F) {
        spawn(future);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor as _;

    #[tokio::test]
    async fn spawned_tasks_run_to_completion() {
        let (done, finished) = tokio::sync::oneshot::channel();
        spawn(async move { done.send(7).map_err(|_| "receiver gone") })
            .await
            .unwrap();
        assert_eq!(finished.await.unwrap(), 7);
        let (done, finished) = tokio::sync::oneshot::channel();
        Executor.execute(async move {
            let _ = done.send("ran");
        });
        assert_eq!(finished.await.unwrap(), "ran");
    }
}
