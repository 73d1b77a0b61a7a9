//! The cross-network part of `weft-perf bench`: a third lab cluster on a
//! network of its own (`n3`), its echo pod reached only through its
//! east-west gateway, a `weft-proxy proxy gateway` process. The load runs
//! through it like through the other scenarios; then the cost of a mesh
//! connection is measured apart, on a connection pool of the benchmark's
//! own: a new connection and its first round trip, and a new tunnel on a
//! connection already open, to a peer on the same network (c2) and to one
//! behind the gateway (c3). Those are Istio's two double-HBONE figures.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use hdrhistogram::Histogram;
use k8s_openapi::api::core::v1::Service;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::Child;
use weft_certs::Identity;
use weft_certs::tls::{CertStore, TrustBundle};
use weft_lab::mesh::{self, Cluster, MeshRoot, SidecarSpec, create};
use weft_proxy::network::Gateway;
use weft_proxy::pool::{HBONE_PORT, Pool};

/// The gateway's Service: labelled with its network, its load balancer
/// at the gateway process's own address.
pub async fn announce_gateway(
    cluster: &Cluster,
    namespace: &str,
    network: &str,
    at: IpAddr,
) -> Result<()> {
    let api = Api::<Service>::namespaced(cluster.client.clone(), namespace);
    create(
        &api,
        json!({"metadata": {"name": "weft-eastwest-gateway", "labels": {"topology.weft.io/network": network}},
               "spec": {"type": "LoadBalancer", "ports": [{"name": "mesh", "port": HBONE_PORT}]}}),
    )
    .await?;
    api.patch_status(
        "weft-eastwest-gateway",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"loadBalancer": {"ingress": [{"ip": at.to_string()}]}}})),
    )
    .await?;
    Ok(())
}

/// Starts the gateway process of `cluster` at `at`.
pub async fn spawn_gateway(
    cluster: &Cluster,
    root: &MeshRoot,
    namespace: &str,
    at: IpAddr,
) -> Result<Child> {
    let spec = SidecarSpec {
        pod_name: "gateway-1".into(),
        namespace: namespace.into(),
        service_account: "weft-eastwest-gateway".into(),
        pod_ip: at,
        listen_on_pod_ip: true,
        env: Vec::new(),
        gateway: true,
    };
    mesh::spawn_ready_sidecar(cluster, &root.root_pem(), &spec).await
}

