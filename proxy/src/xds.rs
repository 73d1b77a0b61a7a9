//! The delta xDS client: subscribes to `Service`, `Workload`,
//! `Authorization`, `RouteSet`, `DestinationPolicy` and `NetworkGateway`,
//! applies
//! each response all-or-nothing, publishes a new snapshot, and ACKs; a
//! response with any invalid resource is NACKed and changes nothing, so the
//! proxy keeps serving its last good snapshot. Across reconnects it sends
//! the versions it holds, so a control plane restart costs only the
//! difference.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use weft_xds_proto::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weft_xds_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use weft_xds_proto::envoy::config::core::v3::Node;
use weft_xds_proto::google::rpc::Status;
use weft_xds_proto::type_url;

use crate::authorization::{self, Policy};
use crate::network::{self, Gateway};
use crate::resources::{self, Interner, InvalidResource, Service, Workload};
use crate::routes::{self, Destination, RouteSet};
use crate::state::{Local, ServiceIndex, Snapshot, Traffic, WorkloadIndex};

/// The resource types a proxy subscribes to, in the order it asks.
pub const TYPES: [&str; 6] = type_url::ALL;

/// What the xDS client publishes to the rest of the proxy.
pub struct XdsState {
    pub snapshot: ArcSwap<Snapshot>,
    /// The pod this proxy serves: whose inbound policy the snapshot holds.
    pub local: Local,
    /// Counts snapshots published, so that long-lived connections can
    /// look at policy again when it changes.
    pub changes: tokio::sync::watch::Sender<u64>,
    /// Set once both types have been received at least once.
    pub synced: AtomicBool,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
    pub reconnects: AtomicU64,
    /// True while a stream to the control plane is open.
    pub connected: AtomicBool,
}

impl Default for XdsState {
    fn default() -> Self {
        XdsState {
            snapshot: ArcSwap::from_pointee(Snapshot::default()),
            local: Local::default(),
            changes: tokio::sync::watch::Sender::new(0),
            synced: AtomicBool::new(false),
            acks: AtomicU64::new(0),
            nacks: AtomicU64::new(0),
            reconnects: AtomicU64::new(0),
            connected: AtomicBool::new(false),
        }
    }
}

impl XdsState {
    /// The state of the proxy of the pod at `addresses` in `namespace`.
    pub fn for_pod(local: Local) -> Self {
        XdsState {
            local,
            ..XdsState::default()
        }
    }

    /// Publishes a new snapshot.
    pub fn publish(&self, snapshot: Snapshot) {
        self.snapshot.store(Arc::new(snapshot));
        self.changes.send_modify(|n| *n += 1);
    }
}

/// The resources held, with their versions: kept across streams.
#[derive(Default)]
pub struct Resources {
    pub services: Held<Service>,
    pub workloads: Held<Workload>,
    pub authorizations: Held<Policy>,
    pub route_sets: Held<RouteSet>,
    pub destinations: Held<Destination>,
    pub gateways: Held<Gateway>,
    names: Interner,
    /// Traffic policy as last settled: reused while neither the policy
    /// nor the caller changes, so a pod update does not recompile every
    /// host's routes.
    traffic: std::sync::Mutex<Option<Arc<Traffic>>>,
    /// The services' indexes as last built: reused until a service
    /// changes.
    service_index: std::sync::Mutex<Option<Arc<ServiceIndex>>>,
    /// The workloads' indexes, edited as each update arrives: a pod's
    /// change costs the few chunks it touches, not a rebuild.
    workload_index: WorkloadIndex,
    /// The types a complete answer has been received for.
    seen: [bool; 6],
}

