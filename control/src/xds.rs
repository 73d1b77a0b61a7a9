//! The delta ADS server (`DeltaAggregatedResources`), Envoy's protocol with
//! weft's two resource types.
//!
//! Each stream runs as its own task with one response in flight per type:
//! the next is sent only after the proxy ACKs or NACKs the last. A slow proxy
//! therefore slows only itself, and what it has not received yet merges into
//! its next response instead of queueing up. Per stream and type the server
//! keeps one number, the model version the proxy has been sent up to; the
//! model's change log turns that into the resources to send.

use std::collections::{HashSet, VecDeque};
use std::ops::Bound;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use weft_xds_proto::discovery::aggregated_discovery_service_server::AggregatedDiscoveryService;
use weft_xds_proto::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse, Resource,
};
use weft_xds_proto::type_url;

use crate::hub::Hub;
use crate::model::{Entry, Model, Table};
use crate::tls::PeerIdentity;

/// Resources per response while catching up, so that a proxy's first sync
/// of a large mesh is a series of bounded messages rather than one huge one,
/// and a thousand proxies syncing at once hold little memory each.
pub const CHUNK: usize = 200;

pub struct AdsServer {
    hub: Arc<Hub>,
    remote_timeout: std::time::Duration,
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
    pub fn new(hub: Arc<Hub>, remote_timeout: std::time::Duration) -> Self {
        AdsServer {
            hub,
            remote_timeout,
            require_identity: false,
            max_stream_age: None,
        }
    }

