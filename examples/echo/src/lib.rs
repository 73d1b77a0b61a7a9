//! The echo server of the demo and the benchmarks. It answers on HTTP
//! (HTTP/1.1 and HTTP/2 without TLS, on one port), gRPC (`weft.echo.v1.Echo`)
//! and raw TCP, and says who served each call (cluster, pod, version) and
//! who called, as the server's sidecar reported it in
//! `x-weft-peer-identity`. Request bodies and payloads come back unchanged,
//! so the benchmarks can choose their size.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_stream::{Stream, StreamExt};
use tonic::{Status, Streaming};
use weft_xds_proto::echo::echo_server::{Echo, EchoServer};
use weft_xds_proto::echo::{EchoReply, EchoRequest};

pub const PEER_HEADER: &str = "x-weft-peer-identity";
/// A request header the report repeats as `tag=`.
pub const TAG_HEADER: &str = "x-echo-tag";

/// Who this server is, as it reports itself.
#[derive(Clone, Debug, Default)]
pub struct Identity {
    pub cluster: String,
    pub pod: String,
    pub version: String,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub identity: Identity,
    pub http: Option<SocketAddr>,
    pub grpc: Option<SocketAddr>,
    pub tcp: Option<SocketAddr>,
}

/// The bound addresses of a running server.
#[derive(Clone, Debug, Default)]
pub struct Running {
    pub http: Option<SocketAddr>,
    pub grpc: Option<SocketAddr>,
    pub tcp: Option<SocketAddr>,
}

/// The one-line report an HTTP GET answers with.
pub fn report(identity: &Identity, peer: &str, protocol: &str, path: &str) -> String {
    format!(
        "cluster={} pod={} version={} peer={} protocol={} path={}\n",
        identity.cluster,
        identity.pod,
        identity.version,
        if peer.is_empty() { "-" } else { peer },
        protocol,
        path
    )
}

/// Parses a report line back into its fields (for clients such as the demo).
pub fn parse_report(line: &str) -> std::collections::BTreeMap<String, String> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

static FLAKY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

async fn http(
    identity: Identity,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let peer = request
        .headers()
        .get(PEER_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let protocol = format!("{:?}", request.version());
    let path = request.uri().path().to_string();
    let traceparent = request
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let mut parts = v.split('-').skip(1);
            let (trace, parent) = (parts.next()?, parts.next()?);
            let hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
            (hex(trace) && hex(parent)).then(|| (trace.to_string(), parent.to_string()))
        });
    let tag = request
        .headers()
        .get(TAG_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|t| !t.is_empty() && !t.contains(char::is_whitespace))
        .map(str::to_string);
    // Test paths for traffic policy: `/flaky` fails every other call
    // (a retry on the same endpoint succeeds), `/delay/<ms>` answers late.
    if path == "/flaky"
        && FLAKY
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            .is_multiple_of(2)
    {
        let mut response =
            Response::new(Full::new(Bytes::from_static(b"flaky: failing this one\n")));
        *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
        return Ok(response);
    }
    if let Some(ms) = path
        .strip_prefix("/delay/")
        .and_then(|ms| ms.parse::<u64>().ok())
    {
        tokio::time::sleep(std::time::Duration::from_millis(ms.min(30_000))).await;
    }
    let has_body = request.method() == http::Method::POST || request.method() == http::Method::PUT;
    let body = if path == "/healthz" {
        Bytes::from_static(b"ok\n")
    } else if has_body {
        match request.into_body().collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => {
                let mut response = Response::new(Full::new(Bytes::from_static(b"bad body\n")));
                *response.status_mut() = StatusCode::BAD_REQUEST;
                return Ok(response);
            }
        }
    } else {
        let mut line = report(&identity, &peer, &protocol, &path);
        // A tag the mesh's routes may set, so a client can tell which
        // route served it.
        if let Some(tag) = tag {
            line.insert_str(line.len() - 1, &format!(" tag={tag}"));
        }
        // The trace this request arrived in, and the span it came from
        // (the last sidecar's), so that a client can follow its trace.
        if let Some((trace, parent)) = traceparent {
            line.insert_str(line.len() - 1, &format!(" trace={trace} parent={parent}"));
        }
        Bytes::from(line)
    };
    let mut response = Response::new(Full::new(body));
    let headers = response.headers_mut();
    for (name, value) in [
        ("x-echo-cluster", &identity.cluster),
        ("x-echo-pod", &identity.pod),
        ("x-echo-version", &identity.version),
    ] {
        if let Ok(value) = value.parse() {
            headers.insert(name, value);
        }
    }
    Ok(response)
}

