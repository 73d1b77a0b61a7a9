//! One accept loop for the control plane's HTTP ports (the webhook on
//! 15017, monitoring on 15014), with the bounds any port reachable from
//! the pod network needs: a cap on open connections, a deadline for TLS
//! handshakes and for request heads (slowloris), small header limits, and
//! few HTTP/2 streams per connection. Handlers bound their bodies
//! themselves ([`read_body`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use weft_certs::accept;

/// Bounds for one HTTP port.
#[derive(Clone, Copy, Debug)]
pub struct HttpLimits {
    /// Connections open at once; more wait in the kernel's backlog.
    pub connections: usize,
    /// How long a TLS handshake, and each request head, may take.
    pub head_timeout: Duration,
    /// Request head bytes (HTTP/1 buffer, HTTP/2 header list).
    pub max_head: usize,
    pub streams_per_connection: u32,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            connections: 256,
            head_timeout: Duration::from_secs(10),
            max_head: 64 * 1024,
            streams_per_connection: 16,
        }
    }
}

pub type Answer = Response<Full<Bytes>>;

/// Serves `handle` on `listener` (over TLS when `tls` is given) within
/// `limits`, until the task is aborted.
pub async fn serve<F, Fut>(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    limits: HttpLimits,
    handle: F,
) where
    F: Fn(Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Answer> + Send + 'static,
{
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let open = Arc::new(tokio::sync::Semaphore::new(limits.connections));
    loop {
        // Waiting for a place before accepting leaves the excess in the
        // listen backlog instead of in this process's memory.
        let Ok(place) = open.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = accept::next(&listener).await;
        let (acceptor, handle) = (acceptor.clone(), handle.clone());
        tokio::spawn(async move {
            let _place = place;
            let service = hyper::service::service_fn(move |request| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(handle(request).await) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.head_timeout)
                .max_buf_size(limits.max_head.max(8192));
            builder
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(limits.streams_per_connection)
                .max_header_list_size(limits.max_head as u32)
                .keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(limits.head_timeout);
            let result = match &acceptor {
                Some(acceptor) => match accept::handshake(acceptor, tcp, limits.head_timeout).await
                {
                    Ok(tls) => builder.serve_connection(TokioIo::new(tls), service).await,
                    Err(err) => {
                        tracing::debug!(%peer, %err, "TLS handshake refused");
                        return;
                    }
                },
                None => builder.serve_connection(TokioIo::new(tcp), service).await,
            };
            if let Err(err) = result {
                tracing::debug!(%peer, %err, "connection ended with an error");
            }
        });
    }
}

/// Why a request body was not read.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    TooLarge,
    TooSlow,
}

/// A request body of at most `limit` bytes, arriving within `deadline`.
pub async fn read_body(
    body: hyper::body::Incoming,
    limit: usize,
    deadline: Duration,
) -> Result<Bytes, BodyError> {
    match tokio::time::timeout(deadline, Limited::new(body, limit).collect()).await {
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(_)) => Err(BodyError::TooLarge),
        Err(_) => Err(BodyError::TooSlow),
    }
}
