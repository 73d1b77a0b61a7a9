//! `weft-perf load`: the load generator.
//!
//! Open loop (`--rate`): every worker has a schedule of intended send
//! times; a request is sent at its time, or as soon as the worker is free
//! if it is late. Latency is corrected for coordinated omission: when the
//! previous request kept the worker busy past a request's intended time,
//! that request's latency counts from the intended time (the wait the
//! system under test caused). A generator that was merely woken late by
//! its own timer counts from the actual send, so its timer does not
//! pollute the figures. Closed loop (`--rate 0`): every worker sends back
//! to back, for maximum throughput.
//!
//! Workers: `--connections` connections, each carrying `--concurrency`
//! concurrent streams for HTTP/2 and gRPC (HTTP/1.1 and TCP carry one at a
//! time). Histograms are HDR, in nanoseconds.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Protocol {
    Http1,
    Http2,
    Grpc,
    Tcp,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub protocol: Protocol,
    /// `http://host[:port]/path` for HTTP and gRPC, `host:port` for TCP.
    pub target: String,
    /// Connect here instead of the target's host: an explicit proxy. HTTP/1.1
    /// then sends absolute-form requests; the other protocols open a
    /// `CONNECT host:port` tunnel through it first.
    pub proxy: Option<SocketAddr>,
    /// Requests per second in total; 0 for closed loop.
    pub rate: u64,
    pub connections: usize,
    pub concurrency: usize,
    pub duration: Duration,
    pub warmup: Duration,
    /// Request body (HTTP POST, gRPC payload, TCP write) in bytes; the
    /// echo server returns as many.
    pub payload: usize,
    pub timeout: Duration,
    /// Print a progress line to stderr every second.
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            protocol: Protocol::Http1,
            target: String::new(),
            proxy: None,
            rate: 1000,
            connections: 4,
            concurrency: 1,
            duration: Duration::from_secs(10),
            warmup: Duration::from_secs(2),
            payload: 1024,
            timeout: Duration::from_secs(5),
            progress: false,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub protocol: Protocol,
    pub target: String,
    pub rate: u64,
    pub connections: usize,
    pub concurrency: usize,
    pub requests: u64,
    pub errors: BTreeMap<String, u64>,
    /// Connections dialled again after the server closed them.
    pub reconnects: u64,
    pub seconds: f64,
    pub achieved_rate: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// (percentile, ms) points for plots.
    pub curve: Vec<(f64, f64)>,
    #[serde(skip)]
    pub histogram: Histogram<u64>,
}

impl Summary {
    pub fn line(&self) -> String {
        format!(
            "{} req in {:.1}s = {:.0}/s; p50 {:.3} ms, p90 {:.3}, p99 {:.3}, p99.9 {:.3}, max {:.3}; errors {}",
            self.requests,
            self.seconds,
            self.achieved_rate,
            self.p50_ms,
            self.p90_ms,
            self.p99_ms,
            self.p999_ms,
            self.max_ms,
            if self.errors.is_empty() {
                "none".to_string()
            } else {
                format!("{:?}", self.errors)
            }
        )
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

pub fn new_histogram() -> Histogram<u64> {
    // 1 µs to 100 s, in ns, three significant digits.
    Histogram::new_with_bounds(1_000, 100_000_000_000, 3).expect("valid bounds")
}

/// Where to connect and what to ask for.
#[derive(Clone, Debug)]
struct Target {
    authority: String,
    path: String,
    address: SocketAddr,
}

fn parse_target(options: &Options) -> Result<Target> {
    let text = options.target.as_str();
    let (authority, path) = if options.protocol == Protocol::Tcp {
        (text.trim_start_matches("tcp://").to_string(), String::new())
    } else {
        let rest = text
            .strip_prefix("http://")
            .context("the target must be http://host[:port]/path (TLS is the mesh's job)")?;
        match rest.split_once('/') {
            Some((a, p)) => (a.to_string(), format!("/{p}")),
            None => (rest.to_string(), "/".to_string()),
        }
    };
    let with_port = if authority
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        authority.clone()
    } else {
        format!("{authority}:80")
    };
    let address = match options.proxy {
        Some(proxy) => proxy,
        None => std::net::ToSocketAddrs::to_socket_addrs(&with_port)
            .with_context(|| format!("resolving {with_port}"))?
            .next()
            .with_context(|| format!("{with_port} has no address"))?,
    };
    Ok(Target {
        authority: with_port,
        path,
        address,
    })
}

/// A TCP connection to the target, tunnelled through the proxy if any.
async fn dial(options: &Options, target: &Target, tunnel: bool) -> Result<TcpStream> {
    let mut tcp = tokio::time::timeout(options.timeout, TcpStream::connect(target.address))
        .await
        .context("connect timed out")??;
    tcp.set_nodelay(true)?;
    if tunnel && options.proxy.is_some() {
        tcp.write_all(
            format!(
                "CONNECT {0} HTTP/1.1\r\nhost: {0}\r\n\r\n",
                target.authority
            )
            .as_bytes(),
        )
        .await?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if tcp.read(&mut byte).await? == 0 {
                bail!("the proxy closed during CONNECT");
            }
            head.push(byte[0]);
            if head.len() > 4096 {
                bail!("the proxy's CONNECT answer is too long");
            }
        }
        if !head.starts_with(b"HTTP/1.1 200") && !head.starts_with(b"HTTP/1.0 200") {
            bail!(
                "CONNECT refused: {}",
                String::from_utf8_lossy(&head).lines().next().unwrap_or("")
            );
        }
    }
    Ok(tcp)
}