/// Waits until the sidecar whose admin port is on `at` holds a healthy
/// gateway.
pub async fn wait_gateway(at: IpAddr, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok((200, body)) = mesh::http_get(SocketAddr::new(at, 15000), "/config_dump").await
            && let Ok(dump) = serde_json::from_str::<serde_json::Value>(&body)
            && dump["gateways"]
                .as_array()
                .is_some_and(|g| g.iter().any(|g| g["healthy"] == true))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("the client sidecar knew no healthy gateway within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The gateway at `at` as a proxy would hold it, running as
/// `<namespace>/weft-eastwest-gateway`.
pub fn gateway_at(at: IpAddr, namespace: &str) -> Result<Arc<Gateway>> {
    let IpAddr::V4(v4) = at else {
        anyhow::bail!("the bench's gateway has an IPv4 address");
    };
    let mut message = weft_xds_proto::testing::gateway("c3", "n3", v4.octets());
    message.identities = vec![weft_xds_proto::testing::identity(
        namespace,
        "weft-eastwest-gateway",
    )];
    let bytes = prost::Message::encode_to_vec(&message);
    let gateway = weft_proxy::network::decode_gateway(
        &message.name,
        &bytes,
        &mut weft_proxy::resources::Interner::default(),
    )?;
    Ok(Arc::new(gateway))
}

/// One side of the comparison: a peer sidecar, the app behind it, and the
/// gateway to go through, if any.
pub struct Peer {
    pub sidecar: SocketAddr,
    pub identity: Identity,
    pub target: SocketAddr,
    pub via: Option<Arc<Gateway>>,
}

/// Latencies in microseconds.
pub struct Setup {
    pub new_direct: Histogram<u64>,
    pub new_gateway: Histogram<u64>,
    pub reused_direct: Histogram<u64>,
    pub reused_gateway: Histogram<u64>,
}

/// A tunnel to the peer's TCP echo and one byte there and back.
async fn round_trip(pool: &Pool, peer: &Peer) -> Result<Duration> {
    let started = Instant::now();
    let mut tunnel = pool
        .tunnel(
            peer.sidecar,
            &peer.identity,
            peer.target,
            peer.via.as_deref(),
            bytes::Bytes::new(),
        )
        .await
        .map_err(|failure| failure.error)?;
    tunnel.write_all(b"x").await?;
    let mut byte = [0u8; 1];
    tunnel.read_exact(&mut byte).await?;
    Ok(started.elapsed())
}

fn micros(h: &mut Histogram<u64>, took: Duration) {
    let _ = h.record(took.as_micros().max(1) as u64);
}

/// `new` fresh connections and `reused` tunnels on one open connection,
/// to each peer, alternating so that both see the same machine.
pub async fn measure_setup(
    root: &MeshRoot,
    client: &Identity,
    direct: &Peer,
    gateway: &Peer,
    new: usize,
    reused: usize,
) -> Result<Setup> {
    let cert = root.issue_workload(client)?;
    let bundle = TrustBundle::from_pem(&root.root_pem())?;
    let pool = || -> Result<Pool> {
        Ok(Pool::new(
            CertStore::new(&cert)?,
            bundle.clone(),
            Duration::from_secs(2),
        ))
    };
    let histogram = || Histogram::<u64>::new_with_bounds(1, 10_000_000, 3);
    let mut setup = Setup {
        new_direct: histogram()?,
        new_gateway: histogram()?,
        reused_direct: histogram()?,
        reused_gateway: histogram()?,
    };
    for _ in 0..new {
        micros(&mut setup.new_direct, round_trip(&pool()?, direct).await?);
        micros(&mut setup.new_gateway, round_trip(&pool()?, gateway).await?);
    }
    let (warm_direct, warm_gateway) = (pool()?, pool()?);
    round_trip(&warm_direct, direct).await?;
    round_trip(&warm_gateway, gateway).await?;
    for _ in 0..reused {
        micros(
            &mut setup.reused_direct,
            round_trip(&warm_direct, direct).await?,
        );
        micros(
            &mut setup.reused_gateway,
            round_trip(&warm_gateway, gateway).await?,
        );
    }
    Ok(setup)
}

impl Setup {
    /// The report's lines.
    pub fn markdown(&self) -> String {
        let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let row = |what: &str, d: &Histogram<u64>, g: &Histogram<u64>| {
            format!(
                "| {what} | {} | {:.3} | {:.3} | {:.3} | {:.3} | {:+.3} | {:+.3} |\n",
                d.len(),
                ms(d, 0.5),
                ms(d, 0.99),
                ms(g, 0.5),
                ms(g, 0.99),
                ms(g, 0.5) - ms(d, 0.5),
                ms(g, 0.99) - ms(d, 0.99),
            )
        };
        let mut md = String::from(
            "\n## Across networks: the gateway hop on new and reused connections\n\n\
             A tunnel from the benchmark's own connection pool (the sidecar's code) to a peer \
             sidecar's TCP echo, one byte there and back: to c2 on the same network, and to c3 \
             through c3's east-west gateway (double HBONE: mTLS to the gateway, CONNECT, the \
             peer's own mTLS inside). A new connection includes every TCP and TLS handshake on the way.\n\n\
             | connection | samples | same network p50 ms | p99 ms | through the gateway p50 ms | p99 ms | added p50 ms | added p99 ms |\n\
             |---|---|---|---|---|---|---|---|\n",
        );
        md += &row("new", &self.new_direct, &self.new_gateway);
        md += &row(
            "reused (a new tunnel on an open connection)",
            &self.reused_direct,
            &self.reused_gateway,
        );
        md += "\nIstio's published figures for double HBONE: +0.13 ms on reused connections, +2.2 ms on new ones.\n";
        md
    }
}
