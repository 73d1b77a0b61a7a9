//! The sidecar's DNS proxy (15053, UDP and TCP): the capture rules send
//! the app's DNS here, never the proxy's own. Mesh names,
//! `<svc>.<ns>.svc.<domain suffix>` and, for a service exported with
//! MCS, `<svc>.<ns>.svc.clusterset.local` (its clusterset VIP),
//! are answered from the snapshot with the service's VIP in this cluster,
//! which for a service that exists only in other clusters is the one the
//! control plane allocated: so a remote-only service resolves and is
//! reached by name. Everything else goes to the pod's upstream resolver
//! unchanged, and its answer comes back unchanged.
//!
//! What arrives is untrusted. A packet that does not parse is dropped
//! (no answer, so no amplification); answers are never larger than a
//! question and the service's VIPs; a TCP message over `MAX_MESSAGE`
//! closes its connection; forwards are bounded in number and time.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use simple_dns::rdata::{A, AAAA, RData};
use simple_dns::{CLASS, Packet, PacketFlag, QTYPE, ResourceRecord, TYPE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;

use crate::metrics::{Metrics, OutcomeLabels};
use crate::xds::XdsState;

/// The largest query taken (EDNS0's usual buffer).
pub const MAX_MESSAGE: usize = 4096;
/// How long the upstream resolver may take.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
/// Queries being forwarded at once; more are dropped.
const MAX_FORWARDS: usize = 256;
/// Mesh answers change only when a service's VIP does.
const TTL: u32 = 30;

/// What becomes of one query.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// Answered here: the reply's bytes.
    Reply(Vec<u8>),
    /// Not a mesh name: for the upstream resolver.
    Forward,
    /// Not a DNS query: no answer at all.
    Drop,
}

pub struct Dns {
    pub xds: Arc<XdsState>,
    /// This cluster: its VIPs are answered first.
    pub cluster: String,
    /// `.svc.<domain suffix>`: what a mesh name ends with.
    svc_suffix: String,
    /// The pod's resolver; `None`: non-mesh names fail (SERVFAIL).
    pub upstream: Option<SocketAddr>,
    pub metrics: Arc<Metrics>,
    forwards: Semaphore,
}

impl Dns {
    pub fn new(
        xds: Arc<XdsState>,
        cluster: &str,
        domain_suffix: &str,
        upstream: Option<SocketAddr>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Dns {
            xds,
            cluster: cluster.into(),
            svc_suffix: format!(
                ".svc.{}",
                domain_suffix.trim_matches('.').to_ascii_lowercase()
            ),
            upstream,
            metrics,
            forwards: Semaphore::new(MAX_FORWARDS),
        }
    }