/// One way of sending requests, shared by the workers of a connection.
#[derive(Clone)]
enum Client {
    Http1(Arc<tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Full<Bytes>>>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
    Grpc(weft_xds_proto::echo::echo_client::EchoClient<tonic::transport::Channel>),
    Tcp(Arc<tokio::sync::Mutex<TcpStream>>),
}

async fn connect(options: &Options, target: &Target) -> Result<Client> {
    match options.protocol {
        Protocol::Http1 => {
            let tcp = dial(options, target, false).await?;
            let (sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            tokio::spawn(connection);
            Ok(Client::Http1(Arc::new(tokio::sync::Mutex::new(sender))))
        }
        Protocol::Http2 => {
            let tcp = dial(options, target, true).await?;
            let (sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                    .await?;
            tokio::spawn(connection);
            Ok(Client::Http2(sender))
        }
        Protocol::Grpc => {
            let (options, target) = (options.clone(), target.clone());
            let endpoint =
                tonic::transport::Endpoint::from_shared(format!("http://{}", target.authority))?
                    .timeout(options.timeout);
            let channel = endpoint
                .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                    let (options, target) = (options.clone(), target.clone());
                    async move {
                        dial(&options, &target, true)
                            .await
                            .map(TokioIo::new)
                            .map_err(|e| std::io::Error::other(format!("{e:#}")))
                    }
                }))
                .await?;
            Ok(Client::Grpc(
                weft_xds_proto::echo::echo_client::EchoClient::new(channel),
            ))
        }
        Protocol::Tcp => {
            let tcp = dial(options, target, true).await?;
            Ok(Client::Tcp(Arc::new(tokio::sync::Mutex::new(tcp))))
        }
    }
}

fn http_request(options: &Options, target: &Target, payload: &Bytes) -> http::Request<Full<Bytes>> {
    let absolute = options.proxy.is_some() && options.protocol == Protocol::Http1;
    let uri = if absolute || options.protocol == Protocol::Http2 {
        format!("http://{}{}", target.authority, target.path)
    } else {
        target.path.clone()
    };
    let mut builder = http::Request::builder().uri(uri);
    if options.protocol == Protocol::Http1 {
        builder = builder.header(http::header::HOST, &target.authority);
    }
    if payload.is_empty() {
        builder.method("GET").body(Full::default())
    } else {
        builder.method("POST").body(Full::new(payload.clone()))
    }
    .expect("a valid request")
}

/// What a successful request leaves of its connection.
#[derive(Debug)]
enum After {
    Keep,
    /// The server said `Connection: close` (nginx does every 1,000
    /// requests by default): dial again before the next request rather
    /// than write into a closing connection and count an error.
    Redial,
}

/// One request; the error is its kind, for the summary.
async fn once(
    client: &mut Client,
    options: &Options,
    target: &Target,
    payload: &Bytes,
) -> Result<After, String> {
    let io = |e: &dyn std::fmt::Display| format!("io: {e}");
    let response = match client {
        Client::Http1(sender) => {
            let mut sender = sender.lock().await;
            sender.ready().await.map_err(|e| io(&e))?;
            // HTTP/1.1 is ready again only once this response is read.
            sender
                .send_request(http_request(options, target, payload))
                .await
        }
        Client::Http2(sender) => {
            let mut sender = sender.clone();
            sender.ready().await.map_err(|e| io(&e))?;
            sender
                .send_request(http_request(options, target, payload))
                .await
        }
        Client::Grpc(grpc) => {
            let request = weft_xds_proto::echo::EchoRequest {
                payload: payload.to_vec(),
            };
            return grpc
                .echo(request)
                .await
                .map(|_| After::Keep)
                .map_err(|status| format!("grpc {:?}", status.code()));
        }
        Client::Tcp(stream) => {
            let mut stream = stream.lock().await;
            let size = payload.len().max(1);
            let data = if payload.is_empty() {
                Bytes::from_static(b"x")
            } else {
                payload.clone()
            };
            stream.write_all(&data).await.map_err(|e| io(&e))?;
            let mut buf = vec![0u8; size];
            stream.read_exact(&mut buf).await.map_err(|e| io(&e))?;
            return Ok(After::Keep);
        }
    }
    .map_err(|e| io(&e))?;
    let status = response.status();
    let closing = response
        .headers()
        .get_all(http::header::CONNECTION)
        .iter()
        .any(|value| value.as_bytes().eq_ignore_ascii_case(b"close"));
    response.into_body().collect().await.map_err(|e| io(&e))?;
    if !status.is_success() {
        return Err(format!("status {}", status.as_u16()));
    }
    Ok(if closing { After::Redial } else { After::Keep })
}

