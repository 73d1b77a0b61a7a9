//! The stack's floor: a proxy pair built from the libraries weft-proxy is
//! built from (tokio's one-thread runtime, hyper, rustls with ring and
//! weft's own mesh TLS settings) doing only what the bench's exchange
//! needs: take an HTTP/1.1 request, carry it over mTLS to the other side,
//! send it on to the app, carry the answer back. No routing, policy,
//! metrics, identity headers or retries.
//!
//! `weft-perf bench --stack-floor` runs it beside weft, nginx and HAProxy,
//! with the link between the two sides in HTTP/2 (one multiplexed
//! connection, as weft's mesh link) and in HTTP/1.1 (a pool of
//! connections, as nginx's and HAProxy's), so that weft's distance from
//! its peers splits into what the stack costs and what weft adds.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use anyhow::{Context, Result};
use http::Uri;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use weft_certs::tls::{CertStore, TrustBundle};
use weft_certs::{Identity, WorkloadCert};

/// Which end of the pair this process is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Side {
    /// Plain HTTP/1.1 from the load generator in, mTLS out.
    Client,
    /// mTLS in, plain HTTP/1.1 to the app out.
    Server,
}

/// How the client side carries requests to the server side.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Link {
    /// One HTTP/2 connection, every request a stream on it.
    H2,
    /// HTTP/1.1 keep-alive connections, one request at a time on each.
    H1,
    /// HTTP/1.1 without hyper: each connection in gets one connection out,
    /// and each message is passed on whole once its framing is read
    /// (`exchange`). What an HTTP codec of weft's own could cost.
    Own,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub side: Side,
    pub link: Link,
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    /// The bench's certificate directory (`client.pem`, `floor-server.pem`,
    /// their keys and `root.pem`).
    pub certs: PathBuf,
}

/// The files of the server side's workload certificate in the bench's
/// certificate directory.
pub const SERVER_CERT: (&str, &str) = ("floor-server.pem", "floor-server.key");

/// The server side's identity, which the client side requires.
pub fn server_identity(namespace: &str) -> Result<Identity> {
    Ok(Identity::new("cluster.local", namespace, "floor-server")?)
}

/// Serves until killed, on a one-thread runtime as a weft sidecar's.
pub fn run(options: &Options) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = TcpListener::bind(options.listen)
            .await
            .with_context(|| format!("binding {}", options.listen))?;
        serve(options, listener).await
    })
}

/// Serves on `listener` until it fails.
pub async fn serve(options: &Options, listener: TcpListener) -> Result<()> {
    match options.side {
        Side::Client => client(options, listener).await,
        Side::Server => server(options, listener).await,
    }
}

fn workload(dir: &Path, (chain, key): (&str, &str)) -> Result<WorkloadCert> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).with_context(|| format!("reading {name}"))
    };
    Ok(WorkloadCert::from_pem_files(&read(chain)?, &read(key)?)?)
}

fn bundle(dir: &Path) -> Result<TrustBundle> {
    Ok(TrustBundle::from_pem(&std::fs::read_to_string(
        dir.join("root.pem"),
    )?)?)
}

/// Accepts connections and serves each on a task of its own.
async fn accept<F, Fut>(listener: TcpListener, serve: F) -> Result<()>
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(serve(stream));
    }
}

/// The request's path on another authority, as the next hop wants it.
fn onward(req: &mut Request<Incoming>, authority: &str) -> io::Result<()> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    *req.uri_mut() = Uri::builder()
        .scheme("http")
        .authority(authority)
        .path_and_query(path)
        .build()
        .map_err(io::Error::other)?;
    Ok(())
}

/// Where the client side sends requests: the link under test.
#[derive(Clone)]
enum Upstream {
    H2(hyper::client::conn::http2::SendRequest<Incoming>),
    // Shared: hyper-util's client is large to clone for each request.
    H1(Arc<Client<Connector, Incoming>>),
}

impl Upstream {
    async fn send(self, mut req: Request<Incoming>) -> io::Result<Response<Incoming>> {
        onward(&mut req, "floor.mesh")?;
        match self {
            Upstream::H2(mut sender) => {
                *req.version_mut() = http::Version::HTTP_2;
                sender.ready().await.map_err(io::Error::other)?;
                sender.send_request(req).await.map_err(io::Error::other)
            }
            Upstream::H1(pool) => pool.request(req).await.map_err(io::Error::other),
        }
    }
}

