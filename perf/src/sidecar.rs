//! Added latency of the two-sidecar path for TCP: 1 KiB request, 1 KiB
//! echo, on one persistent connection at a fixed rate, directly to the app
//! and through client sidecar → mTLS HBONE → server sidecar, alternating in
//! the same run so both see the same machine.
//!
//! Everything runs in this process on loopback addresses: the app, both
//! sidecars and the client. The figures are therefore the path's latency,
//! not its CPU cost per sidecar (which needs separate processes).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_certs::tls::{CertStore, TrustBundle};
use weft_certs::{CaParams, CertificateAuthority, Identity, issue_workload};
use weft_proxy::balance::Here;
use weft_proxy::local_app::LocalApp;
use weft_proxy::outbound::{self, Outbound, serve_explicit};
use weft_proxy::pool::{CONNECT_TIMEOUT, HBONE_PORT, Pool};
use weft_proxy::state::Snapshot;
use weft_proxy::xds::XdsState;
use weft_xds_proto::{mesh, testing};

use crate::apiserver::Outcome;
use crate::report;

#[derive(Clone, Debug)]
pub struct Options {
    pub rate: u64,
    pub requests: usize,
    pub warmup: usize,
    pub payload: usize,
}

async fn echo(listener: TcpListener) {
    while let Ok((mut conn, _)) = listener.accept().await {
        let _ = conn.set_nodelay(true);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = conn.read(&mut buf).await {
                if n == 0 || conn.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
        });
    }
}

fn id(sa: &str) -> Result<Identity> {
    Ok(Identity::new("cluster.local", "bench", sa)?)
}

/// A bench mesh's certificates: its root, and workload certificates for
/// the server's service account and for `client`, in namespace `bench`.
pub(crate) struct MeshCerts {
    pub bundle: TrustBundle,
    pub server: CertStore,
    pub client: CertStore,
}

impl MeshCerts {
    pub fn generate(server_account: &str) -> Result<MeshCerts> {
        let ca = CertificateAuthority::generate_root(
            "cluster.local",
            &CaParams::valid_for("bench root", Duration::from_secs(86400)),
        )?;
        Ok(MeshCerts {
            bundle: TrustBundle::from_pem(&ca.roots_pem())?,
            server: CertStore::new(&issue_workload(&ca, &id(server_account)?, None)?)?,
            client: CertStore::new(&issue_workload(&ca, &id("client")?, None)?)?,
        })
    }
}

/// A client sidecar's outbound side in cluster c1, routing by `xds`, for
/// the pod at `pod_ip` (when it has one): the mesh only, no passthrough.
pub(crate) fn client_outbound(
    certs: CertStore,
    bundle: TrustBundle,
    xds: Arc<XdsState>,
    pod_ip: Option<IpAddr>,
) -> Arc<Outbound> {
    let config = outbound::Config {
        here: Here {
            cluster: "c1".into(),
            ..Default::default()
        },
        pod_ip,
        passthrough: false,
        ..Default::default()
    };
    let pool = Pool::new(certs, bundle, CONNECT_TIMEOUT);
    Arc::new(Outbound::new(
        config,
        xds,
        pool,
        Arc::default(),
        Default::default(),
    ))
}

async fn round_trip(conn: &mut TcpStream, payload: &[u8], buf: &mut [u8]) -> Result<Duration> {
    let start = Instant::now();
    conn.write_all(payload).await?;
    conn.read_exact(buf).await?;
    Ok(start.elapsed())
}

pub fn run(options: &Options, command: &str) -> Result<Outcome> {
    report::block_on(drive(options, command))
}

