//! The delta ADS server (`DeltaAggregatedResources`), Envoy's protocol with
//! weft's resource types (`Service`, `Workload`, `Authorization`).
//!
//! Each stream runs as its own task with one response in flight per type:
//! the next is sent only after the proxy ACKs or NACKs the last. A slow proxy
//! therefore slows only itself, and what it has not received yet merges into
//! its next response instead of queueing up. Per stream and type the server
//! keeps one number, the model version the proxy has been sent up to; the
//! model's change log turns that into the resources to send.
//!
//! `gate` decides when a starting control plane answers at all,
//! `subscription` holds what a stream owes per type, and `serve_stream`
//! here only moves messages between them and the proxy.

mod gate;
mod subscription;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use weft_xds_proto::discovery::{DeltaDiscoveryRequest, DiscoveryRequest, DiscoveryResponse};
use weft_xds_proto::encoded::EncodedDeltaResponse;
use weft_xds_proto::encoded::ads::aggregated_discovery_service_server::AggregatedDiscoveryService;
use weft_xds_proto::type_url;

pub use gate::Gate;
use subscription::Subscription;

use crate::hub::Hub;
use crate::model::{Model, Table};
use crate::tls::PeerIdentity;

/// Resources per response while catching up, so that a proxy's first sync
/// of a large mesh is a series of bounded messages rather than one huge one,
/// and a thousand proxies syncing at once hold little memory each.
pub const CHUNK: usize = 200;

pub struct AdsServer {
    hub: Arc<Hub>,
    gate: Gate,
    /// Whether a stream needs a client certificate chained to the mesh root.
    /// The mesh view (every workload, address and identity of every
    /// cluster) is for mesh workloads only; only the plain-text port of
    /// tests and benchmarks serves without one.
    require_identity: bool,
    /// Streams end after about this long (jittered per stream), so that
    /// proxies reconnect, and spread over the replicas there are now.
    max_stream_age: Option<std::time::Duration>,
}

impl AdsServer {
    /// A server for any client (the plain-text port of tests and benches).
    pub fn new(hub: Arc<Hub>, gate: Gate) -> Self {
        AdsServer {
            hub,
            gate,
            require_identity: false,
            max_stream_age: None,
        }
    }

    /// A server that answers only clients with a mesh certificate, and ends
    /// each stream after `max_age` give or take 10%.
    pub fn for_mesh(hub: Arc<Hub>, gate: Gate, max_age: std::time::Duration) -> Self {
        AdsServer {
            hub,
            gate,
            require_identity: true,
            max_stream_age: Some(max_age),
        }
    }
}