    fn count(&self, outcome: &'static str) {
        self.metrics
            .dns_queries
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    /// The service hostname a query name stands for, if it is a mesh name.
    fn mesh_host(&self, name: &str) -> Option<String> {
        let service_part = |rest: &str| {
            let mut labels = rest.split('.');
            matches!((labels.next(), labels.next(), labels.next()), (Some(s), Some(n), None) if !s.is_empty() && !n.is_empty())
        };
        if let Some(rest) = name.strip_suffix(&self.svc_suffix)
            && service_part(rest)
        {
            return Some(name.to_string());
        }
        // A service exported with MCS has a clusterset service of its own.
        if let Some(rest) = name.strip_suffix(crate::state::CLUSTERSET_SUFFIX)
            && service_part(rest)
        {
            return Some(name.to_string());
        }
        None
    }

    /// Decides one query.
    pub fn answer(&self, query: &[u8]) -> Answer {
        let Ok(packet) = Packet::parse(query) else {
            return Answer::Drop;
        };
        if packet.has_flags(PacketFlag::RESPONSE) {
            return Answer::Drop;
        }
        let [question] = packet.questions.as_slice() else {
            return Answer::Forward;
        };
        let name = question
            .qname
            .to_string()
            .trim_end_matches('.')
            .to_ascii_lowercase();
        let Some(host) = self.mesh_host(&name) else {
            return Answer::Forward;
        };
        let snapshot = self.xds.snapshot.load();
        let Some(service) = snapshot.service_by_host(&host) else {
            // Shaped like a mesh name, unknown to the mesh: the cluster's
            // own DNS may know it (a Service without endpoints yet).
            return Answer::Forward;
        };
        // This cluster's VIP first; a remote-only service has one too, the
        // control plane's.
        let mut vips: Vec<IpAddr> = service
            .vips
            .iter()
            .filter(|v| *v.cluster_id == *self.cluster)
            .map(|v| v.address)
            .collect();
        if vips.is_empty() {
            vips.extend(service.vips.first().map(|v| v.address));
        }
        let mut reply = Packet::new_reply(packet.id());
        reply.set_flags(PacketFlag::AUTHORITATIVE_ANSWER);
        if packet.has_flags(PacketFlag::RECURSION_DESIRED) {
            reply.set_flags(PacketFlag::RECURSION_DESIRED | PacketFlag::RECURSION_AVAILABLE);
        }
        reply.questions.push(question.clone());
        for vip in vips {
            let rdata = match (question.qtype, vip) {
                (QTYPE::TYPE(TYPE::A) | QTYPE::ANY, IpAddr::V4(v4)) => RData::A(A {
                    address: u32::from(v4),
                }),
                (QTYPE::TYPE(TYPE::AAAA) | QTYPE::ANY, IpAddr::V6(v6)) => RData::AAAA(AAAA {
                    address: u128::from(v6),
                }),
                // Another type, or the other family: the name exists with
                // no such record (NODATA).
                _ => continue,
            };
            reply.answers.push(ResourceRecord::new(
                question.qname.clone(),
                CLASS::IN,
                TTL,
                rdata,
            ));
        }
        // Compressed: the answer points back at the question's name.
        match reply.build_bytes_vec_compressed() {
            Ok(bytes) => Answer::Reply(bytes),
            Err(_) => Answer::Drop,
        }
    }

    /// SERVFAIL for `query` (which parsed), when nothing upstream answers.
    fn server_failure(query: &[u8]) -> Option<Vec<u8>> {
        let packet = Packet::parse(query).ok()?;
        let mut reply = Packet::new_reply(packet.id());
        *reply.rcode_mut() = simple_dns::RCODE::ServerFailure;
        reply.questions = packet.questions;
        reply.build_bytes_vec().ok()
    }

    /// The reply to `query`, however it is made; `None`: no reply.
    pub async fn reply(&self, query: &[u8], tcp: bool) -> Option<Vec<u8>> {
        match self.answer(query) {
            Answer::Reply(bytes) => {
                self.count("mesh");
                Some(bytes)
            }
            Answer::Drop => {
                self.count("dropped");
                None
            }
            Answer::Forward => {
                let Ok(_permit) = self.forwards.try_acquire() else {
                    self.count("dropped");
                    return None;
                };
                let forwarded = match self.upstream {
                    Some(upstream) if tcp => forward_tcp(upstream, query).await,
                    Some(upstream) => forward_udp(upstream, query).await,
                    None => Err(std::io::Error::other("no upstream resolver")),
                };
                match forwarded {
                    Ok(answer) => {
                        self.count("forwarded");
                        Some(answer)
                    }
                    Err(err) => {
                        tracing::debug!(%err, "forwarding a DNS query failed");
                        self.count("failed");
                        Self::server_failure(query)
                    }
                }
            }
        }
    }
}

async fn forward_udp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => "0.0.0.0:0".parse().map_err(std::io::Error::other)?,
        SocketAddr::V6(_) => "[::]:0".parse().map_err(std::io::Error::other)?,
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buffer = vec![0u8; MAX_MESSAGE];
    let n = tokio::time::timeout(UPSTREAM_TIMEOUT, socket.recv(&mut buffer))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "upstream timed out"))??;
    // Only the answer to this query: the same id.
    if n < 2 || buffer[..2] != query[..2] {
        return Err(std::io::Error::other("an answer to another query"));
    }
    buffer.truncate(n);
    Ok(buffer)
}

async fn forward_tcp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let exchange = async {
        let mut tcp = TcpStream::connect(upstream).await?;
        write_message(&mut tcp, query).await?;
        read_message(&mut tcp, u16::MAX as usize)
            .await?
            .ok_or_else(|| std::io::Error::other("the upstream closed"))
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "upstream timed out"))?
}