struct Worker {
    histogram: Histogram<u64>,
    errors: BTreeMap<String, u64>,
    reconnects: u64,
}

#[allow(clippy::too_many_arguments)]
async fn work(
    mut client: Client,
    options: Arc<Options>,
    target: Arc<Target>,
    interval: Option<Duration>,
    offset: Duration,
    start: Instant,
    measure_from: Instant,
    end: Instant,
    done: Arc<AtomicU64>,
) -> Worker {
    let payload = Bytes::from(vec![b'x'; options.payload]);
    let mut worker = Worker {
        histogram: new_histogram(),
        errors: BTreeMap::new(),
        reconnects: 0,
    };
    let mut k: u32 = 0;
    let mut free_at = start;
    let mut broken = false;
    let mut reconnects = 0u64;
    loop {
        let intended = match interval {
            Some(interval) => start + offset + interval * k,
            None => Instant::now(),
        };
        if intended >= end {
            break;
        }
        k += 1;
        if intended > Instant::now() {
            tokio::time::sleep_until(intended).await;
        }
        let sent = Instant::now();
        // Late because the last request kept us busy: the system's fault,
        // counted from the intended time. Late because our timer woke us
        // late: ours, counted from the send.
        let from = if interval.is_some() && free_at > intended {
            intended
        } else {
            sent
        };
        if broken {
            // The server closed the connection (or it failed): dial again,
            // as a real client would, and count the reconnect.
            match connect(&options, &target).await {
                Ok(fresh) => {
                    client = fresh;
                    reconnects += 1;
                }
                Err(_) => {
                    *worker.errors.entry("connect".into()).or_default() += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    free_at = Instant::now();
                    continue;
                }
            }
        }
        let result = tokio::time::timeout(
            options.timeout,
            once(&mut client, &options, &target, &payload),
        )
        .await;
        let finished = Instant::now();
        free_at = finished;
        broken = match &result {
            Ok(Ok(After::Keep)) => false,
            Ok(Ok(After::Redial)) | Err(_) => true,
            Ok(Err(kind)) => kind.starts_with("io"),
        };
        if intended < measure_from {
            continue;
        }
        match result {
            Ok(Ok(_)) => {
                let ns = (finished - from).as_nanos().clamp(1_000, 100_000_000_000) as u64;
                let _ = worker.histogram.record(ns);
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(kind)) => {
                *worker
                    .errors
                    .entry(kind.split(':').next().unwrap_or("io").to_string())
                    .or_default() += 1;
            }
            Err(_) => *worker.errors.entry("timeout".into()).or_default() += 1,
        }
        if finished >= end {
            break;
        }
    }
    worker.reconnects = reconnects;
    worker
}