async fn serve_http(listener: TcpListener, identity: Identity) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let identity = identity.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |r| http(identity.clone(), r));
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

async fn serve_tcp(listener: TcpListener) {
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = tcp.read(&mut buf).await {
                if n == 0 || tcp.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

#[derive(Clone)]
struct GrpcEcho(Identity);

impl GrpcEcho {
    fn reply(&self, payload: Vec<u8>, peer: &str) -> EchoReply {
        EchoReply {
            payload,
            cluster: self.0.cluster.clone(),
            pod: self.0.pod.clone(),
            version: self.0.version.clone(),
            peer: peer.to_string(),
        }
    }
}

fn peer_of<T>(request: &tonic::Request<T>) -> String {
    request
        .metadata()
        .get(PEER_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

type Replies = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for GrpcEcho {
    async fn echo(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, Status> {
        let peer = peer_of(&request);
        Ok(tonic::Response::new(
            self.reply(request.into_inner().payload, &peer),
        ))
    }

    type StreamStream = Replies;

    async fn stream(
        &self,
        request: tonic::Request<Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<Replies>, Status> {
        let peer = peer_of(&request);
        let me = self.clone();
        let replies = request
            .into_inner()
            .map(move |item| item.map(|r| me.reply(r.payload, &peer)));
        Ok(tonic::Response::new(Box::pin(replies)))
    }
}

/// Binds every configured port and serves in the background.
pub async fn start(config: Config) -> Result<Running> {
    let mut running = Running::default();
    if let Some(addr) = config.http {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding HTTP on {addr}"))?;
        running.http = Some(listener.local_addr()?);
        tokio::spawn(serve_http(listener, config.identity.clone()));
    }
    if let Some(addr) = config.grpc {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding gRPC on {addr}"))?;
        running.grpc = Some(listener.local_addr()?);
        // tonic's own nodelay setting covers only sockets it accepts itself;
        // without it, replies over ~500 B wait 40 ms for a delayed ACK.
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
            accepted.inspect(|tcp| {
                let _ = tcp.set_nodelay(true);
            })
        });
        let service = EchoServer::new(GrpcEcho(config.identity.clone()));
        tokio::spawn(async move {
            if let Err(err) = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await
            {
                tracing::error!(%err, "gRPC server stopped");
            }
        });
    }
    if let Some(addr) = config.tcp {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding TCP on {addr}"))?;
        running.tcp = Some(listener.local_addr()?);
        tokio::spawn(serve_tcp(listener));
    }
    Ok(running)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_protocol_answers_and_says_who_served() {
        let running = start(Config {
            identity: Identity {
                cluster: "c1".into(),
                pod: "echo-1".into(),
                version: "v1".into(),
            },
            http: Some("127.0.0.1:0".parse().unwrap()),
            grpc: Some("127.0.0.1:0".parse().unwrap()),
            tcp: Some("127.0.0.1:0".parse().unwrap()),
        })
        .await
        .unwrap();

        let mut tcp = tokio::net::TcpStream::connect(running.http.unwrap())
            .await
            .unwrap();
        tcp.write_all(b"GET /x HTTP/1.1\r\nhost: e\r\nx-weft-peer-identity: spiffe://td/ns/a/sa/b\r\nconnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap();
        let fields = parse_report(body);
        assert_eq!(fields["cluster"], "c1");
        assert_eq!(fields["peer"], "spiffe://td/ns/a/sa/b");
        assert_eq!(fields["protocol"], "HTTP/1.1");
        assert_eq!(fields["path"], "/x");

        let mut client = weft_xds_proto::echo::echo_client::EchoClient::connect(format!(
            "http://{}",
            running.grpc.unwrap()
        ))
        .await
        .unwrap();
        let reply = client
            .echo(EchoRequest {
                payload: b"hi".to_vec(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (reply.payload.as_slice(), reply.pod.as_str()),
            (&b"hi"[..], "echo-1")
        );

        let mut tcp = tokio::net::TcpStream::connect(running.tcp.unwrap())
            .await
            .unwrap();
        tcp.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        tcp.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");
    }
}
