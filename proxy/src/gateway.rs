//! Gateway mode (`weft-proxy proxy gateway`): an east-west gateway's
//! 15008, the one port of a network that proxies on other networks reach.
//!
//! It believes nothing it cannot check. A caller must complete mutual TLS
//! with a certificate of the mesh CA (plaintext and other CAs never get
//! past the handshake); each request on that connection must be a CONNECT
//! whose authority is the mesh port (15008) of a workload with a sidecar
//! on this gateway's own network, as its xDS view says. Anything else is
//! refused with a status and counted. The tunnel carries the caller's own
//! mTLS session with the destination sidecar, so the gateway relays bytes
//! it cannot read, and the destination authorizes the caller's identity,
//! never the gateway's.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use weft_certs::accept;
use weft_certs::tls::{self, CertStore, TrustBundle};

use crate::drain::Drain;
use crate::http::{Body, error, status};
use crate::metrics::{Metrics, OutcomeLabels};
use crate::network::same_network;
use crate::pool::{HANDSHAKE_TIMEOUT, HBONE_PORT};
use crate::xds::XdsState;

/// Connections a gateway takes at once before they have proven a mesh
/// identity: its port faces whatever reaches the load balancer, so a flood
/// of connections that never finish a handshake must not hold its memory.
pub const MAX_HANDSHAKES: usize = 1024;

/// What the gateway needs to decide and forward.
pub struct Forwarder {
    pub xds: Arc<XdsState>,
    pub metrics: Arc<Metrics>,
    pub drain: Drain,
    pub connect_timeout: Duration,
    /// Room for connections still in their handshake (`MAX_HANDSHAKES`);
    /// one over it is closed at once and counted `refused_busy`.
    pub handshakes: Arc<tokio::sync::Semaphore>,
}

/// Why a tunnel was refused, as counted and answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    NotConnect,
    BadTarget,
    NotMeshPort,
    UnknownWorkload,
    OtherNetwork,
    NoSidecar,
    Unreachable,
}

impl Refusal {
    fn outcome(self) -> &'static str {
        match self {
            Refusal::NotConnect => "refused_not_connect",
            Refusal::BadTarget => "refused_bad_target",
            Refusal::NotMeshPort => "refused_not_mesh_port",
            Refusal::UnknownWorkload => "refused_unknown_workload",
            Refusal::OtherNetwork => "refused_other_network",
            Refusal::NoSidecar => "refused_no_sidecar",
            Refusal::Unreachable => "unreachable",
        }
    }

    fn respond(self) -> Response<Body> {
        let (code, why) = match self {
            Refusal::NotConnect => (
                StatusCode::METHOD_NOT_ALLOWED,
                "an east-west gateway only carries CONNECT tunnels",
            ),
            Refusal::BadTarget => (StatusCode::BAD_REQUEST, "CONNECT needs an ip:port target"),
            Refusal::NotMeshPort => (
                StatusCode::FORBIDDEN,
                "an east-west gateway only forwards to sidecars' mesh port 15008",
            ),
            Refusal::UnknownWorkload => (
                StatusCode::FORBIDDEN,
                "the target is not a workload this gateway knows",
            ),
            Refusal::OtherNetwork => (
                StatusCode::FORBIDDEN,
                "the target is not on this gateway's network",
            ),
            Refusal::NoSidecar => (
                StatusCode::FORBIDDEN,
                "the target has no sidecar: the gateway never carries plaintext",
            ),
            Refusal::Unreachable => (
                StatusCode::SERVICE_UNAVAILABLE,
                "the target's sidecar could not be reached",
            ),
        };
        error(code, why)
    }
}

impl Forwarder {
    /// Where a CONNECT may go: the mesh port of a workload with a sidecar
    /// on this gateway's network.
    pub fn check(&self, request: &Request<Incoming>) -> Result<SocketAddr, Refusal> {
        if request.method() != Method::CONNECT {
            return Err(Refusal::NotConnect);
        }
        let target = request
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
            .ok_or(Refusal::BadTarget)?;
        self.allowed(target)?;
        Ok(target)
    }