impl Resources {
    /// Applies one response whole, or, if any resource in it is invalid,
    /// not at all: everything is decoded before anything changes.
    pub fn apply(&mut self, response: &DeltaDiscoveryResponse) -> Result<(), InvalidResource> {
        match response.type_url.as_str() {
            type_url::SERVICE => {
                apply_typed(
                    &mut self.services,
                    &mut self.names,
                    response,
                    resources::decode_service,
                )?;
                *self
                    .service_index
                    .get_mut()
                    .unwrap_or_else(|p| p.into_inner()) = None;
            }
            type_url::WORKLOAD => {
                let upserted = apply_typed(
                    &mut self.workloads,
                    &mut self.names,
                    response,
                    resources::decode_workload,
                )?;
                for workload in upserted {
                    self.workload_index.upsert(workload);
                }
                for uid in &response.removed_resources {
                    self.workload_index.remove(uid);
                }
            }
            type_url::AUTHORIZATION => {
                apply_typed(
                    &mut self.authorizations,
                    &mut self.names,
                    response,
                    authorization::decode,
                )?;
            }
            type_url::ROUTE_SET | type_url::DESTINATION_POLICY => {
                self.traffic = Default::default();
                self.apply_traffic(response)?
            }
            type_url::NETWORK_GATEWAY => {
                apply_typed(
                    &mut self.gateways,
                    &mut self.names,
                    response,
                    network::decode_gateway,
                )?;
            }
            other => {
                return Err(InvalidResource::Field {
                    name: other.to_string(),
                    reason: "a resource type this proxy did not subscribe to".into(),
                });
            }
        }
        if let Some(at) = TYPES.iter().position(|t| *t == response.type_url) {
            self.seen[at] = true;
        }
        self.names.prune();
        Ok(())
    }

    fn apply_traffic(&mut self, response: &DeltaDiscoveryResponse) -> Result<(), InvalidResource> {
        match response.type_url.as_str() {
            type_url::ROUTE_SET => {
                apply_typed(
                    &mut self.route_sets,
                    &mut self.names,
                    response,
                    routes::decode_route_set,
                )?;
            }
            _ => {
                apply_typed(
                    &mut self.destinations,
                    &mut self.names,
                    response,
                    routes::decode_destination,
                )?;
            }
        }
        Ok(())
    }

    /// The snapshot of everything held, with the inbound policy of the
    /// pod at `local`.
    pub fn snapshot(&self, local: &Local) -> Snapshot {
        let services = self
            .service_index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(|| Arc::new(ServiceIndex::build(self.services.values().cloned())))
            .clone();
        let snapshot = Snapshot::of(services, self.workload_index.clone())
            .with_policies(self.authorizations.values().cloned(), local);
        let caller = snapshot.caller(local);
        let mut cached = self.traffic.lock().unwrap_or_else(|p| p.into_inner());
        let traffic = match cached.as_ref() {
            Some(traffic) if traffic.caller == caller => traffic.clone(),
            _ => {
                let traffic = Arc::new(Traffic::new(
                    self.route_sets.values().cloned(),
                    self.destinations.values().cloned(),
                    caller,
                ));
                *cached = Some(traffic.clone());
                traffic
            }
        };
        snapshot
            .with_settled_traffic(traffic)
            .with_gateways(self.gateways.values().cloned(), local)
    }

    fn versions(&self, url: &str) -> std::collections::HashMap<String, String> {
        match url {
            type_url::SERVICE => self.services.versions(),
            type_url::AUTHORIZATION => self.authorizations.versions(),
            type_url::ROUTE_SET => self.route_sets.versions(),
            type_url::DESTINATION_POLICY => self.destinations.versions(),
            type_url::NETWORK_GATEWAY => self.gateways.versions(),
            _ => self.workloads.versions(),
        }
    }

    /// Every type has been answered at least once: the first answer to a
    /// subscription is sent even when empty.
    fn complete(&self) -> bool {
        self.seen.iter().all(|seen| *seen)
    }
}

/// A resource's version as the control plane named it. Ours are 64-bit
/// content hashes in hex: held as the number, 8 bytes and no allocation
/// per resource. Any other text (another control plane's) is kept aside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Version {
    Hash(u64),
    Other(String),
}

impl Version {
    fn parse(text: &str) -> Version {
        match u64::from_str_radix(text, 16) {
            Ok(hash) if text.len() == 16 && !text.starts_with('+') => Version::Hash(hash),
            _ => Version::Other(text.to_string()),
        }
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Version::Hash(hash) => write!(f, "{hash:016x}"),
            Version::Other(text) => f.write_str(text),
        }
    }
}

/// What a held resource is known by: the name the control plane sent it
/// under, which the resource itself carries (a workload's uid, a
/// service's `namespace/hostname`), so that it is not stored twice.
pub trait Named {
    fn resource_name(&self) -> &str;
}

impl Named for Workload {
    fn resource_name(&self) -> &str {
        &self.uid
    }
}

impl Named for Service {
    fn resource_name(&self) -> &str {
        &self.resource_name
    }
}

impl Named for Policy {
    fn resource_name(&self) -> &str {
        &self.name
    }
}

impl Named for Gateway {
    fn resource_name(&self) -> &str {
        &self.name
    }
}

