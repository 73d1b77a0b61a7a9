//! Requests from inside a lab pod, as an application in it would make
//! them: to a Service's ClusterIP (captured by the pod's rules) when pods
//! have namespaces, or through the pod's sidecar as an explicit proxy on a
//! loopback lab. The demo and the end-to-end tests measure with this.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::Service;
use kube::Api;

use crate::netns;

/// The fields of an echo report, or why the request failed.
pub type Answer = Result<BTreeMap<String, String>, String>;

#[derive(Clone, Debug)]
pub struct PodClient {
    netns: Option<String>,
    connect: SocketAddr,
    host: String,
    /// A loopback lab: requests go to the pod's sidecar as an explicit
    /// proxy, in absolute form.
    explicit: bool,
}

impl PodClient {
    /// A client in pod `namespace/pod` (its directory under `dir`) calling
    /// `service` (in `namespace`, port 80) through the mesh.
    pub async fn new(
        client: &kube::Client,
        pod_dir: &Path,
        namespace: &str,
        service: &str,
    ) -> Result<PodClient> {
        let host = format!("{service}.{namespace}.svc.cluster.local");
        let netns_name = std::fs::read_to_string(pod_dir.join("netns"))
            .with_context(|| format!("{} is not a running lab pod", pod_dir.display()))?
            .trim()
            .to_string();
        let ip = std::fs::read_to_string(pod_dir.join("ip"))?
            .trim()
            .to_string();
        if netns_name.is_empty() {
            return Ok(PodClient {
                netns: None,
                connect: format!("{ip}:15001").parse()?,
                host,
                explicit: true,
            });
        }
        let vip = Api::<Service>::namespaced(client.clone(), namespace)
            .get(service)
            .await?
            .spec
            .and_then(|s| s.cluster_ip)
            .with_context(|| format!("service {namespace}/{service} has no ClusterIP"))?;
        Ok(PodClient {
            netns: Some(netns_name),
            connect: format!("{vip}:80").parse()?,
            host,
            explicit: false,
        })
    }

    /// One request on a new connection, on a thread of its own (which
    /// alone enters the pod's network).
    pub async fn once(&self) -> Answer {
        self.get("/", &[]).await
    }