/// Runs the load and summarises it.
pub async fn run(options: &Options) -> Result<Summary> {
    let target = Arc::new(parse_target(options)?);
    let streams = match options.protocol {
        Protocol::Http2 | Protocol::Grpc => options.concurrency.max(1),
        Protocol::Http1 | Protocol::Tcp => 1,
    };
    let workers = options.connections.max(1) * streams;
    let interval = (options.rate > 0)
        .then(|| Duration::from_nanos(1_000_000_000 * workers as u64 / options.rate));
    let mut clients = Vec::new();
    for _ in 0..options.connections.max(1) {
        clients.push(
            connect(options, &target)
                .await
                .with_context(|| format!("connecting to {}", target.address))?,
        );
    }
    let options_arc = Arc::new(options.clone());
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + options.warmup;
    let end = measure_from + options.duration;
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for (c, client) in clients.into_iter().enumerate() {
        for s in 0..streams {
            let n = c * streams + s;
            // Spread the workers' schedules evenly over one interval.
            let offset = interval.map_or(Duration::ZERO, |i| i * n as u32 / workers as u32);
            tasks.push(tokio::spawn(work(
                client.clone(),
                options_arc.clone(),
                target.clone(),
                interval,
                offset,
                start,
                measure_from,
                end,
                done.clone(),
            )));
        }
    }
    let progress = options.progress.then(|| {
        let done = done.clone();
        tokio::spawn(async move {
            let mut last = 0;
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let now = done.load(Ordering::Relaxed);
                eprint!("\r  {} requests, {}/s      ", now, now - last);
                last = now;
            }
        })
    });
    let mut histogram = new_histogram();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut reconnects = 0;
    for task in tasks {
        let worker = task.await?;
        reconnects += worker.reconnects;
        histogram.add(&worker.histogram)?;
        for (kind, n) in worker.errors {
            *errors.entry(kind).or_default() += n;
        }
    }
    if let Some(progress) = progress {
        progress.abort();
        eprintln!();
    }
    let seconds = options.duration.as_secs_f64();
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1e6;
    let curve = [
        0.0, 50.0, 75.0, 90.0, 95.0, 99.0, 99.5, 99.9, 99.95, 99.99, 100.0,
    ]
    .iter()
    .map(|p| (*p, ms(p / 100.0)))
    .collect();
    Ok(Summary {
        protocol: options.protocol,
        target: options.target.clone(),
        rate: options.rate,
        connections: options.connections,
        concurrency: streams,
        requests: histogram.len(),
        errors,
        reconnects,
        seconds,
        achieved_rate: histogram.len() as f64 / seconds,
        p50_ms: ms(0.5),
        p90_ms: ms(0.9),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: histogram.max() as f64 / 1e6,
        curve,
        histogram,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo() -> weft_echo::Running {
        weft_echo::start(weft_echo::Config {
            identity: Default::default(),
            http: Some("127.0.0.1:0".parse().unwrap()),
            grpc: Some("127.0.0.1:0".parse().unwrap()),
            tcp: Some("127.0.0.1:0".parse().unwrap()),
        })
        .await
        .unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_protocol_at_a_fixed_rate_and_closed_loop() {
        let echo = echo().await;
        for (protocol, target) in [
            (Protocol::Http1, format!("http://{}/", echo.http.unwrap())),
            (Protocol::Http2, format!("http://{}/", echo.http.unwrap())),
            (Protocol::Grpc, format!("http://{}", echo.grpc.unwrap())),
            (Protocol::Tcp, echo.tcp.unwrap().to_string()),
        ] {
            let options = Options {
                protocol,
                target,
                rate: 200,
                connections: 2,
                concurrency: 2,
                duration: Duration::from_millis(500),
                warmup: Duration::from_millis(100),
                payload: 64,
                ..Default::default()
            };
            let summary = run(&options).await.unwrap();
            assert!(
                summary.errors.is_empty(),
                "{protocol:?}: {:?}",
                summary.errors
            );
            // 200/s for half a second: about 100, give or take scheduling.
            assert!(
                (80..=120).contains(&summary.requests),
                "{protocol:?}: {}",
                summary.line()
            );
            let closed = run(&Options { rate: 0, ..options }).await.unwrap();
            assert!(
                closed.requests > summary.requests,
                "{protocol:?}: {}",
                closed.line()
            );
        }
    }

    /// An HTTP/1.1 server that answers GETs and, like nginx at its
    /// `keepalive_requests`, closes each connection after `per_connection`
    /// responses, saying so in the last one.
    async fn closing_server(per_connection: usize) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for served in 1..=per_connection {
                        let end = loop {
                            if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break at + 4;
                            }
                            let mut chunk = [0u8; 1024];
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        };
                        buf.drain(..end);
                        let connection = if served == per_connection {
                            "close"
                        } else {
                            "keep-alive"
                        };
                        let response = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: {connection}\r\n\r\nok"
                        );
                        if stream.write_all(response.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        address
    }

    #[tokio::test]
    async fn a_server_closing_keep_alive_connections_costs_redials_not_errors() {
        let address = closing_server(3).await;
        let summary = run(&Options {
            target: format!("http://{address}/"),
            payload: 0,
            rate: 200,
            connections: 1,
            duration: Duration::from_millis(300),
            warmup: Duration::ZERO,
            ..Default::default()
        })
        .await
        .unwrap();
        assert!(summary.errors.is_empty(), "{:?}", summary.errors);
        // About 60 requests, three per connection.
        assert!(summary.reconnects >= 10, "{}", summary.line());
        assert!(summary.requests >= 40, "{}", summary.line());
    }

    #[tokio::test]
    async fn errors_are_counted_by_kind() {
        let echo = echo().await;
        let summary = run(&Options {
            target: format!("http://{}/", echo.tcp.unwrap()),
            payload: 0,
            rate: 50,
            connections: 1,
            duration: Duration::from_millis(200),
            warmup: Duration::ZERO,
            timeout: Duration::from_millis(100),
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(summary.requests, 0);
        assert!(summary.error_count() > 0, "{:?}", summary.errors);
    }
}
