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
    type Response = TokioIo<TcpStream>;
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
            Ok(TokioIo::new(tcp))
        })
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