    pub fn allowed(&self, target: SocketAddr) -> Result<(), Refusal> {
        if target.port() != HBONE_PORT {
            return Err(Refusal::NotMeshPort);
        }
        let snapshot = self.xds.snapshot.load();
        let workload = snapshot
            .workload_by_ip(target.ip())
            .ok_or(Refusal::UnknownWorkload)?;
        // A gateway that does not know its own network yet forwards
        // nowhere rather than everywhere.
        if snapshot.network.is_empty() || !same_network(&snapshot.network, workload) {
            return Err(Refusal::OtherNetwork);
        }
        if !workload.profile.sidecar {
            return Err(Refusal::NoSidecar);
        }
        Ok(())
    }

    fn count(&self, outcome: &'static str) {
        self.metrics
            .gateway_tunnels
            .get_or_create(&OutcomeLabels { outcome })
            .inc();
    }

    async fn serve_request(
        self: Arc<Self>,
        caller: String,
        mut request: Request<Incoming>,
    ) -> Response<Body> {
        let target = match self.check(&request) {
            Ok(target) => target,
            Err(refusal) => {
                tracing::debug!(%caller, uri = %request.uri(), ?refusal, "gateway tunnel refused");
                self.count(refusal.outcome());
                return refusal.respond();
            }
        };
        // Connect before answering: the caller learns of a dead sidecar
        // from the status and may try another endpoint.
        let upstream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(target)).await {
                Ok(Ok(tcp)) => tcp,
                _ => {
                    self.count(Refusal::Unreachable.outcome());
                    return Refusal::Unreachable.respond();
                }
            };
        let _ = upstream.set_nodelay(true);
        self.count("forwarded");
        let guard = self.drain.track();
        crate::task::spawn(async move {
            let _guard = guard;
            match hyper::upgrade::on(&mut request).await {
                Ok(upgraded) => {
                    let mut client = TokioIo::new(upgraded);
                    let mut upstream = upstream;
                    if let Err(err) =
                        tokio::io::copy_bidirectional(&mut client, &mut upstream).await
                    {
                        tracing::debug!(%caller, %target, %err, "gateway tunnel ended");
                    }
                }
                Err(err) => tracing::debug!(%err, "gateway tunnel upgrade failed"),
            }
        });
        status(StatusCode::OK)
    }
}

/// Serves the gateway's 15008 until draining starts.
pub async fn serve(
    listener: TcpListener,
    certs: CertStore,
    bundle: TrustBundle,
    forwarder: Arc<Forwarder>,
) {
    let tls = match tls::server_config(&certs, &bundle) {
        Ok(tls) => tokio_rustls::TlsAcceptor::from(tls),
        Err(err) => {
            tracing::error!(%err, "cannot build the gateway's TLS configuration");
            return;
        }
    };
    let drain = forwarder.drain.clone();
    crate::serve::accept(listener, drain, move |tcp, addr| {
        let (tls, forwarder) = (tls.clone(), forwarder.clone());
        async move {
            let Ok(handshaking) = forwarder.handshakes.clone().try_acquire_owned() else {
                forwarder.count("refused_busy");
                return;
            };
            // A connection closed before its first byte is a probe (the
            // control plane's, a load balancer's) or a scan, not a refused
            // caller: counted apart.
            let mut first = [0u8; 1];
            if let Ok(Ok(0)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await {
                forwarder.count("closed_before_handshake");
                return;
            }
            let handshake = accept::handshake(&tls, tcp, HANDSHAKE_TIMEOUT).await;
            drop(handshaking);
            let stream = match handshake {
                Ok(stream) => stream,
                Err(err) => {
                    forwarder.count("refused_handshake");
                    tracing::debug!(%addr, %err, "gateway mTLS handshake refused");
                    return;
                }
            };
            let Some(identity) = tls::peer_identity(stream.get_ref().1.peer_certificates()) else {
                forwarder.count("refused_no_identity");
                tracing::debug!(%addr, "gateway caller without a mesh identity");
                return;
            };
            let caller = identity.to_string();
            let drain = forwarder.drain.clone();
            let service = hyper::service::service_fn(move |request| {
                let (forwarder, caller) = (forwarder.clone(), caller.clone());
                async move { Ok::<_, Infallible>(forwarder.serve_request(caller, request).await) }
            });
            let connection = hyper::server::conn::http2::Builder::new(crate::task::Executor)
                .serve_connection(TokioIo::new(stream), service);
            drain.serve(connection).await;
        }
    })
    .await
}