impl Named for RouteSet {
    fn resource_name(&self) -> &str {
        &self.name
    }
}

impl Named for Destination {
    fn resource_name(&self) -> &str {
        &self.name
    }
}

/// The resources of one type, sorted by name in one flat vector: a third
/// of a tree's memory at 10,000 workloads, and an update is one merge.
/// Each entry is 16 bytes: the resource and its version's hash.
pub struct Held<T> {
    entries: Vec<(Arc<T>, u64)>,
    /// Versions that are not our hashes, by resource name (their entries
    /// hold 0): empty with weft-control.
    other_versions: std::collections::BTreeMap<String, String>,
}

impl<T> Default for Held<T> {
    fn default() -> Self {
        Held {
            entries: Vec::new(),
            other_versions: Default::default(),
        }
    }
}

impl<T: Named> Held<T> {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(value, _)| value.resource_name())
    }

    pub fn values(&self) -> impl Iterator<Item = &Arc<T>> {
        self.entries.iter().map(|(value, _)| value)
    }

    /// Each resource's version as the control plane wrote it, by name.
    fn versions(&self) -> std::collections::HashMap<String, String> {
        self.entries
            .iter()
            .map(|(resource, hash)| {
                let name = resource.resource_name();
                let version = match self.other_versions.get(name) {
                    Some(text) => text.clone(),
                    None => Version::Hash(*hash).to_string(),
                };
                (name.to_string(), version)
            })
            .collect()
    }

    /// Adds or replaces `upserts` (the last of a name wins), then removes
    /// `removed`, as one response's resources and removals apply.
    fn update(&mut self, mut upserts: Vec<(Version, Arc<T>)>, removed: &[String]) {
        // Stable, so among equal names the last sent stays last.
        upserts.sort_by(|a, b| a.1.resource_name().cmp(b.1.resource_name()));
        let upserts = upserts.into_iter().map(|(version, value)| {
            let hash = match version {
                Version::Hash(hash) => {
                    self.other_versions.remove(value.resource_name());
                    hash
                }
                Version::Other(text) => {
                    self.other_versions
                        .insert(value.resource_name().to_string(), text);
                    0
                }
            };
            (value, hash)
        });
        let mut merged: Vec<(Arc<T>, u64)> = Vec::with_capacity(self.entries.len() + upserts.len());
        let mut old = std::mem::take(&mut self.entries).into_iter().peekable();
        let mut new = upserts.peekable();
        loop {
            let next = match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(_), None) => old.next(),
                (None, Some(_)) => new.next(),
                (Some(o), Some(n)) => match o.0.resource_name().cmp(n.0.resource_name()) {
                    std::cmp::Ordering::Less => old.next(),
                    std::cmp::Ordering::Greater => new.next(),
                    std::cmp::Ordering::Equal => {
                        old.next();
                        new.next()
                    }
                },
            };
            if let Some(entry) = next {
                match merged.last_mut() {
                    Some(last) if last.0.resource_name() == entry.0.resource_name() => {
                        *last = entry
                    }
                    _ => merged.push(entry),
                }
            }
        }
        if !removed.is_empty() {
            let removed: std::collections::HashSet<&str> =
                removed.iter().map(String::as_str).collect();
            merged.retain(|(value, _)| !removed.contains(value.resource_name()));
            self.other_versions
                .retain(|name, _| !removed.contains(name.as_str()));
        }
        merged.shrink_to_fit();
        self.entries = merged;
    }
}

fn apply_typed<T: Named>(
    held: &mut Held<T>,
    names: &mut Interner,
    response: &DeltaDiscoveryResponse,
    decode: fn(&str, &[u8], &mut Interner) -> Result<T, InvalidResource>,
) -> Result<Vec<Arc<T>>, InvalidResource> {
    let decoded = response
        .resources
        .iter()
        .map(|r| {
            let body = r
                .resource
                .as_ref()
                .map(|a| a.value.as_slice())
                .unwrap_or_default();
            let resource = decode(&r.name, body, names)?;
            Ok((Version::parse(&r.version), Arc::new(resource)))
        })
        .collect::<Result<Vec<_>, InvalidResource>>()?;
    let upserted = decoded.iter().map(|(_, r)| r.clone()).collect();
    held.update(decoded, &response.removed_resources);
    Ok(upserted)
}