    /// A GET of `path` with extra `headers`, as [`PodClient::once`]. A
    /// status other than 200 is an error that starts with the status line.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let host = &self.host;
        let target = if self.explicit {
            format!("http://{host}{path}")
        } else {
            path.to_string()
        };
        let extra: String = headers
            .iter()
            .map(|(name, value)| format!("{name}: {value}\r\n"))
            .collect();
        let request =
            format!("GET {target} HTTP/1.1\r\nhost: {host}\r\n{extra}connection: close\r\n\r\n");
        let out = exchange(self.netns.clone(), self.connect, request).await?;
        let (head, body) = out.split_once("\r\n\r\n").ok_or("no HTTP response")?;
        if !head.starts_with("HTTP/1.1 200") {
            // The status line and the start of the body, which says why.
            let why: String = body.trim().chars().take(120).collect();
            return Err(format!("{}: {why}", head.lines().next().unwrap_or("")));
        }
        Ok(weft_echo::parse_report(body))
    }

    /// Where the service port's gRPC calls land from this pod: a unary
    /// `Echo` or a one-message `Stream`, answered with the serving
    /// cluster and version ("c1/v1"). Needs the pod's own network (the
    /// ClusterIP is captured there): `None` on a loopback lab.
    pub async fn grpc(&self, port: u16, streaming: bool) -> Option<Result<String, String>> {
        let netns_name = self.netns.clone()?;
        let target = SocketAddr::new(self.connect.ip(), port);
        let (reply, answer) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let result = (|| -> Result<String, String> {
                netns::enter(&netns_name).map_err(|e| format!("{e:#}"))?;
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                runtime.block_on(grpc_call(target, streaming))
            })();
            let _ = reply.send(result);
        });
        Some(
            answer
                .await
                .unwrap_or_else(|_| Err("the gRPC thread died".into())),
        )
    }

    pub async fn batch(&self, n: usize) -> Vec<Answer> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.once().await);
        }
        out
    }

    /// Sends requests until one satisfies `done`.
    pub async fn until(&self, timeout: Duration, done: impl Fn(&Answer) -> bool) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let answer = self.once().await;
            if done(&answer) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("no matching answer within {timeout:?}; last: {answer:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Sends a request every 50 ms until ten in a row come from `cluster`;
    /// says how many failed meanwhile and when the first of those ten was
    /// sent (the time traffic took to settle there).
    pub async fn until_stable(&self, cluster: &str, timeout: Duration) -> Result<Settled> {
        let started = Instant::now();
        let deadline = started + timeout;
        let (mut streak, mut errors) = (0, 0);
        let mut streak_began = started;
        while streak < 10 {
            let sent = Instant::now();
            match self.once().await {
                Ok(fields) if fields.get("cluster").map(String::as_str) == Some(cluster) => {
                    if streak == 0 {
                        streak_began = sent;
                    }
                    streak += 1
                }
                Ok(_) => streak = 0,
                Err(why) => {
                    // Said, so that a failure can be told from another.
                    println!(
                        "request {:.3} s after the start failed: {why}",
                        sent.duration_since(started).as_secs_f64()
                    );
                    errors += 1;
                    streak = 0;
                }
            }
            if Instant::now() > deadline {
                bail!("traffic did not settle on {cluster} within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(Settled {
            errors,
            after: streak_began.duration_since(started),
        })
    }
}

async fn grpc_call(target: SocketAddr, streaming: bool) -> Result<String, String> {
    use weft_xds_proto::echo::EchoRequest;
    use weft_xds_proto::echo::echo_client::EchoClient;
    let call = async {
        let mut client = EchoClient::connect(format!("http://{target}"))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let reply = if streaming {
            let request = tokio_stream::iter([EchoRequest {
                payload: b"hi".to_vec(),
            }]);
            let mut replies = client
                .stream(request)
                .await
                .map_err(|e| format!("{}: {}", e.code(), e.message()))?
                .into_inner();
            replies
                .message()
                .await
                .map_err(|e| format!("{}: {}", e.code(), e.message()))?
                .ok_or("no reply")?
        } else {
            client
                .echo(EchoRequest {
                    payload: b"hi".to_vec(),
                })
                .await
                .map_err(|e| format!("{}: {}", e.code(), e.message()))?
                .into_inner()
        };
        Ok(format!("{}/{}", reply.cluster, reply.version))
    };
    tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .map_err(|_| "timed out".to_string())?
}

/// How traffic settled on a cluster.
#[derive(Clone, Copy, Debug)]
pub struct Settled {
    /// Requests that failed on the way.
    pub errors: usize,
    /// From the first request to the first of the ten that all went there.
    pub after: Duration,
}

/// Sends `request` to `connect` from inside the lab pod whose directory is
/// `pod_dir` (its network namespace, when it has one) and returns all the
/// peer sent back until it closed.
pub async fn send_from_pod(
    pod_dir: &Path,
    connect: SocketAddr,
    request: &str,
) -> Result<String, String> {
    let netns_name = std::fs::read_to_string(pod_dir.join("netns"))
        .map_err(|e| format!("{} is not a running lab pod: {e}", pod_dir.display()))?
        .trim()
        .to_string();
    let netns_name = (!netns_name.is_empty()).then_some(netns_name);
    exchange(netns_name, connect, request.to_string()).await
}

/// Where port `port` of a lab pod's sidecar is reached with
/// [`send_from_pod`]: loopback inside the pod's own network namespace, or
/// the pod's address where pods share loopback.
pub fn sidecar_port(pod_dir: &Path, port: u16) -> Result<SocketAddr, String> {
    let netns = std::fs::read_to_string(pod_dir.join("netns")).unwrap_or_default();
    if !netns.trim().is_empty() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    let ip = std::fs::read_to_string(pod_dir.join("ip"))
        .map_err(|e| format!("{} is not a running lab pod: {e}", pod_dir.display()))?;
    let ip: std::net::IpAddr = ip.trim().parse().map_err(|e| format!("{ip:?}: {e}"))?;
    Ok(SocketAddr::new(ip, port))
}

/// The access-log lines (JSON) a lab pod's sidecar has written so far;
/// its own log lines, which are not JSON, are left out.
pub fn access_log_lines(pod_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(pod_dir.join("weft-proxy.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// An HTTP GET of `host`'s `/` sent to `connect` from the pod, again every
/// 100 ms until it is answered 200 (a service the mesh has just learned:
/// its endpoints may arrive a moment after its name) or `timeout` passes.
/// The last answer, either way.
pub async fn get_from_pod_until_ok(
    pod_dir: &Path,
    connect: SocketAddr,
    host: &str,
    timeout: Duration,
) -> Result<String, String> {
    let request = format!("GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n");
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let answer = send_from_pod(pod_dir, connect, &request).await;
        let ok = answer.as_ref().is_ok_and(|a| a.starts_with("HTTP/1.1 200"));
        if ok || std::time::Instant::now() >= deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `request` to `connect` from inside the network namespace
/// `netns_name` (none: this process's own network) and returns all the
/// peer sent back until it closed: how tools reach what listens inside
/// the lab (its control planes live in the router's namespace).
pub async fn send_from_netns(
    netns_name: Option<String>,
    connect: SocketAddr,
    request: &str,
) -> Result<String, String> {
    exchange(netns_name, connect, request.to_string()).await
}

/// One request and its whole answer, on a thread of its own that alone
/// enters `netns_name`.
async fn exchange(
    netns_name: Option<String>,
    connect: SocketAddr,
    request: String,
) -> Result<String, String> {
    let held = Held::open(netns_name, connect).await?;
    held.send(request, None).await
}

/// A TCP connection made from inside a lab pod and kept open: its own
/// thread (which alone enters the pod's network) carries each exchange.
pub struct Held {
    requests: std::sync::mpsc::Sender<Exchange>,
}

/// What to write, how much to read back, and where the answer goes.
type Exchange = (
    String,
    Option<usize>,
    tokio::sync::oneshot::Sender<Result<String, String>>,
);

impl Held {
    /// Connects to `connect` from the pod whose directory is `pod_dir`.
    pub async fn from_pod(pod_dir: &Path, connect: SocketAddr) -> Result<Held, String> {
        let netns_name = std::fs::read_to_string(pod_dir.join("netns"))
            .map_err(|e| format!("{} is not a running lab pod: {e}", pod_dir.display()))?
            .trim()
            .to_string();
        Held::open((!netns_name.is_empty()).then_some(netns_name), connect).await
    }

    async fn open(netns_name: Option<String>, connect: SocketAddr) -> Result<Held, String> {
        let (opened, open) = tokio::sync::oneshot::channel();
        let (requests, queue) = std::sync::mpsc::channel::<Exchange>();
        std::thread::spawn(move || {
            let connected = (|| -> Result<std::net::TcpStream, String> {
                if let Some(ns) = &netns_name {
                    netns::enter(ns).map_err(|e| format!("{e:#}"))?;
                }
                let tcp = std::net::TcpStream::connect_timeout(&connect, Duration::from_secs(3))
                    .map_err(|e| format!("connect: {e}"))?;
                tcp.set_read_timeout(Some(Duration::from_secs(5)))
                    .map_err(|e| e.to_string())?;
                Ok(tcp)
            })();
            let mut tcp = match connected {
                Ok(tcp) => {
                    let _ = opened.send(Ok(()));
                    tcp
                }
                Err(err) => {
                    let _ = opened.send(Err(err));
                    return;
                }
            };
            // Ends when the `Held` is dropped.
            while let Ok((request, want, reply)) = queue.recv() {
                let _ = reply.send(Held::exchange_on(&mut tcp, &request, want));
            }
        });
        open.await
            .unwrap_or_else(|_| Err("the connection thread died".into()))?;
        Ok(Held { requests })
    }

    fn exchange_on(
        tcp: &mut std::net::TcpStream,
        request: &str,
        want: Option<usize>,
    ) -> Result<String, String> {
        tcp.write_all(request.as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        match want {
            None => {
                tcp.read_to_end(&mut out)
                    .map_err(|e| format!("read: {e}"))?;
            }
            Some(want) => {
                let mut buf = [0u8; 4096];
                while out.len() < want {
                    let n = tcp.read(&mut buf).map_err(|e| format!("read: {e}"))?;
                    if n == 0 {
                        return Err(format!("closed after {} bytes", out.len()));
                    }
                    out.extend_from_slice(&buf[..n]);
                }
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    /// Writes `request` and reads `want` bytes back (all until the peer
    /// closes, when `None`); an error if it closes first.
    pub async fn send(&self, request: String, want: Option<usize>) -> Result<String, String> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.requests
            .send((request, want, reply))
            .map_err(|_| "the connection thread died".to_string())?;
        answer
            .await
            .unwrap_or_else(|_| Err("the connection thread died".into()))
    }
}

/// The identity an echo server at `target` reports for a plaintext request
/// from the pod at `pod_dir` that claims to be an admin in
/// `x-weft-peer-identity` (`-` when it saw none), or why there was no
/// answer.
pub async fn identity_seen_by_echo(pod_dir: &Path, target: SocketAddr) -> Result<String, String> {
    let forged = format!(
        "GET / HTTP/1.1\r\nhost: echo\r\nx-weft-peer-identity: {FORGED_IDENTITY}\r\nconnection: close\r\n\r\n"
    );
    let answer = send_from_pod(pod_dir, target, &forged).await?;
    let (head, body) = answer.split_once("\r\n\r\n").ok_or("no HTTP answer")?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(head.lines().next().unwrap_or("").to_string());
    }
    Ok(weft_echo::parse_report(body)
        .remove("peer")
        .unwrap_or_default())
}

/// The identity [`identity_seen_by_echo`] claims.
pub const FORGED_IDENTITY: &str = "spiffe://cluster.local/ns/prod/sa/admin";

/// Counts answers by cluster.
pub fn by_cluster(answers: &[Answer]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for answer in answers {
        let key = match answer {
            Ok(fields) => fields.get("cluster").cloned().unwrap_or_default(),
            Err(_) => "error".into(),
        };
        *out.entry(key).or_default() += 1;
    }
    out
}