async fn drive(options: &Options, command: &str) -> Result<Outcome> {
    let server_ip: IpAddr = [127, 151, (std::process::id() % 250) as u8, 2].into();
    let app = TcpListener::bind(SocketAddr::new(server_ip, 8080))
        .await
        .context("binding the app")?;
    let app_addr = app.local_addr()?;
    tokio::spawn(echo(app));

    let MeshCerts {
        bundle,
        server: server_certs,
        client: client_certs,
    } = MeshCerts::generate("server")?;
    let hbone = TcpListener::bind(SocketAddr::new(server_ip, HBONE_PORT))
        .await
        .context("binding 15008")?;
    tokio::spawn(weft_proxy::inbound::serve(
        hbone,
        server_certs,
        bundle.clone(),
        Arc::new(LocalApp::at(vec![server_ip])),
    ));

    let IpAddr::V4(v4) = server_ip else {
        bail!("IPv4 expected")
    };
    let binding = testing::binding("bench", "echo.bench.svc.cluster.local", &[(80, 8080)]);
    let workload = testing::workload(
        "c1/bench/server",
        v4.octets().to_vec(),
        "server",
        vec![binding],
    );
    let service = mesh::Service {
        vips: Vec::new(),
        clusters: Vec::new(),
        ..testing::service(
            "bench",
            "echo",
            [0; 4],
            vec![testing::port(80, "tcp", mesh::AppProtocol::Tcp, 8080)],
        )
    };
    let xds = Arc::new(XdsState::default());
    xds.snapshot
        .store(Arc::new(Snapshot::from_messages(&[service], &[workload])?));
    let outbound = client_outbound(client_certs, bundle, xds, None);
    let proxy_listener = TcpListener::bind("127.0.0.1:0").await?;
    let proxy = proxy_listener.local_addr()?;
    tokio::spawn(serve_explicit(proxy_listener, outbound));

    let mut direct = TcpStream::connect(app_addr).await?;
    direct.set_nodelay(true)?;
    let mut meshed = TcpStream::connect(proxy).await?;
    meshed.set_nodelay(true)?;
    meshed
        .write_all(b"CONNECT echo.bench.svc.cluster.local:80 HTTP/1.1\r\n\r\n")
        .await?;
    let mut head = [0u8; 39];
    meshed.read_exact(&mut head).await?;
    if !head.starts_with(b"HTTP/1.1 200") {
        bail!(
            "the client sidecar refused: {}",
            String::from_utf8_lossy(&head)
        );
    }

    let payload = vec![b'x'; options.payload];
    let mut buf = vec![0u8; options.payload];
    let mut direct_h = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)?;
    let mut mesh_h = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3)?;
    // Each tick does one round trip on each path, in alternating order, so
    // that neither always goes first.
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / options.rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0..(options.warmup + options.requests) {
        tick.tick().await;
        let (d, m) = if n % 2 == 0 {
            let d = round_trip(&mut direct, &payload, &mut buf).await?;
            (d, round_trip(&mut meshed, &payload, &mut buf).await?)
        } else {
            let m = round_trip(&mut meshed, &payload, &mut buf).await?;
            (round_trip(&mut direct, &payload, &mut buf).await?, m)
        };
        if n >= options.warmup {
            direct_h.record(d.as_micros().max(1) as u64)?;
            mesh_h.record(m.as_micros().max(1) as u64)?;
        }
    }
    let d = report::percentiles_ms(&direct_h);
    let m = report::percentiles_ms(&mesh_h);
    let (payload, rate) = (options.payload, options.rate);
    let (requests, warmup) = (options.requests, options.warmup);
    let markdown = format!(
        "# Sidecar path, TCP: {payload} B echo at {rate}/s\n\n\
         {header}\n\
         One persistent TCP connection each way: directly to the app, and through the client \
         sidecar (explicit CONNECT) → mTLS HTTP/2 CONNECT tunnel → server sidecar → app. A {payload} B \
         write and its {payload} B echo is one round trip; both paths take one each tick, in \
         alternating order, {requests} ticks after {warmup} of warm-up. App, sidecars and client \
         share this process on loopback, so this is the path's latency, not a per-sidecar CPU cost. \
         This is L4; the issue's target is for HTTP/1.1 through L7, which does not exist yet.\n\n\
         | path | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | samples |\n|---|---|---|---|---|---|---|\n\
         | direct | {direct} |\n\
         | two sidecars, mTLS | {meshed} |\n\
         | added | {a0:.3} | {a1:.3} | {a2:.3} | {a3:.3} | | |\n",
        header = report::header(command),
        direct = report::cells(&d, 3),
        meshed = report::cells(&m, 3),
        a0 = m[0] - d[0],
        a1 = m[1] - d[1],
        a2 = m[2] - d[2],
        a3 = m[3] - d[3],
    );
    // No target is asserted: the issue's target is for L7 HTTP.
    Ok(Outcome {
        markdown,
        passed: true,
    })
}