/// `age` moved by up to 10% either way, so that streams opened together
/// (after a control plane restart) do not all end together.
pub fn jittered(age: std::time::Duration) -> std::time::Duration {
    use rand::Rng;
    age.mul_f64(rand::rng().random_range(0.9..=1.1))
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsServer {
    type StreamAggregatedResourcesStream = ResponseStream<DiscoveryResponse>;
    type DeltaAggregatedResourcesStream = ResponseStream<EncodedDeltaResponse>;

    async fn stream_aggregated_resources(
        &self,
        _request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        Err(Status::unimplemented(
            "weft serves incremental xDS only: use DeltaAggregatedResources",
        ))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = request.extensions().get::<PeerIdentity>().cloned();
        if self.require_identity && peer.as_ref().and_then(|p| p.identity.as_ref()).is_none() {
            self.hub.metrics.xds_refused.inc();
            tracing::info!(addr = ?peer.map(|p| p.addr), "xDS refused: no mesh client certificate");
            return Err(Status::unauthenticated(
                "xDS needs a client certificate from the mesh CA",
            ));
        }
        let age = self.max_stream_age.map(jittered);
        let inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(1);
        let hub = self.hub.clone();
        let gate = self.gate;
        tokio::spawn(async move {
            hub.metrics.connected_proxies.inc();
            let stream = serve_stream(&hub, gate, peer.clone(), inbound, &tx);
            let result = match age {
                Some(age) => tokio::time::timeout(age, stream).await.unwrap_or_else(|_| {
                    Err(Status::unavailable(
                        "this stream reached its maximum age; reconnect",
                    ))
                }),
                None => stream.await,
            };
            hub.metrics.connected_proxies.dec();
            if let Err(status) = result {
                tracing::debug!(peer = ?peer, %status, "xDS stream ended with an error");
                let _ = tx.send(Err(status)).await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn table<'a>(model: &'a Model, type_url: &str) -> &'a Table {
    match type_url {
        type_url::SERVICE => &model.services,
        type_url::AUTHORIZATION => &model.authorizations,
        type_url::ROUTE_SET => &model.routes,
        type_url::DESTINATION_POLICY => &model.destinations,
        type_url::NETWORK_GATEWAY => &model.gateways,
        _ => &model.workloads,
    }
}

/// Every resource type served, in the order `weftctl proxy-status` shows.
pub const KNOWN_TYPES: [&str; 6] = type_url::ALL;

fn known_type(url: &str) -> Option<&'static str> {
    KNOWN_TYPES.into_iter().find(|known| *known == url)
}

/// Waits until `gate` opens for this control plane (once open, it stays
/// open for every stream), or until shutdown.
async fn wait_for_gate(hub: &Hub, gate: Gate) -> Result<(), Status> {
    let mut closing = hub.closing();
    let mut ready_since = None;
    while !hub.serving.load(Ordering::Acquire) {
        let opens = {
            let model = hub.model();
            let now = std::time::Instant::now();
            gate.opens(
                model.ready(gate.remote_timeout),
                model.is_clean(),
                &mut ready_since,
                now,
            )
        };
        if opens {
            hub.serving.store(true, Ordering::Release);
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
            _ = closing.wait_for(|closed| *closed) => {
                return Err(Status::unavailable("the control plane is shutting down; reconnect"));
            }
        }
    }
    Ok(())
}

/// Sends every subscription what it is owed, one response in flight per
/// type. False when the proxy went away.
async fn send_owed(
    hub: &Hub,
    subscriptions: &mut [Subscription],
    nonces: &mut u64,
    tx: &mpsc::Sender<Result<EncodedDeltaResponse, Status>>,
) -> Result<bool, Status> {
    let services_wait = subscription::services_wait(&subscriptions.iter().collect::<Vec<_>>());
    for subscription in subscriptions.iter_mut() {
        if services_wait && subscription.type_url == type_url::SERVICE {
            continue;
        }
        let response = {
            let model = hub.model();
            let table = table(&model, subscription.type_url);
            subscription.next_response(model.version(), table, *nonces + 1)?
        };
        let Some(response) = response else { continue };
        *nonces += 1;
        hub.metrics.pushes.inc();
        hub.metrics
            .pushed_resources
            .inc_by((response.resource_count() + response.removed_resources.len()) as u64);
        hub.metrics
            .pushed_bytes
            .inc_by(response.resource_bytes() as u64);
        hub.observe_push_latency();
        if tx.send(Ok(response)).await.is_err() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Takes one request from the proxy: an ACK or NACK of a response, or a
/// (re)subscription to a type.
fn take_request(
    hub: &Hub,
    request: DeltaDiscoveryRequest,
    subscriptions: &mut Vec<Subscription>,
    node: &mut String,
    peer: &Option<PeerIdentity>,
    stream: u64,
) {
    if let Some(n) = request.node.as_ref().filter(|n| !n.id.is_empty()) {
        *node = n.id.clone();
    }
    let Some(url) = known_type(&request.type_url) else {
        tracing::warn!(%node, type_url = %request.type_url, "subscription to an unknown resource type ignored");
        return;
    };
    let existing = subscriptions.iter_mut().position(|s| s.type_url == url);
    if !request.response_nonce.is_empty() {
        let Some(subscription) = existing.map(|i| &mut subscriptions[i]) else {
            return;
        };
        subscription.answered(&request.response_nonce, request.error_detail.is_none());
        if let Some(error) = &request.error_detail {
            hub.proxies.nack(stream, url, &error.message);
            // The proxy keeps its last good config; it is told again only
            // when the resources change again.
            hub.metrics.nacks.inc();
            tracing::warn!(%node, identity = ?peer, type_url = url, nonce = %request.response_nonce, error = %error.message, "proxy rejected a push (NACK)");
        }
        return;
    }
    if !request.resource_names_subscribe.is_empty()
        && !request.resource_names_subscribe.iter().any(|n| n == "*")
    {
        tracing::debug!(%node, type_url = url, "named subscriptions are served as wildcard");
    }
    let subscription = {
        let model = hub.model();
        let table = table(&model, url);
        Subscription::new(
            url,
            model.version(),
            table,
            &request.initial_resource_versions,
        )
    };
    match existing {
        Some(i) => subscriptions[i].replace(subscription),
        None => subscriptions.push(subscription),
    }
    tracing::debug!(%node, identity = ?peer, type_url = url, "proxy subscribed");
}

/// A stream's place in the proxy registry, marked gone however the
/// stream ends.
struct Registered<'a> {
    hub: &'a Hub,
    id: u64,
}

impl<'a> Registered<'a> {
    fn new(hub: &'a Hub, identity: Option<String>) -> Self {
        Registered {
            hub,
            id: hub.proxies.connect(identity),
        }
    }

    fn record(&self, node: &str, subscriptions: &[Subscription]) {
        self.hub.proxies.record(
            self.id,
            node,
            subscriptions.iter().map(|s| {
                let (sent, acked) = s.sent_and_acked();
                (
                    s.type_url,
                    crate::proxy_status::TypeStatus {
                        settled: s.settled(),
                        sent,
                        acked,
                        last_push: s.last_push(),
                        ..Default::default()
                    },
                )
            }),
        );
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.hub.proxies.disconnect(self.id);
    }
}

async fn serve_stream(
    hub: &Hub,
    gate: Gate,
    peer: Option<PeerIdentity>,
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    tx: &mpsc::Sender<Result<EncodedDeltaResponse, Status>>,
) -> Result<(), Status> {
    let mut versions = hub.versions();
    let mut closing = hub.closing();
    let mut subscriptions: Vec<Subscription> = Vec::new();
    let mut node = String::from("unknown");
    let mut nonces = 0u64;
    wait_for_gate(hub, gate).await?;
    let stream = Registered::new(
        hub,
        peer.as_ref().map(|p| {
            p.identity
                .as_ref()
                .map_or_else(|| p.addr.to_string(), |i| i.to_string())
        }),
    );
    loop {
        if !send_owed(hub, &mut subscriptions, &mut nonces, tx).await? {
            return Ok(()); // The proxy went away.
        }
        stream.record(&node, &subscriptions);
        tokio::select! {
            message = inbound.message() => match message {
                Ok(Some(request)) => {
                    take_request(hub, request, &mut subscriptions, &mut node, &peer, stream.id);
                    stream.record(&node, &subscriptions);
                }
                Ok(None) => return Ok(()),
                Err(status) => {
                    tracing::debug!(%node, %status, "xDS stream closed by the proxy");
                    return Ok(());
                }
            },
            changed = versions.changed() => {
                if changed.is_err() {
                    return Err(Status::unavailable("the control plane is shutting down"));
                }
            }
            _ = closing.wait_for(|closed| *closed) => {
                return Err(Status::unavailable("the control plane is shutting down; reconnect"));
            }
        }
    }
}