/// One length-prefixed DNS message; `None` at a clean end of stream.
async fn read_message(tcp: &mut TcpStream, limit: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut length = [0u8; 2];
    match tcp.read_exact(&mut length).await {
        Ok(_) => {}
        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(err) => return Err(err),
    }
    let length = u16::from_be_bytes(length) as usize;
    if length == 0 || length > limit {
        return Err(std::io::Error::other(format!(
            "a DNS message of {length} bytes"
        )));
    }
    let mut message = vec![0u8; length];
    tcp.read_exact(&mut message).await?;
    Ok(Some(message))
}

async fn write_message(tcp: &mut TcpStream, message: &[u8]) -> std::io::Result<()> {
    let length = u16::try_from(message.len()).map_err(std::io::Error::other)?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(message);
    tcp.write_all(&framed).await
}

/// Serves DNS over UDP until the task is dropped.
pub async fn serve_udp(socket: UdpSocket, dns: Arc<Dns>) {
    let socket = Arc::new(socket);
    let mut buffer = vec![0u8; MAX_MESSAGE];
    loop {
        let (n, from) = match socket.recv_from(&mut buffer).await {
            Ok(received) => received,
            Err(err) => {
                tracing::debug!(%err, "DNS receive failed");
                continue;
            }
        };
        let query = buffer[..n].to_vec();
        let (socket, dns) = (socket.clone(), dns.clone());
        crate::task::spawn(async move {
            if let Some(reply) = dns.reply(&query, false).await {
                let _ = socket.send_to(&reply, from).await;
            }
        });
    }
}

