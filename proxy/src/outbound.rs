//! Outbound, explicit mode: the application (or anything on the pod) speaks
//! HTTP proxy protocol to the sidecar, `CONNECT host:port`. The host is a
//! mesh hostname (`name.ns.svc.cluster.local`, `name.ns`) or an address (a
//! service VIP or a workload IP). Mesh destinations go through the HBONE
//! tunnel to the chosen endpoint's sidecar, or straight to workloads without
//! one; anything else passes through to the address as given, unless
//! passthrough is off.
//!
//! Transparent mode: connections redirected by the capture rules arrive on
//! the same port; the destination the app dialled is read back with
//! `SO_ORIGINAL_DST` and resolved the same way. L7 routing comes next.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_certs::Identity;
use weft_xds_proto::mesh;

use crate::balance::{Here, InFlight, Load};
use crate::hbone::{HBONE_PORT, Pool};
use crate::state::{Snapshot, ip_from_bytes};
use crate::xds::XdsState;

/// Longest request head accepted, and how long it may take to arrive: a
/// slow or endless header cannot hold a connection or memory for long.
const MAX_HEAD: usize = 8 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Outbound {
    pub xds: Arc<XdsState>,
    pub pool: Pool,
    pub load: Load,
    /// Where this proxy runs, when its own Workload does not say.
    pub here: Here,
    /// This pod's address: its Workload, once known, gives the locality.
    pub pod_ip: Option<IpAddr>,
    /// Whether destinations outside the mesh are reached directly.
    pub passthrough: bool,
}

/// Where a connection goes.
#[derive(Debug)]
pub enum Destination {
    /// Through the peer sidecar at `peer`, which must be `identity`.
    Mesh {
        peer: SocketAddr,
        identity: Identity,
        target: SocketAddr,
        workload: String,
    },
    /// Straight to the address (a workload without a sidecar, or outside
    /// the mesh with passthrough on).
    Direct(SocketAddr),
}

impl Outbound {
    /// Resolves `host:port` against the current snapshot.
    pub fn resolve(&self, host: &str, port: u16) -> Result<(Destination, Option<InFlight>)> {
        let snapshot = self.xds.snapshot.load();
        let service = match host.parse::<IpAddr>() {
            Ok(ip) => snapshot.service_by_vip(SocketAddr::new(ip, port)).cloned(),
            Err(_) => snapshot.service_by_host(host).cloned(),
        };
        if let Some(service) = service {
            return self.to_service(&snapshot, &service, port);
        }
        if let Ok(ip) = host.parse::<IpAddr>() {
            if let Some(workload) = snapshot.workload_by_ip(ip) {
                return Ok((destination(workload, SocketAddr::new(ip, port))?, None));
            }
            if self.passthrough {
                return Ok((Destination::Direct(SocketAddr::new(ip, port)), None));
            }
            bail!("{ip}:{port} is not in the mesh and passthrough is off");
        }
        bail!("no mesh service is named {host:?}")
    }

    fn to_service(
        &self,
        snapshot: &Snapshot,
        service: &mesh::Service,
        port: u16,
    ) -> Result<(Destination, Option<InFlight>)> {
        let service_port = service
            .ports
            .iter()
            .find(|p| p.port == u32::from(port))
            .with_context(|| format!("{} has no port {port}", service.hostname))?;
        let candidates = snapshot.endpoints(service).filter(|w| {
            w.services.iter().any(|b| {
                b.hostname == service.hostname
                    && (b.ports.is_empty()
                        || b.ports.iter().any(|m| m.service_port == u32::from(port)))
            })
        });
        let here = self
            .pod_ip
            .and_then(|ip| snapshot.workload_by_ip(ip))
            .map(|me| {
                let locality = me.locality.clone().unwrap_or_default();
                Here {
                    cluster: me.cluster_id.clone(),
                    region: locality.region,
                    zone: locality.zone,
                }
            })
            .unwrap_or_else(|| self.here.clone());
        let (workload, in_flight) = self
            .load
            .choose(&here, candidates)
            .with_context(|| format!("{} has no healthy endpoint", service.hostname))?;
        let target_port = workload
            .services
            .iter()
            .filter(|b| b.hostname == service.hostname)
            .flat_map(|b| &b.ports)
            .find(|m| m.service_port == u32::from(port))
            .map(|m| m.target_port)
            .or(Some(service_port.target_port).filter(|p| *p != 0))
            .unwrap_or(u32::from(port));
        let ip = workload
            .addresses
            .first()
            .and_then(|a| ip_from_bytes(a))
            .context("the chosen workload has no address")?;
        let target = SocketAddr::new(
            ip,
            u16::try_from(target_port).context("target port out of range")?,
        );
        Ok((destination(&workload, target)?, Some(in_flight)))
    }

    async fn connect(&self, destination: &Destination) -> Result<Box<dyn Stream>> {
        match destination {
            Destination::Mesh {
                peer,
                identity,
                target,
                ..
            } => Ok(Box::new(self.pool.tunnel(*peer, identity, *target).await?)),
            Destination::Direct(addr) => {
                let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
                    .await
                    .context("connect timed out")??;
                tcp.set_nodelay(true)?;
                Ok(Box::new(tcp))
            }
        }
    }
}

