//! Plain HTTP clients to a fixed address: the application behind this
//! sidecar (inbound) and workloads without a sidecar (outbound). One pooled
//! client per (address, HTTP version), so keep-alive connections are reused
//! while the request keeps its own authority.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::http::Body;

/// Connects to one address whatever the request's URI says.
#[derive(Clone, Copy, Debug)]
pub struct FixedConnector {
    address: SocketAddr,
    timeout: Duration,
}

impl tower::Service<Uri> for FixedConnector {
    type Response = AppConnection;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let FixedConnector { address, timeout } = *self;
        Box::pin(async move {
            let tcp = tokio::time::timeout(timeout, TcpStream::connect(address))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                })??;
            tcp.set_nodelay(true)?;
            Ok(AppConnection(TokioIo::new(tcp)))
        })
    }
}

/// A connection to a fixed address. It tells the pool nothing about
/// itself: a plain `TcpStream` has the pool put its addresses
/// (`HttpInfo`) in every response's extensions, three allocations per
/// request that nothing here reads.
pub struct AppConnection(TokioIo<TcpStream>);

impl Connection for AppConnection {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for AppConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for AppConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

pub type HttpClient = Client<FixedConnector, Body>;

/// Clients by (address, HTTP/2).
pub struct Upstreams {
    connect_timeout: Duration,
    clients: Mutex<HashMap<(SocketAddr, bool), HttpClient>>,
}

impl Upstreams {
    pub fn new(connect_timeout: Duration) -> Self {
        Upstreams {
            connect_timeout,
            clients: Mutex::new(HashMap::new()),
        }
    }

    pub fn client(&self, address: SocketAddr, http2: bool) -> HttpClient {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        clients
            .entry((address, http2))
            .or_insert_with(|| {
                Client::builder(crate::task::Executor)
                    .http2_only(http2)
                    .pool_idle_timeout(Duration::from_secs(90))
                    .build(FixedConnector {
                        address,
                        timeout: self.connect_timeout,
                    })
            })
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{Request, Response};
    use http_body_util::BodyExt;

    /// The app answers through a pooled connection, and its answer
    /// carries nothing the pool added (`HttpInfo` cost three allocations
    /// a request).
    #[tokio::test]
    async fn the_app_answers_through_the_pool_with_nothing_added() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(crate::http::serve_http1(listener, |_| async {
            Response::new(crate::http::full("hi"))
        }));
        let client = Upstreams::new(Duration::from_secs(5)).client(address, false);
        for _ in 0..2 {
            let request = Request::get(format!("http://{address}/"))
                .body(crate::http::empty())
                .unwrap();
            let response = client.request(request).await.unwrap();
            assert!(
                response
                    .extensions()
                    .get::<hyper_util::client::legacy::connect::HttpInfo>()
                    .is_none()
            );
            let body = response.into_body().collect().await.unwrap().to_bytes();
            assert_eq!(&body[..], b"hi");
        }
    }
}