/// Serves DNS over TCP until the task is dropped: messages on a
/// connection in turn, each within `UPSTREAM_TIMEOUT` twice over.
pub async fn serve_tcp(listener: TcpListener, dns: Arc<Dns>) {
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else {
            continue;
        };
        let dns = dns.clone();
        crate::task::spawn(async move {
            loop {
                let read =
                    tokio::time::timeout(UPSTREAM_TIMEOUT * 2, read_message(&mut tcp, MAX_MESSAGE));
                let Ok(Ok(Some(query))) = read.await else {
                    return;
                };
                let Some(reply) = dns.reply(&query, true).await else {
                    return;
                };
                if write_message(&mut tcp, &reply).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// The pod's resolver: the first `nameserver` of `resolv.conf`'s text.
pub fn upstream_of(resolv_conf: &str) -> Option<SocketAddr> {
    resolv_conf.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("nameserver"))
            .then(|| words.next()?.parse::<IpAddr>().ok())
            .flatten()
            .map(|ip| SocketAddr::new(ip, 53))
    })
}

#[cfg(test)]
mod tests {
    use weft_xds_proto::testing;

    use super::*;
    use crate::state::Snapshot;

    fn dns(upstream: Option<SocketAddr>) -> Dns {
        let ports = vec![testing::port(
            80,
            "http",
            weft_xds_proto::mesh::AppProtocol::Http,
            8080,
        )];
        let mut service = testing::service("demo", "echo", [10, 96, 0, 10], ports.clone());
        service.vips.push(testing::vip("c2", "n", [10, 97, 0, 10]));
        // Only in c2: c1's control plane allocated it a VIP of c1's.
        let mut far = testing::service("demo", "far", [240, 240, 0, 7], ports.clone());
        far.clusters = vec!["c2".into()];
        // echo is exported (MCS): its clusterset service has a VIP of its own.
        let mut clusterset = testing::service("demo", "echo", [240, 241, 0, 9], ports);
        clusterset.hostname = "echo.demo.svc.clusterset.local".into();
        let snapshot = Snapshot::from_messages(&[service, far, clusterset], &[]).unwrap();
        let xds = Arc::new(XdsState::default());
        xds.snapshot.store(Arc::new(snapshot));
        Dns::new(xds, "c1", "cluster.local", upstream, Arc::default())
    }

    fn query(name: &str, qtype: TYPE) -> Vec<u8> {
        let mut packet = Packet::new_query(0x4242);
        packet.set_flags(PacketFlag::RECURSION_DESIRED);
        packet.questions.push(simple_dns::Question::new(
            simple_dns::Name::new_unchecked(name),
            QTYPE::TYPE(qtype),
            simple_dns::QCLASS::CLASS(CLASS::IN),
            false,
        ));
        packet.build_bytes_vec().unwrap()
    }

    fn addresses(answer: Answer) -> Vec<String> {
        let Answer::Reply(bytes) = answer else {
            panic!("not answered here: {answer:?}");
        };
        let packet = Packet::parse(&bytes).unwrap();
        assert_eq!(packet.id(), 0x4242);
        packet
            .answers
            .iter()
            .map(|r| match &r.rdata {
                RData::A(a) => std::net::Ipv4Addr::from(a.address).to_string(),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn mesh_names_get_this_cluster_s_vip_and_the_rest_goes_upstream() {
        let dns = dns(None);
        let a = |name: &str| addresses(dns.answer(&query(name, TYPE::A)));
        assert_eq!(a("echo.demo.svc.cluster.local"), ["10.96.0.10"]);
        assert_eq!(a("ECHO.demo.svc.cluster.local."), ["10.96.0.10"]);
        assert_eq!(a("echo.demo.svc.clusterset.local"), ["240.241.0.9"]);
        assert_eq!(
            a("far.demo.svc.cluster.local"),
            ["240.240.0.7"],
            "remote-only"
        );
        // The name exists, without an IPv6 address: NODATA, not NXDOMAIN.
        assert!(
            addresses(dns.answer(&query("echo.demo.svc.cluster.local", TYPE::AAAA))).is_empty()
        );
        for other in [
            "example.com",
            "nope.demo.svc.cluster.local",
            // Not exported: no clusterset name.
            "far.demo.svc.clusterset.local",
            "a.b.echo.demo.svc.cluster.local",
            "svc.cluster.local",
        ] {
            assert_eq!(
                dns.answer(&query(other, TYPE::A)),
                Answer::Forward,
                "{other}"
            );
        }
    }

    #[test]
    fn garbage_gets_no_answer() {
        let dns = dns(None);
        let good = query("echo.demo.svc.cluster.local", TYPE::A);
        assert_eq!(dns.answer(b""), Answer::Drop);
        assert_eq!(dns.answer(&[0xff; 7]), Answer::Drop);
        assert_eq!(
            dns.answer(&good[..good.len() - 3]),
            Answer::Drop,
            "truncated"
        );
        let mut response = good.clone();
        response[2] |= 0x80;
        assert_eq!(
            dns.answer(&response),
            Answer::Drop,
            "a response is not a query"
        );
        // No amplification: the answer to a question is its size plus one
        // record of 16 bytes.
        let Answer::Reply(reply) = dns.answer(&good) else {
            panic!()
        };
        assert!(
            reply.len() <= good.len() + 16,
            "{} > {}",
            reply.len(),
            good.len()
        );
    }

    #[tokio::test]
    async fn other_names_are_forwarded_and_a_dead_upstream_is_a_servfail() {
        // A stand-in upstream: answers every query with its own bytes,
        // marked as a response.
        let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let upstream_addr = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buffer = [0u8; 512];
            while let Ok((n, from)) = upstream.recv_from(&mut buffer).await {
                buffer[2] |= 0x80;
                let _ = upstream.send_to(&buffer[..n], from).await;
            }
        });
        let dns = dns(Some(upstream_addr));
        let question = query("example.com", TYPE::A);
        let reply = dns.reply(&question, false).await.unwrap();
        assert_eq!(reply[..2], question[..2]);
        assert!(reply[2] & 0x80 != 0);
        assert!(dns.reply(b"garbage", false).await.is_none());

        let gone = {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            socket.local_addr().unwrap()
        };
        let dns = super::Dns::new(
            dns.xds.clone(),
            "c1",
            "cluster.local",
            Some(gone),
            Arc::default(),
        );
        let reply = dns.reply(&question, false).await.unwrap();
        let packet = Packet::parse(&reply).unwrap();
        assert_eq!(packet.rcode(), simple_dns::RCODE::ServerFailure);
    }

    #[test]
    fn the_upstream_is_the_first_nameserver() {
        let conf =
            "# comment\nsearch demo.svc.cluster.local\nnameserver 10.96.0.10\nnameserver 8.8.8.8\n";
        assert_eq!(upstream_of(conf), Some("10.96.0.10:53".parse().unwrap()));
        assert_eq!(upstream_of("search x\n"), None);
    }
}