async fn client(options: &Options, listener: TcpListener) -> Result<()> {
    let certs = CertStore::new(&workload(&options.certs, ("client.pem", "client.key"))?)?;
    let expected = workload(&options.certs, SERVER_CERT)?.identity().clone();
    let tls = weft_certs::tls::client_config(&certs, &bundle(&options.certs)?, vec![expected])?;
    let upstream = match options.link {
        Link::Own => {
            let to = options.upstream;
            return accept(listener, move |tcp| {
                let tls = tls.clone();
                async move {
                    if let Ok(up) = mtls(tls, to).await {
                        let _ = crate::exchange::carry(tcp, up.into_inner()).await;
                    }
                }
            })
            .await;
        }
        Link::H2 => {
            let stream = mtls(tls, options.upstream).await?;
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), stream).await?;
            tokio::spawn(connection);
            Upstream::H2(sender)
        }
        Link::H1 => Upstream::H1(Arc::new(Client::builder(TokioExecutor::new()).build(
            Connector {
                tls,
                to: options.upstream,
            },
        ))),
    };
    accept(listener, move |tcp| {
        let upstream = upstream.clone();
        async move {
            let service = service_fn(move |req: Request<Incoming>| upstream.clone().send(req));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        }
    })
    .await
}

async fn server(options: &Options, listener: TcpListener) -> Result<()> {
    let certs = CertStore::new(&workload(&options.certs, SERVER_CERT)?)?;
    let tls = tokio_rustls::TlsAcceptor::from(weft_certs::tls::server_config(
        &certs,
        &bundle(&options.certs)?,
    )?);
    if options.link == Link::Own {
        let app = options.upstream;
        return accept(listener, move |tcp| {
            let tls = tls.clone();
            async move {
                let Ok(down) = tls.accept(tcp).await else {
                    return;
                };
                let Ok(up) = TcpStream::connect(app).await else {
                    return;
                };
                let _ = up.set_nodelay(true);
                let _ = crate::exchange::carry(down, up).await;
            }
        })
        .await;
    }
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let app: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build(connector);
    let authority = options.upstream.to_string();
    accept(listener, move |tcp| {
        let (tls, app, authority) = (tls.clone(), app.clone(), authority.clone());
        async move {
            let Ok(stream) = tls.accept(tcp).await else {
                return;
            };
            let service = service_fn(move |mut req: Request<Incoming>| {
                let (app, authority) = (app.clone(), authority.clone());
                async move {
                    onward(&mut req, &authority)?;
                    *req.version_mut() = http::Version::HTTP_11;
                    app.request(req).await.map_err(io::Error::other)
                }
            });
            // The client side speaks HTTP/2 or HTTP/1.1 (the link under
            // test); the first bytes say which.
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    })
    .await
}

type Mtls = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

async fn mtls(tls: Arc<rustls::ClientConfig>, to: SocketAddr) -> io::Result<Mtls> {
    let tcp = TcpStream::connect(to).await?;
    tcp.set_nodelay(true)?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(weft_certs::tls::mesh_server_name(to.ip()), tcp)
        .await?;
    Ok(TokioIo::new(stream))
}

/// Opens the HTTP/1.1 link's connections for hyper-util's pool: mTLS to
/// the server side, whatever the request's URI names.
#[derive(Clone)]
struct Connector {
    tls: Arc<rustls::ClientConfig>,
    to: SocketAddr,
}

impl tower::Service<Uri> for Connector {
    type Response = Linked;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Linked>> + Send>>;

    fn poll_ready(&mut self, _: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let (tls, to) = (self.tls.clone(), self.to);
        Box::pin(async move { Ok(Linked(mtls(tls, to).await?)) })
    }
}

/// One of the HTTP/1.1 link's connections, as hyper-util's pool wants it.
struct Linked(Mtls);

impl Connection for Linked {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

impl hyper::rt::Read for Linked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Linked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load;
    use std::time::Duration;

    /// Both links carry the bench's exchange end to end: a closed loop of
    /// POSTs through the pair to an echo server, every answer a 200.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_floor_carries_requests_over_either_link() {
        let echo = weft_echo::start(weft_echo::Config {
            identity: Default::default(),
            http: Some("127.0.0.1:0".parse().unwrap()),
            grpc: None,
            tcp: None,
        })
        .await
        .unwrap();
        let dir = std::env::temp_dir().join(format!("weft-floor-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        crate::bench::baseline_certs(&dir).unwrap();
        for link in [Link::H2, Link::H1, Link::Own] {
            let server_at = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let client_at = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let front = client_at.local_addr().unwrap();
            let options = |side, listener: &TcpListener, upstream| Options {
                side,
                link,
                listen: listener.local_addr().unwrap(),
                upstream,
                certs: dir.clone(),
            };
            let server_side = options(Side::Server, &server_at, echo.http.unwrap());
            let client_side = options(Side::Client, &client_at, server_side.listen);
            let server_task = tokio::spawn(async move { serve(&server_side, server_at).await });
            let client_task = tokio::spawn(async move { serve(&client_side, client_at).await });
            let summary = load::run(&load::Options {
                target: format!("http://{front}/"),
                rate: 0,
                connections: 4,
                duration: Duration::from_millis(400),
                warmup: Duration::from_millis(100),
                payload: 1024,
                ..Default::default()
            })
            .await
            .unwrap();
            assert!(summary.errors.is_empty(), "{link:?}: {:?}", summary.errors);
            assert!(
                summary.requests > 10,
                "{link:?}: {} requests",
                summary.requests
            );
            server_task.abort();
            client_task.abort();
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