/// Backoff between reconnects: doubling from `base` up to `max`, each wait
/// drawn between half and all of it so that proxies restarted together do
/// not reconnect together.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            base: Duration::from_millis(200),
            max: Duration::from_secs(15),
        }
    }
}

impl Backoff {
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.max);
        ceiling.mul_f64(0.5 + rand::random::<f64>() * 0.5)
    }
}

/// Runs the client until the task is aborted. `connect` makes a channel to
/// the control plane (mTLS in production).
pub async fn run<F, Fut>(connect: F, node: Node, state: Arc<XdsState>, backoff: Backoff)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<tonic::transport::Channel>>,
{
    let mut resources = Resources::default();
    let mut attempt = 0u32;
    loop {
        let delivered = match connect().await {
            Ok(channel) => match session(channel, &node, &state, &mut resources)
                .await
                .inspect(|_| state.connected.store(false, Ordering::Relaxed))
                .inspect_err(|_| state.connected.store(false, Ordering::Relaxed))
            {
                Ok(delivered) => delivered,
                Err((delivered, err)) => {
                    tracing::warn!(%err, "xDS stream ended; serving the last snapshot meanwhile");
                    delivered
                }
            },
            Err(err) => {
                tracing::warn!(%err, "cannot reach the control plane; serving the last snapshot meanwhile");
                false
            }
        };
        attempt = if delivered {
            0
        } else {
            attempt.saturating_add(1)
        };
        state.reconnects.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(backoff.delay(attempt)).await;
    }
}