    /// A server that answers only clients with a mesh certificate, and ends
    /// each stream after `max_age` give or take 10%.
    pub fn for_mesh(
        hub: Arc<Hub>,
        remote_timeout: std::time::Duration,
        max_age: std::time::Duration,
    ) -> Self {
        AdsServer {
            hub,
            remote_timeout,
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
    type DeltaAggregatedResourcesStream = ResponseStream<DeltaDiscoveryResponse>;

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
        let remote_timeout = self.remote_timeout;
        tokio::spawn(async move {
            hub.metrics.connected_proxies.inc();
            let stream = serve_stream(&hub, remote_timeout, peer.clone(), inbound, &tx);
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

/// What one stream still owes the proxy for one resource type.
///
/// Changes are walked straight off the model's version log with a cursor,
/// so a proxy catching up on the whole mesh costs a position, not a list of
/// names. Only the difference computed for a reconnecting proxy is a list,
/// and it is released once sent.
struct TypeState {
    type_url: &'static str,
    /// Every change up to this model version is sent, or is in the pass
    /// under way.
    frontier: u64,
    /// The pass under way: where it continues in the log, and the version it
    /// goes up to. Later changes are the next pass's.
    cursor: Option<(Bound<(u64, String)>, u64)>,
    /// Names to send (current body) or to remove, before the cursor's pass.
    pending: VecDeque<String>,
    in_flight: Option<String>,
}

fn table<'a>(model: &'a Model, type_url: &str) -> &'a Table {
    if type_url == type_url::SERVICE {
        &model.services
    } else {
        &model.workloads
    }
}

/// A resource's version as proxies see it: a hash of its content, so that
/// it means the same thing to every control plane process. A counter would
/// restart with the process, and a proxy reconnecting to the new one could
/// hold different content under a version that now names something else.
fn resource_version(body: &[u8]) -> String {
    use std::hash::Hasher;
    // Fixed keys: the same content hashes the same in every process.
    let mut hasher = std::hash::DefaultHasher::new();
    hasher.write(body);
    format!("{:016x}", hasher.finish())
}

fn known_type(url: &str) -> Option<&'static str> {
    [type_url::SERVICE, type_url::WORKLOAD]
        .into_iter()
        .find(|known| *known == url)
}

async fn serve_stream(
    hub: &Hub,
    remote_timeout: std::time::Duration,
    peer: Option<PeerIdentity>,
    mut inbound: Streaming<DeltaDiscoveryRequest>,
    tx: &mpsc::Sender<Result<DeltaDiscoveryResponse, Status>>,
) -> Result<(), Status> {
    let mut versions = hub.versions();
    let mut closing = hub.closing();
    let mut types: Vec<TypeState> = Vec::new();
    let mut node = String::from("unknown");
    let mut nonce_counter = 0u64;
    // A control plane that just started has not listed its clusters yet:
    // answering now would tell reconnecting proxies to remove everything it
    // has not seen so far. Proxies keep serving their last snapshot while
    // they wait.
    // Ready is not enough: the tables are computed at the next flush (after
    // the debounce), so wait until what the clusters said is in them. A
    // model that never settles is served after the longest debounce.
    let mut ready_since: Option<std::time::Instant> = None;
    while !hub.serving.load(std::sync::atomic::Ordering::Acquire) {
        {
            let model = hub.model();
            if model.ready(remote_timeout) {
                let since = *ready_since.get_or_insert_with(std::time::Instant::now);
                if model.is_clean() || since.elapsed() > std::time::Duration::from_secs(11) {
                    hub.serving
                        .store(true, std::sync::atomic::Ordering::Release);
                    break;
                }
            } else {
                ready_since = None;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
            _ = closing.wait_for(|closed| *closed) => {
                return Err(Status::unavailable("the control plane is shutting down; reconnect"));
            }
        }
    }
    loop {
        // Send what is owed, one response in flight per type.
        for state in types.iter_mut().filter(|s| s.in_flight.is_none()) {
            let response = {
                let model = hub.model();
                let table = table(&model, state.type_url);
                if state.pending.is_empty()
                    && state.cursor.is_none()
                    && model.version() > state.frontier
                {
                    if state.frontier < table.floor() {
                        return Err(Status::aborted(
                            "this proxy fell behind the removals the server remembers; reconnect to resync",
                        ));
                    }
                    state.cursor = Some((
                        Bound::Included((state.frontier + 1, String::new())),
                        model.version(),
                    ));
                    state.frontier = model.version();
                }
                if state.pending.is_empty() && state.cursor.is_none() {
                    continue;
                }
                nonce_counter += 1;
                let mut response = DeltaDiscoveryResponse {
                    system_version_info: model.version().to_string(),
                    type_url: state.type_url.to_string(),
                    nonce: nonce_counter.to_string(),
                    ..Default::default()
                };
                let add = |name: &String,
                           entry: Option<&Entry>,
                           response: &mut DeltaDiscoveryResponse| {
                    match entry.and_then(|e| e.body.as_ref()) {
                        Some(body) => response.resources.push(Resource {
                            name: name.clone(),
                            version: resource_version(body),
                            resource: Some(prost_types::Any {
                                type_url: state.type_url.to_string(),
                                value: body.to_vec(),
                            }),
                            ..Default::default()
                        }),
                        // Removed, or compacted away meanwhile: gone either way.
                        None => response.removed_resources.push(name.clone()),
                    }
                };
                while response.resources.len() + response.removed_resources.len() < CHUNK {
                    let Some(name) = state.pending.pop_front() else {
                        break;
                    };
                    add(&name, table.get(&name), &mut response);
                }
                if state.pending.is_empty() && state.pending.capacity() > 0 {
                    state.pending = VecDeque::new();
                }
                if let Some((start, upto)) = state.cursor.take() {
                    let mut next = Some((start, upto));
                    let room = CHUNK.saturating_sub(
                        response.resources.len() + response.removed_resources.len(),
                    );
                    let mut taken = 0;
                    for (version, name, entry) in
                        table.log_from(next.clone().map(|(b, _)| b).unwrap_or(Bound::Unbounded))
                    {
                        if version > upto {
                            next = None;
                            break;
                        }
                        if taken == room {
                            break;
                        }
                        add(name, Some(entry), &mut response);
                        taken += 1;
                        next = Some((Bound::Excluded((version, name.clone())), upto));
                    }
                    // The log ran out: the pass is complete.
                    if taken < room {
                        next = None;
                    }
                    state.cursor = next;
                }
                if response.resources.is_empty() && response.removed_resources.is_empty() {
                    continue;
                }
                response
            };
            state.in_flight = Some(response.nonce.clone());
            hub.metrics.pushes.inc();
            hub.metrics
                .pushed_resources
                .inc_by((response.resources.len() + response.removed_resources.len()) as u64);
            hub.metrics.pushed_bytes.inc_by(
                response
                    .resources
                    .iter()
                    .map(|r| r.resource.as_ref().map_or(0, |a| a.value.len()))
                    .sum::<usize>() as u64,
            );
            hub.observe_push_latency();
            if tx.send(Ok(response)).await.is_err() {
                return Ok(()); // The proxy went away.
            }
        }

        tokio::select! {
            message = inbound.message() => {
                let request = match message {
                    Ok(Some(request)) => request,
                    Ok(None) => return Ok(()),
                    Err(status) => {
                        tracing::debug!(%node, %status, "xDS stream closed by the proxy");
                        return Ok(());
                    }
                };
                if let Some(n) = request.node.as_ref().filter(|n| !n.id.is_empty()) {
                    node = n.id.clone();
                }
                let Some(url) = known_type(&request.type_url) else {
                    tracing::warn!(%node, type_url = %request.type_url, "subscription to an unknown resource type ignored");
                    continue;
                };
                let existing = types.iter().position(|s| s.type_url == url);
                if !request.response_nonce.is_empty() {
                    let Some(state) = existing.map(|i| &mut types[i]) else {
                        continue;
                    };
                    if state.in_flight.as_deref() == Some(request.response_nonce.as_str()) {
                        state.in_flight = None;
                    }
                    if let Some(error) = &request.error_detail {
                        // The proxy keeps its last good config; it is told
                        // again only when the resources change again.
                        hub.metrics.nacks.inc();
                        tracing::warn!(%node, identity = ?peer, type_url = url, nonce = %request.response_nonce, error = %error.message, "proxy rejected a push (NACK)");
                    }
                    continue;
                }
                // A (re)subscription: initial state, or what differs from
                // the versions the proxy says it has.
                let model = hub.model();
                let table = table(&model, url);
                let mut state = TypeState {
                    type_url: url,
                    frontier: model.version(),
                    cursor: None,
                    pending: VecDeque::new(),
                    in_flight: None,
                };
                if !request.resource_names_subscribe.is_empty()
                    && !request.resource_names_subscribe.iter().any(|n| n == "*")
                {
                    tracing::debug!(%node, type_url = url, "named subscriptions are served as wildcard");
                }
                let known = &request.initial_resource_versions;
                if known.is_empty() {
                    // A fresh proxy: walk the whole log up to now.
                    state.cursor = Some((Bound::Included((0, String::new())), model.version()));
                } else {
                    let mut differing: Vec<&String> = table
                        .live()
                        .filter(|(name, entry)| {
                            entry.body.as_ref().map(|b| resource_version(b)).as_ref() != known.get(*name)
                        })
                        .map(|(name, _)| name)
                        .collect();
                    differing.sort();
                    let mut seen = HashSet::new();
                    for name in differing {
                        if seen.insert(name.clone()) {
                            state.pending.push_back(name.clone());
                        }
                    }
                    for name in known.keys() {
                        if table.get(name).is_none_or(|e| e.body.is_none()) && seen.insert(name.clone()) {
                            state.pending.push_back(name.clone());
                        }
                    }
                }
                drop(model);
                match existing {
                    Some(i) => {
                        let in_flight = types[i].in_flight.take();
                        state.in_flight = in_flight;
                        types[i] = state;
                    }
                    None => types.push(state),
                }
                tracing::debug!(%node, identity = ?peer, type_url = url, "proxy subscribed");
            }
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
