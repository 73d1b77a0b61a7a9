//! The one accept loop every listener of the sidecar runs: each
//! connection is handled in its own task and counted by the drain while it
//! lives; when draining starts the loop returns and its listener closes.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::drain::Drain;

/// Accepts on `listener` until `drain` starts, handing each connection
/// (with no-delay set: small frames must not wait for delayed ACKs) to
/// `handle` in a task of its own.
pub async fn accept<H, F>(listener: TcpListener, drain: Drain, handle: H)
where
    H: Fn(TcpStream, SocketAddr) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    // Locals drop in reverse order: the listener (moved in after the
    // guard) closes before the guard tells a drain it is gone.
    let _listening = drain.listening();
    let listener = listener;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = drain.started() => return,
        };
        let Ok((stream, addr)) = accepted else {
            // Out of descriptors, most likely: let some close.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let active = drain.track();
        let handled = handle(stream, addr);
        crate::task::spawn(async move {
            let _active = active;
            handled.await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn connections_are_counted_until_handled_and_drain_stops_accepting() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let drain = Drain::default();
        let (release, released) = tokio::sync::watch::channel(false);
        let looping = tokio::spawn(accept(listener, drain.clone(), move |mut stream, _| {
            let mut released = released.clone();
            async move {
                let _ = released.wait_for(|go| *go).await;
                let _ = stream.write_all(b"bye").await;
            }
        }));
        let _client = TcpStream::connect(addr).await.unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while drain.active() == 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(drain.active(), 1, "the open connection is counted");
        drain.start();
        looping.await.unwrap();
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the listener closed when draining started"
        );
        assert!(!drain.idle(Duration::from_millis(50)).await);
        release.send_replace(true);
        assert!(drain.idle(Duration::from_secs(5)).await);
    }
}