/// One stream. Returns whether anything was applied, for the backoff.
async fn session(
    channel: tonic::transport::Channel,
    node: &Node,
    state: &XdsState,
    resources: &mut Resources,
) -> Result<bool, (bool, anyhow::Error)> {
    let (requests, outbound) = mpsc::channel(8);
    for url in TYPES {
        let request = DeltaDiscoveryRequest {
            node: Some(node.clone()),
            type_url: url.into(),
            resource_names_subscribe: vec!["*".into()],
            initial_resource_versions: resources.versions(url),
            ..Default::default()
        };
        // The receiver is alive: it is consumed below.
        let _ = requests.send(request).await;
    }
    let channel = tower::ServiceBuilder::new()
        .map_response(crate::channel::in_pieces)
        .service(channel);
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let mut responses = client
        .delta_aggregated_resources(ReceiverStream::new(outbound))
        .await
        .map_err(|e| (false, anyhow::anyhow!("opening the stream: {e}")))?
        .into_inner();
    state.connected.store(true, Ordering::Relaxed);
    let mut delivered = false;
    loop {
        let response = match responses.message().await {
            Ok(Some(response)) => response,
            Ok(None) => return Ok(delivered),
            Err(status) => return Err((delivered, anyhow::anyhow!("{status}"))),
        };
        let verdict = resources.apply(&response);
        let error_detail = match verdict {
            Ok(()) => {
                delivered = true;
                state.publish(resources.snapshot(&state.local));
                let synced_now =
                    resources.complete() && !state.synced.swap(true, Ordering::Relaxed);
                if synced_now {
                    // Start-up is over: its code need not stay mapped.
                    match crate::memory::release_code() {
                        Ok(bytes) => tracing::debug!(bytes, "start-up code unmapped"),
                        Err(err) => tracing::debug!("start-up code left mapped: {err}"),
                    }
                }
                // A large update (the initial sync comes in chunks) leaves
                // the previous snapshots' memory free but held by the
                // allocator, and start-up what it freed of the heap and
                // the stack: give it back to the system, once.
                if synced_now || response.resources.len() + response.removed_resources.len() >= 50 {
                    crate::memory::release_free();
                }
                state.acks.fetch_add(1, Ordering::Relaxed);
                None
            }
            Err(invalid) => {
                state.nacks.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(nonce = %response.nonce, error = %invalid, "rejecting an xDS update; keeping the last good snapshot");
                Some(Status {
                    code: 3, // INVALID_ARGUMENT
                    message: invalid.to_string(),
                    details: vec![],
                })
            }
        };
        let reply = DeltaDiscoveryRequest {
            type_url: response.type_url,
            response_nonce: response.nonce,
            error_detail,
            ..Default::default()
        };
        if requests.send(reply).await.is_err() {
            return Ok(delivered);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use weft_xds_proto::discovery::Resource;
    use weft_xds_proto::mesh;

    fn workload(uid: &str, address: Vec<u8>) -> Resource {
        let w = mesh::Workload {
            uid: uid.into(),
            addresses: vec![address],
            ..Default::default()
        };
        Resource {
            name: uid.into(),
            version: "1".into(),
            resource: Some(prost_types::Any {
                type_url: type_url::WORKLOAD.into(),
                value: w.encode_to_vec(),
            }),
            ..Default::default()
        }
    }

    fn response(resources: Vec<Resource>, removed: Vec<&str>) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: type_url::WORKLOAD.into(),
            resources,
            removed_resources: removed.into_iter().map(String::from).collect(),
            nonce: "1".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_response_applies_whole_or_not_at_all() {
        let mut resources = Resources::default();
        resources
            .apply(&response(
                vec![workload("c1/demo/a", vec![10, 0, 0, 1])],
                vec![],
            ))
            .unwrap();
        assert_eq!(resources.workloads.len(), 1);
        // One bad resource among good ones: nothing changes, a removal included.
        let bad = response(
            vec![
                workload("c1/demo/b", vec![10, 0, 0, 2]),
                workload("c1/demo/c", vec![1, 2, 3]),
            ],
            vec!["c1/demo/a"],
        );
        assert!(resources.apply(&bad).is_err());
        assert_eq!(
            resources.workloads.names().collect::<Vec<_>>(),
            ["c1/demo/a"]
        );
        resources
            .apply(&response(vec![], vec!["c1/demo/a"]))
            .unwrap();
        assert!(resources.workloads.is_empty());
        let mut other = response(vec![], vec![]);
        other.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
        assert!(resources.apply(&other).is_err());
    }

    struct Item(&'static str, u32);

    impl Named for Item {
        fn resource_name(&self) -> &str {
            self.0
        }
    }

    #[test]
    fn updates_merge_in_order_and_the_last_of_a_name_wins() {
        let mut held = Held::<Item>::default();
        let entry = |name, value| (Version::parse("1"), Arc::new(Item(name, value)));
        held.update(vec![entry("c", 3), entry("a", 1), entry("e", 5)], &[]);
        held.update(
            vec![entry("b", 2), entry("c", 30), entry("b", 20), entry("f", 6)],
            &["e".to_string(), "f".to_string(), "zz".to_string()],
        );
        assert_eq!(held.names().collect::<Vec<_>>(), ["a", "b", "c"]);
        assert_eq!(held.values().map(|v| v.1).collect::<Vec<_>>(), [1, 20, 30]);
        held.update(vec![], &["a".to_string(), "b".to_string(), "c".to_string()]);
        assert!(held.is_empty());
    }

    /// Versions are held as hashes, others aside: what the proxy tells a
    /// control plane it holds, on reconnecting, is the text it was sent,
    /// for as long as (and only while) it holds that resource.
    #[test]
    fn held_versions_are_the_text_sent() {
        let mut held = Held::<Item>::default();
        let entry = |name, version| (Version::parse(version), Arc::new(Item(name, 0)));
        held.update(
            vec![
                entry("a", "00000000000000ff"),
                entry("b", "v1"),
                entry("c", "v7"),
            ],
            &[],
        );
        assert_eq!(std::mem::size_of::<(Arc<Item>, u64)>(), 16);
        let versions = |held: &Held<Item>| {
            let mut all: Vec<(String, String)> = held.versions().into_iter().collect();
            all.sort();
            all
        };
        let expect = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            versions(&held),
            expect(&[("a", "00000000000000ff"), ("b", "v1"), ("c", "v7")])
        );
        // b gets one of our hashes, a another control plane's text, c goes.
        held.update(
            vec![entry("b", "0000000000000001"), entry("a", "v2")],
            &["c".to_string()],
        );
        assert_eq!(
            versions(&held),
            expect(&[("a", "v2"), ("b", "0000000000000001")])
        );
        assert_eq!(held.other_versions.len(), 1);
    }

    #[test]
    fn versions_keep_their_text() {
        for text in [
            "00000000000000ff",
            "deadbeefdeadbeef",
            "7",
            "v1.2",
            "+000000000000001",
        ] {
            assert_eq!(Version::parse(text).to_string(), text);
        }
    }

    #[test]
    fn backoff_grows_with_jitter_and_a_ceiling() {
        let b = Backoff::default();
        for attempt in 0..20 {
            let d = b.delay(attempt);
            assert!(d <= b.max, "{d:?}");
            assert!(d >= b.base.saturating_mul(1 << attempt.min(16)).min(b.max) / 2);
        }
    }
}