fn destination(workload: &mesh::Workload, target: SocketAddr) -> Result<Destination> {
    if workload.tunnel_protocol == mesh::TunnelProtocol::Hbone as i32 {
        let id = workload
            .identity
            .clone()
            .context("a sidecar workload without an identity")?;
        Ok(Destination::Mesh {
            peer: SocketAddr::new(target.ip(), HBONE_PORT),
            identity: Identity::new(id.trust_domain, id.namespace, id.service_account)?,
            target,
            workload: workload.uid.clone(),
        })
    } else {
        Ok(Destination::Direct(target))
    }
}

trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// Reads an HTTP/1 request head: the bytes up to the blank line, and any
/// bytes after it that already arrived.
async fn read_head(client: &mut TcpStream) -> Result<(String, Vec<u8>)> {
    let mut buffer = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buffer.split_off(end + 4);
            return Ok((String::from_utf8_lossy(&buffer).into_owned(), rest));
        }
        if buffer.len() > MAX_HEAD {
            bail!("request head over {MAX_HEAD} bytes");
        }
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            bail!("the client closed before finishing its request");
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

async fn handle(outbound: Arc<Outbound>, mut client: TcpStream) -> Result<()> {
    let (head, early) = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client))
        .await
        .context("the request head did not arrive in time")??;
    let mut words = head.lines().next().unwrap_or("").split_whitespace();
    let (Some(method), Some(authority)) = (words.next(), words.next()) else {
        client
            .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            .await?;
        bail!("not an HTTP request");
    };
    if method != "CONNECT" {
        client
            .write_all(b"HTTP/1.1 501 Not Implemented\r\ncontent-length: 0\r\n\r\n")
            .await?;
        bail!("{method} is not supported in explicit mode yet; use CONNECT");
    }
    let (host, port) = authority
        .rsplit_once(':')
        .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
        .context("CONNECT needs host:port")?;
    let (destination, _in_flight) = match outbound.resolve(host, port) {
        Ok(found) => found,
        Err(err) => {
            client
                .write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
                .await?;
            return Err(err);
        }
    };
    let mut upstream = match outbound.connect(&destination).await {
        Ok(upstream) => upstream,
        Err(err) => {
            client
                .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
                .await?;
            return Err(err.context(format!("reaching {destination:?}")));
        }
    };
    client
        .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        .await?;
    if !early.is_empty() {
        upstream.write_all(&early).await?;
    }
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// The address a redirected connection was originally sent to.
pub fn original_destination(stream: &TcpStream) -> std::io::Result<SocketAddr> {
    let socket = socket2::SockRef::from(stream);
    let address = match stream.local_addr()? {
        SocketAddr::V4(_) => socket.original_dst_v4()?,
        SocketAddr::V6(_) => socket.original_dst_v6()?,
    };
    address
        .as_socket()
        .ok_or_else(|| std::io::Error::other("the original destination is not an IP address"))
}

async fn handle_transparent(outbound: Arc<Outbound>, mut client: TcpStream) -> Result<()> {
    let original = original_destination(&client).context("reading SO_ORIGINAL_DST")?;
    // A connection that was not redirected reports its own local address:
    // serving it would connect to ourselves, again and again.
    if original == client.local_addr()? {
        bail!("connection to the capture port itself ({original}); refusing to loop");
    }
    let (destination, _in_flight) =
        outbound.resolve(&original.ip().to_string(), original.port())?;
    let mut upstream = outbound
        .connect(&destination)
        .await
        .with_context(|| format!("reaching {destination:?} for {original}"))?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// Which protocol a listener's connections speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Explicit,
    Transparent,
    /// Redirected connections transparently, direct ones explicitly.
    Both,
}

async fn accept_loop(listener: TcpListener, outbound: Arc<Outbound>, mode: Mode) {
    loop {
        let Ok((client, addr)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let _ = client.set_nodelay(true);
        let outbound = outbound.clone();
        tokio::spawn(async move {
            let redirected = match mode {
                Mode::Explicit => false,
                Mode::Transparent => true,
                Mode::Both => match (original_destination(&client), client.local_addr()) {
                    (Ok(original), Ok(local)) => original != local,
                    // No connection tracking (no capture rules): explicit only.
                    _ => false,
                },
            };
            let result = if redirected {
                handle_transparent(outbound, client).await
            } else {
                handle(outbound, client).await
            };
            if let Err(err) = result {
                tracing::debug!(%addr, redirected, "outbound connection: {err:#}");
            }
        });
    }
}

/// Serves an explicit-mode (CONNECT) outbound listener.
pub async fn serve_explicit(listener: TcpListener, outbound: Arc<Outbound>) {
    accept_loop(listener, outbound, Mode::Explicit).await
}

/// Serves a transparent outbound listener (behind the capture rules).
pub async fn serve_transparent(listener: TcpListener, outbound: Arc<Outbound>) {
    accept_loop(listener, outbound, Mode::Transparent).await
}

/// Serves 15001 in both modes at once: a connection the capture rules
/// redirected is handled transparently; one made to the port directly
/// speaks the explicit proxy protocol.
pub async fn serve(listener: TcpListener, outbound: Arc<Outbound>) {
    accept_loop(listener, outbound, Mode::Both).await
}
