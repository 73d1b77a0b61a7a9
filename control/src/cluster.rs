//! One cluster's discovery: kube watchers on Services, EndpointSlices, Pods,
//! Namespaces and Nodes, each object cut down at once to the few fields the
//! mesh needs, and sent to the model as changes.
//!
//! A watcher that relists (after a 410, a restart, a reconnect) reports the
//! complete new set, so the model can drop what disappeared meanwhile.
//! Every change carries the generation of the client that saw it: after a
//! credential rotation, late events from the old client are ignored.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::net::IpAddr;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::DynamicObject;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use weft_xds_proto::mesh::{Affinity, AppProtocol};

use crate::mcs::{self, ExportInfo};
use crate::security::authorization::AuthorizationInfo;
use crate::security::peer_authentication::PeerAuthenticationInfo;
use crate::security::{self, authorization, peer_authentication};
use crate::traffic::{self, TrafficInfo};

/// (namespace, name).
pub type Key = (String, String);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub ips: Vec<IpAddr>,
    pub service_account: String,
    pub node: String,
    pub ready: bool,
    pub sidecar: bool,
    pub canonical_name: String,
    pub canonical_revision: String,
    /// For workload selectors of security policy.
    pub labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointInfo {
    pub pod: Option<String>,
    pub addresses: Vec<IpAddr>,
    pub ready: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceInfo {
    pub service: String,
    pub endpoints: Vec<EndpointInfo>,
    /// (port name, port number)
    pub ports: Vec<(String, u32)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortInfo {
    pub port: u32,
    pub name: String,
    pub protocol: AppProtocol,
    pub target_port: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    pub vip: Option<IpAddr>,
    pub ports: Vec<ServicePortInfo>,
    pub cluster_local: bool,
    /// `weft.io/global` (or `weft.io/cluster-local: "true"`, which is
    /// `global: "false"`); `None`: the namespace's or the mesh's default.
    pub global: Option<bool>,
    /// `weft.io/shared: "false"`: this cluster's endpoints are kept from
    /// other clusters.
    pub shared: bool,
    /// `weft.io/affinity`.
    pub affinity: Option<Affinity>,
    /// Scope annotations whose values mean nothing, said where they are
    /// ignored.
    pub scope_problems: Vec<String>,
    /// Set when the Service is its network's east-west gateway (rare:
    /// boxed, so that every other Service stays small).
    pub gateway: Option<Box<GatewayInfo>>,
}

/// A Service labelled `topology.weft.io/network`: the way into that
/// network for proxies on others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayInfo {
    pub network: String,
    /// From `status.loadBalancer.ingress` and `spec.externalIPs`.
    pub addresses: Vec<IpAddr>,
    /// A load balancer known only by name (`ingress[].hostname`).
    pub hostname: String,
    /// The Service port that carries mesh connections.
    pub port: u32,
    /// Who its pods run as; it must prove this identity.
    pub service_account: String,
    /// Why it cannot be used, when it cannot (shown, never sent).
    pub problem: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NamespaceInfo {
    pub cluster_local: bool,
    pub network: Option<String>,
    /// On a cluster's system namespace, `weft.io/draining`: the cluster id
    /// being drained (its own, to count).
    pub draining: Option<String>,
}

/// The kinds of object a cluster is watched for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Service,
    Slice,
    Pod,
    Namespace,
    Node,
    /// MCS exports, from every cluster. Optional like policy (a cluster
    /// without the CRD, or a reader not allowed to list them, has none),
    /// but listed before a cluster counts as synced, so that a credential
    /// rotation never drops an exported service.
    ServiceExport,
    /// Security policy, from the control plane's own cluster only.
    Authorization,
    PeerAuthentication,
    /// Traffic policy, from the control plane's own cluster only.
    VirtualService,
    DestinationRule,
    HttpRoute,
    GrpcRoute,
}

impl Kind {
    pub fn is_policy(self) -> bool {
        POLICY_KINDS.contains(&self)
    }

    pub fn is_traffic(self) -> bool {
        TRAFFIC_KINDS.contains(&self)
    }
}

pub const TRAFFIC_KINDS: [Kind; 4] = [
    Kind::VirtualService,
    Kind::DestinationRule,
    Kind::HttpRoute,
    Kind::GrpcRoute,
];

/// Watched in the local cluster only. Their errors never make the
/// cluster's workloads stale; a kind whose CRD is not installed counts as
/// an empty set.
pub const POLICY_KINDS: [Kind; 6] = [
    Kind::Authorization,
    Kind::PeerAuthentication,
    Kind::VirtualService,
    Kind::DestinationRule,
    Kind::HttpRoute,
    Kind::GrpcRoute,
];

pub const KINDS: [Kind; 6] = [
    Kind::Service,
    Kind::Slice,
    Kind::Pod,
    Kind::Namespace,
    Kind::Node,
    Kind::ServiceExport,
];

#[derive(Clone, Debug, PartialEq)]
pub enum Object {
    Service(ServiceInfo),
    Slice(SliceInfo),
    Pod(PodInfo),
    Namespace(NamespaceInfo),
    Node(Locality),
    Export(ExportInfo),
    Authorization(Arc<AuthorizationInfo>),
    PeerAuthentication(Arc<PeerAuthenticationInfo>),
    Traffic(Arc<TrafficInfo>),
}

#[derive(Debug)]
pub enum Change {
    /// An object appeared or changed (`Some`) or went away (`None`).
    Object(Kind, Key, Option<Object>),
    /// The complete set of one kind, after a (re)list.
    Reset(Kind, Vec<(Key, Object)>),
    /// The watch failed; it retries by itself with backoff.
    Error(Kind, String),
    /// The API server answers again for this kind (a watch that resumes
    /// from its last version may have no event to show for it).
    Recovered(Kind),
    /// The API server stopped answering the liveness probe, though its
    /// watches may still look open.
    Unreachable(String),
    /// It answers the liveness probe again.
    Reachable,
}

impl Change {
    /// The kind a change is about, if it is about one.
    pub fn kind(&self) -> Option<Kind> {
        match self {
            Change::Object(kind, ..)
            | Change::Reset(kind, _)
            | Change::Error(kind, _)
            | Change::Recovered(kind) => Some(*kind),
            Change::Unreachable(_) | Change::Reachable => None,
        }
    }
}

#[derive(Debug)]
pub struct ClusterUpdate {
    pub cluster: String,
    pub generation: u64,
    pub change: Change,
}

pub const ANNOTATION_CLUSTER_LOCAL: &str = "weft.io/cluster-local";
/// Cilium's service scope, per cluster's Service.
pub const ANNOTATION_GLOBAL: &str = "weft.io/global";
pub const ANNOTATION_SHARED: &str = "weft.io/shared";
pub const ANNOTATION_AFFINITY: &str = "weft.io/affinity";
/// A cluster being drained: on remote secrets, the ids drained
/// (comma-separated); on a cluster's own system namespace, its id.
pub const ANNOTATION_DRAINING: &str = "weft.io/draining";
pub const LABEL_NETWORK: &str = "topology.weft.io/network";
/// Which Service port of a gateway carries mesh connections, when it is
/// not the one numbered or named for 15008.
pub const ANNOTATION_GATEWAY_PORT: &str = "weft.io/gateway-port";
/// Who a gateway's pods run as, when not the Service's own name.
pub const ANNOTATION_GATEWAY_SERVICE_ACCOUNT: &str = "weft.io/gateway-service-account";

fn parse_ips<'a>(ips: impl Iterator<Item = &'a String>) -> Vec<IpAddr> {
    ips.filter_map(|ip| ip.parse().ok()).collect()
}

pub fn pod_info(pod: &Pod) -> Option<PodInfo> {
    let spec = pod.spec.as_ref()?;
    // Host-network pods share the node's address; they are not workloads.
    if spec.host_network == Some(true) {
        return None;
    }
    let status = pod.status.as_ref();
    let mut ips: Vec<IpAddr> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|ips| parse_ips(ips.iter().map(|i| &i.ip)))
        .unwrap_or_default();
    if ips.is_empty()
        && let Some(ip) = status
            .and_then(|s| s.pod_ip.as_ref())
            .and_then(|ip| ip.parse().ok())
    {
        ips.push(ip);
    }
    let ready = pod.metadata.deletion_timestamp.is_none()
        && status
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let labels = pod.labels();
    let annotations = pod.annotations();
    let label = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| labels.get(*k).cloned())
            .unwrap_or_default()
    };
    Some(PodInfo {
        ips,
        service_account: spec
            .service_account_name
            .clone()
            .unwrap_or_else(|| "default".into()),
        node: spec.node_name.clone().unwrap_or_default(),
        ready,
        sidecar: annotations.contains_key("sidecar.weft.io/status")
            || spec.containers.iter().any(|c| c.name == "weft-proxy"),
        canonical_name: label(&["app.kubernetes.io/name", "app"]),
        canonical_revision: label(&["app.kubernetes.io/version", "version"]),
        labels: labels.clone(),
    })
}

pub fn slice_info(slice: &EndpointSlice) -> Option<SliceInfo> {
    let service = slice.labels().get("kubernetes.io/service-name")?.clone();
    let endpoints = slice
        .endpoints
        .iter()
        .map(|e| EndpointInfo {
            pod: e
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| r.name.clone()),
            addresses: parse_ips(e.addresses.iter()),
            ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
        })
        .collect();
    let ports = slice
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some((
                p.name.clone().unwrap_or_default(),
                u32::try_from(p.port?).ok()?,
            ))
        })
        .collect();
    Some(SliceInfo {
        service,
        endpoints,
        ports,
    })
}

pub fn app_protocol(app_protocol: Option<&str>, name: &str) -> AppProtocol {
    let by = |p: &str| match p.to_ascii_lowercase().as_str() {
        "http" | "http1" => Some(AppProtocol::Http),
        "http2" | "h2c" | "kubernetes.io/h2c" => Some(AppProtocol::Http2),
        "grpc" => Some(AppProtocol::Grpc),
        "tcp" => Some(AppProtocol::Tcp),
        _ => None,
    };
    app_protocol
        .and_then(by)
        .or_else(|| by(name.split('-').next().unwrap_or("")))
        .unwrap_or(AppProtocol::Unspecified)
}

pub fn service_info(service: &Service) -> Option<ServiceInfo> {
    let spec = service.spec.as_ref()?;
    let vip = spec
        .cluster_ip
        .as_deref()
        .filter(|ip| *ip != "None")
        .and_then(|ip| ip.parse().ok());
    let ports: Vec<ServicePortInfo> = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let name = p.name.clone().unwrap_or_default();
            let target_port = match &p.target_port {
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(n)) => *n,
                _ => 0,
            };
            Some(ServicePortInfo {
                port: u32::try_from(p.port).ok()?,
                protocol: app_protocol(p.app_protocol.as_deref(), &name),
                name,
                target_port: u32::try_from(target_port).unwrap_or(0),
            })
        })
        .collect();
    let gateway = gateway_info(service, spec, &ports).map(Box::new);
    let annotations = service.annotations();
    let cluster_local = annotations
        .get(ANNOTATION_CLUSTER_LOCAL)
        .is_some_and(|v| v == "true");
    let mut scope_problems = Vec::new();
    let mut flag = |key: &str| -> Option<bool> {
        match annotations.get(key).map(String::as_str) {
            None => None,
            Some("true") => Some(true),
            Some("false") => Some(false),
            Some(other) => {
                scope_problems.push(format!(
                    "{key}: {other:?} is neither \"true\" nor \"false\""
                ));
                None
            }
        }
    };
    let global = if cluster_local {
        Some(false)
    } else {
        flag(ANNOTATION_GLOBAL)
    };
    let shared = flag(ANNOTATION_SHARED).unwrap_or(true);
    let affinity = match annotations.get(ANNOTATION_AFFINITY).map(String::as_str) {
        None => None,
        Some("local") => Some(Affinity::Local),
        Some("remote") => Some(Affinity::Remote),
        Some("none") => Some(Affinity::None),
        Some(other) => {
            scope_problems.push(format!(
                "{ANNOTATION_AFFINITY}: {other:?} is not local, remote or none"
            ));
            None
        }
    };
    Some(ServiceInfo {
        vip,
        ports,
        cluster_local,
        global,
        shared,
        affinity,
        scope_problems,
        gateway,
    })
}

/// The gateway a Service labelled with its network stands for. One
/// without a reachable address yet (its load balancer not provisioned)
/// still counts, so that `weftctl` can say what it waits for.
fn gateway_info(
    service: &Service,
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    ports: &[ServicePortInfo],
) -> Option<GatewayInfo> {
    let network = service.labels().get(LABEL_NETWORK)?.clone();
    let ingress = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    let mut addresses = parse_ips(ingress.into_iter().flatten().filter_map(|i| i.ip.as_ref()));
    addresses.extend(parse_ips(spec.external_ips.iter().flatten()));
    let hostname = ingress
        .into_iter()
        .flatten()
        .find_map(|i| i.hostname.clone())
        .unwrap_or_default();
    let annotations = service.annotations();
    let named = ports
        .iter()
        .find(|p| p.port == 15008 || p.name == "mesh" || p.name == "tls-hbone")
        .or(ports.first())
        .map(|p| p.port);
    let (port, problem) = match annotations.get(ANNOTATION_GATEWAY_PORT) {
        Some(text) => match text.parse::<u16>() {
            Ok(port) if port > 0 => (u32::from(port), None),
            _ => (
                0,
                Some(format!(
                    "{ANNOTATION_GATEWAY_PORT}: {text:?} is not a port number"
                )),
            ),
        },
        None => match named {
            Some(port) => (port, None),
            None => (0, Some("the Service has no port".to_string())),
        },
    };
    Some(GatewayInfo {
        problem,
        network,
        addresses,
        hostname,
        port,
        service_account: annotations
            .get(ANNOTATION_GATEWAY_SERVICE_ACCOUNT)
            .cloned()
            .unwrap_or_else(|| service.name_any()),
    })
}

pub fn node_locality(node: &Node) -> Locality {
    let labels = node.labels();
    let get = |k: &str| labels.get(k).cloned().unwrap_or_default();
    Locality {
        region: get("topology.kubernetes.io/region"),
        zone: get("topology.kubernetes.io/zone"),
        subzone: get("topology.weft.io/subzone"),
    }
}

pub fn namespace_info(namespace: &Namespace) -> NamespaceInfo {
    NamespaceInfo {
        cluster_local: namespace
            .annotations()
            .get(ANNOTATION_CLUSTER_LOCAL)
            .is_some_and(|v| v == "true"),
        network: namespace.labels().get(LABEL_NETWORK).cloned(),
        draining: namespace.annotations().get(ANNOTATION_DRAINING).cloned(),
    }
}

fn key_of<K: Resource>(object: &K) -> Key {
    (
        object.meta().namespace.clone().unwrap_or_default(),
        object.meta().name.clone().unwrap_or_default(),
    )
}

/// Starts the six watchers of one cluster. They run until the returned
/// handles are aborted, retrying with backoff on their own.
pub fn spawn_watchers(
    client: Client,
    cluster: String,
    generation: u64,
    updates: mpsc::UnboundedSender<ClusterUpdate>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let (restart, restarts) = tokio::sync::watch::channel(0u64);
    let ctx = WatchContext {
        cluster,
        generation,
        updates,
        restarts: Some(restarts),
        forbidden_is_empty: false,
    };
    // A remote secret made before weft read exports may not allow
    // listing them: that cluster then exports nothing, and says why.
    let exports = WatchContext {
        forbidden_is_empty: true,
        ..ctx.clone()
    };
    vec![
        tokio::spawn(liveness(client.clone(), ctx.clone(), restart)),
        tokio::spawn(watch::<Service, _>(
            Api::all(client.clone()),
            Kind::Service,
            ctx.clone(),
            |s| service_info(s).map(Object::Service),
        )),
        tokio::spawn(watch::<EndpointSlice, _>(
            Api::all(client.clone()),
            Kind::Slice,
            ctx.clone(),
            |s| slice_info(s).map(Object::Slice),
        )),
        tokio::spawn(watch::<Pod, _>(
            Api::all(client.clone()),
            Kind::Pod,
            ctx.clone(),
            |p| pod_info(p).map(Object::Pod),
        )),
        tokio::spawn(watch::<Namespace, _>(
            Api::all(client.clone()),
            Kind::Namespace,
            ctx.clone(),
            |n| Some(Object::Namespace(namespace_info(n))),
        )),
        tokio::spawn(watch::<Node, _>(
            Api::all(client.clone()),
            Kind::Node,
            ctx,
            |n| Some(Object::Node(node_locality(n))),
        )),
        tokio::spawn(watch(
            Api::<DynamicObject>::all_with(client, &mcs::service_exports()),
            Kind::ServiceExport,
            exports,
            |o| {
                Some(Object::Export(mcs::read_export(
                    &serde_json::to_value(o).unwrap_or_default(),
                )))
            },
        )),
    ]
}

/// Starts the security and traffic policy watchers of the control
/// plane's own cluster, on its generation-0 client like the other local
/// watchers.
pub fn spawn_policy_watchers(
    client: Client,
    cluster: String,
    domain_suffix: String,
    updates: mpsc::UnboundedSender<ClusterUpdate>,
) -> Vec<tokio::task::JoinHandle<()>> {
    // Policy watches restart only on their own backoff: the liveness
    // probe's restarts belong to the cluster's own watchers.
    let ctx = WatchContext {
        cluster,
        generation: 0,
        updates,
        restarts: None,
        forbidden_is_empty: false,
    };
    let dynamic = |resource: &kube::api::ApiResource| {
        Api::<DynamicObject>::all_with(client.clone(), resource)
    };
    let json = |object: &DynamicObject| serde_json::to_value(object).unwrap_or_default();
    let mut handles = vec![
        tokio::spawn(watch(
            dynamic(&security::authorization_policies()),
            Kind::Authorization,
            ctx.clone(),
            move |o| {
                Some(Object::Authorization(Arc::new(authorization::read(&json(
                    o,
                )))))
            },
        )),
        tokio::spawn(watch(
            dynamic(&security::peer_authentications()),
            Kind::PeerAuthentication,
            ctx.clone(),
            move |o| {
                Some(Object::PeerAuthentication(Arc::new(
                    peer_authentication::read(&json(o)),
                )))
            },
        )),
    ];
    let traffic = [
        (Kind::VirtualService, traffic::virtual_services()),
        (Kind::DestinationRule, traffic::destination_rules()),
        (Kind::HttpRoute, traffic::http_routes()),
        (Kind::GrpcRoute, traffic::grpc_routes()),
    ];
    for (kind, resource) in traffic {
        let suffix = domain_suffix.clone();
        handles.push(tokio::spawn(watch(
            dynamic(&resource),
            kind,
            ctx.clone(),
            move |o| {
                let info = read_traffic(kind, &json(o), &suffix);
                // Routes for Gateways only are another controller's.
                (!info.not_for_mesh).then(|| Object::Traffic(Arc::new(info)))
            },
        )));
    }
    handles
}

/// The API resource of a policy kind (security or traffic); none for
/// the core kinds.
pub fn policy_resource(kind: Kind) -> Option<kube::api::ApiResource> {
    Some(match kind {
        Kind::Authorization => security::authorization_policies(),
        Kind::PeerAuthentication => security::peer_authentications(),
        Kind::VirtualService => traffic::virtual_services(),
        Kind::DestinationRule => traffic::destination_rules(),
        Kind::HttpRoute => traffic::http_routes(),
        Kind::GrpcRoute => traffic::grpc_routes(),
        Kind::Service
        | Kind::Slice
        | Kind::Pod
        | Kind::Namespace
        | Kind::Node
        | Kind::ServiceExport => return None,
    })
}

/// Reads a traffic policy object of `kind`.
pub fn read_traffic(kind: Kind, object: &serde_json::Value, domain_suffix: &str) -> TrafficInfo {
    use traffic::gateway_route::{self, Flavor};
    match kind {
        Kind::VirtualService => traffic::virtual_service::read(object, domain_suffix),
        Kind::DestinationRule => traffic::destination_rule::read(object, domain_suffix),
        Kind::GrpcRoute => gateway_route::read(object, Flavor::Grpc, domain_suffix),
        _ => gateway_route::read(object, Flavor::Http, domain_suffix),
    }
}

/// Whether a watch failed because the resource type is not served (its
/// CRD is not installed), or, where `forbidden_is_empty`, may not be
/// read: then there is none of it.
fn type_absent(err: &watcher::Error, forbidden_is_empty: bool) -> bool {
    match err {
        watcher::Error::InitialListFailed(err) | watcher::Error::WatchStartFailed(err) => {
            status_absent(err, forbidden_is_empty)
        }
        _ => false,
    }
}

/// Whether a request failed because the resource type is absent, in the
/// sense of `type_absent`.
fn status_absent(err: &kube::Error, forbidden_is_empty: bool) -> bool {
    matches!(err, kube::Error::Api(status)
        if status.code == 404 || (forbidden_is_empty && status.code == 403))
}

/// How often each API server is asked for its version, how long it may
/// take, and how many missed answers in a row make it unreachable: a
/// server that goes silent without closing its connections (a frozen
/// process, a blackholed network) is marked stale within
/// `LIVENESS_MISSES * (LIVENESS_EVERY + LIVENESS_TIMEOUT)`, 12 s. Its
/// watches would otherwise wait for their own timeout, minutes later.
pub const LIVENESS_EVERY: std::time::Duration = std::time::Duration::from_secs(3);
pub const LIVENESS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);
pub const LIVENESS_MISSES: u32 = 2;

/// Probes the API server; says when it stops and starts answering. When it
/// answers again the watches start over (a relist), since their
/// connections may have died without a word while it was silent.
async fn liveness(client: Client, ctx: WatchContext, restart: tokio::sync::watch::Sender<u64>) {
    let mut misses = 0u32;
    loop {
        tokio::time::sleep(LIVENESS_EVERY).await;
        let answered = tokio::time::timeout(LIVENESS_TIMEOUT, client.apiserver_version()).await;
        let sent = match answered {
            Ok(Ok(_)) => {
                let was_unreachable = misses >= LIVENESS_MISSES;
                misses = 0;
                if was_unreachable {
                    tracing::info!(cluster = %ctx.cluster, "the API server answers again; watching anew");
                    restart.send_modify(|epoch| *epoch += 1);
                    ctx.send(Change::Reachable)
                } else {
                    true
                }
            }
            Ok(Err(_)) | Err(_) => {
                misses += 1;
                if misses == LIVENESS_MISSES {
                    let why = match answered {
                        Ok(Err(err)) => format!("the API server refused the liveness probe: {err}"),
                        _ => format!(
                            "the API server did not answer within {} s, {LIVENESS_MISSES} times in a row",
                            LIVENESS_TIMEOUT.as_secs()
                        ),
                    };
                    tracing::warn!(cluster = %ctx.cluster, "{why}; serving its last known workloads as stale");
                    ctx.send(Change::Unreachable(why))
                } else {
                    true
                }
            }
        };
        if !sent {
            return;
        }
    }
}

#[derive(Clone)]
struct WatchContext {
    cluster: String,
    generation: u64,
    updates: mpsc::UnboundedSender<ClusterUpdate>,
    /// Changes when the watches must start over; none for watches that
    /// start over only on their own backoff.
    restarts: Option<tokio::sync::watch::Receiver<u64>>,
    /// A 403 means none of this kind (said once), not a failing watch.
    forbidden_is_empty: bool,
}

impl WatchContext {
    fn send(&self, change: Change) -> bool {
        self.updates
            .send(ClusterUpdate {
                cluster: self.cluster.clone(),
                generation: self.generation,
                change,
            })
            .is_ok()
    }
}

/// While a watch is failing, how often to check whether the API server
/// answers again.
const PROBE_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

async fn watch<K, F>(api: Api<K>, kind: Kind, ctx: WatchContext, convert: F)
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    F: Fn(&K) -> Option<Object>,
{
    let start = || {
        watcher(api.clone(), watcher::Config::default())
            .default_backoff()
            .boxed()
    };
    let mut stream = start();
    let mut restarts = ctx.restarts.clone();
    let mut relist: Option<BTreeMap<Key, Object>> = None;
    let mut failing = false;
    let mut absent = false;
    let mut probe = tokio::time::interval(PROBE_EVERY);
    loop {
        let event = tokio::select! {
            event = stream.next() => match event {
                Some(event) => event,
                None => return,
            },
            changed = async {
                match restarts.as_mut() {
                    Some(restarts) => restarts.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                if changed.is_err() {
                    return;
                }
                stream = start();
                relist = None;
                continue;
            },
            _ = probe.tick(), if failing => {
                match api.list(&kube::api::ListParams::default().limit(1)).await {
                    Ok(_) => {
                        failing = false;
                        if !ctx.send(Change::Recovered(kind)) {
                            return;
                        }
                        continue;
                    }
                    // The server answers, and the kind is still not served
                    // (or may not be read): handled below as the watcher's
                    // own list would be, since while this kind is absent
                    // the watcher's retries say nothing new.
                    Err(err) if status_absent(&err, ctx.forbidden_is_empty) => {
                        Err(watcher::Error::InitialListFailed(err))
                    }
                    Err(_) => continue,
                }
            }
        };
        // `Init` comes before the list it announces (kube's watcher says
        // it even when that list then fails): only what a list or a
        // watch brought shows that the kind is served and the watch works.
        if matches!(&event, Ok(e) if !matches!(e, watcher::Event::Init)) {
            failing = false;
            absent = false;
        }
        let sent = match event {
            Ok(watcher::Event::Init) => {
                relist = Some(BTreeMap::new());
                true
            }
            Ok(watcher::Event::InitApply(object)) => {
                if let (Some(set), Some(converted)) = (relist.as_mut(), convert(&object)) {
                    set.insert(key_of(&object), converted);
                }
                true
            }
            Ok(watcher::Event::InitDone) => {
                let set = relist.take().unwrap_or_default();
                ctx.send(Change::Reset(kind, set.into_iter().collect()))
            }
            Ok(watcher::Event::Apply(object)) => {
                ctx.send(Change::Object(kind, key_of(&object), convert(&object)))
            }
            Ok(watcher::Event::Delete(object)) => {
                ctx.send(Change::Object(kind, key_of(&object), None))
            }
            // Said and applied once: each retry sending the empty set
            // again was a model update a second per absent kind, each one
            // holding back the debounced push of real changes.
            // A connection error while absent (the server restarting)
            // left an error that must be cleared: applied again then.
            Err(err) if type_absent(&err, ctx.forbidden_is_empty) => {
                if absent && !failing {
                    true
                } else {
                    if !absent {
                        tracing::warn!(cluster = %ctx.cluster, ?kind, %err, "this kind is not served (CRD not installed?) or may not be read (a remote secret from an older weftctl?): taking it as empty");
                    }
                    absent = true;
                    failing = false;
                    ctx.send(Change::Reset(kind, Vec::new()))
                }
            }
            Err(err) => {
                tracing::debug!(cluster = %ctx.cluster, ?kind, %err, "watch failed; retrying");
                failing = true;
                ctx.send(Change::Error(kind, err.to_string()))
            }
        };
        if !sent {
            // The model is gone: the control plane is shutting down.
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A kind whose CRD is not installed is taken as empty once: the
    /// watcher's retries (each announced by an `Init` before its list
    /// fails) neither say it again nor send the model the same empty set.
    #[tokio::test]
    async fn an_absent_kind_is_said_and_applied_once_not_at_every_retry() {
        let server = weft_apiserver::ApiServer::start(Default::default())
            .await
            .expect("an API server");
        let client = weft_apiserver::client_for(server.kubeconfig())
            .await
            .expect("a client");
        let (updates, mut received) = mpsc::unbounded_channel();
        let handles = spawn_policy_watchers(client, "c1".into(), "cluster.local".into(), updates);
        // kube's watcher retries after 0.8 s, then backs off: 3 s sees
        // two or three attempts for every kind.
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        for handle in handles {
            handle.abort();
        }
        let mut resets: BTreeMap<String, usize> = BTreeMap::new();
        while let Ok(update) = received.try_recv() {
            match update.change {
                Change::Reset(kind, objects) => {
                    assert!(objects.is_empty(), "{kind:?}: nothing is served");
                    *resets.entry(format!("{kind:?}")).or_default() += 1;
                }
                Change::Error(kind, err) => panic!("{kind:?} failed instead: {err}"),
                _ => {}
            }
        }
        assert_eq!(resets.len(), 6, "every policy kind: {resets:?}");
        assert!(resets.values().all(|n| *n == 1), "once each: {resets:?}");
    }

    /// A kind taken as empty whose server goes away and comes back is
    /// not left failing (its cluster stale) by the connection errors of
    /// the time between: the server answering "not served" again
    /// applies it as empty again.
    #[tokio::test]
    async fn an_absent_kind_is_not_left_failing_by_a_restart_of_its_server() {
        // Restarted on its directory, it is the same cluster, same CA.
        let dir = tempfile::tempdir().expect("a directory");
        let config = || weft_apiserver::ApiServerConfig {
            dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        };
        let server = weft_apiserver::ApiServer::start(config())
            .await
            .expect("an API server");
        let addr = server.addr();
        let client = weft_apiserver::client_for(server.kubeconfig())
            .await
            .expect("a client");
        let (updates, mut received) = mpsc::unbounded_channel();
        let handles = spawn_policy_watchers(client, "c1".into(), "cluster.local".into(), updates);
        // The last change of each kind: what the model holds for it.
        let mut last: BTreeMap<String, &'static str> = BTreeMap::new();
        async fn wait_for(
            received: &mut mpsc::UnboundedReceiver<ClusterUpdate>,
            last: &mut BTreeMap<String, &'static str>,
            wanted: &str,
        ) {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
            while last.len() < 6 || last.values().any(|change| *change != wanted) {
                let Ok(Some(update)) = tokio::time::timeout_at(deadline, received.recv()).await
                else {
                    panic!("every kind's last change is {wanted}: {last:?}");
                };
                let change = match update.change {
                    Change::Reset(..) => "reset",
                    Change::Error(..) => "error",
                    Change::Recovered(..) => "recovered",
                    _ => continue,
                };
                if let Some(kind) = update.change.kind() {
                    last.insert(format!("{kind:?}"), change);
                }
            }
        }
        wait_for(&mut received, &mut last, "reset").await;
        // Down long enough for every kind's watcher to retry and fail to
        // connect (its backoff after one 404 is under 2 s).
        server.stop().await;
        wait_for(&mut received, &mut last, "error").await;
        let _back =
            weft_apiserver::ApiServer::start(weft_apiserver::ApiServerConfig { addr, ..config() })
                .await
                .expect("the API server again");
        wait_for(&mut received, &mut last, "reset").await;
        for handle in handles {
            handle.abort();
        }
    }

    fn failed(code: u16) -> watcher::Error {
        let status: kube::core::Status = serde_json::from_value(
            serde_json::json!({"code": code, "message": "m", "reason": "r"}),
        )
        .expect("a Status");
        watcher::Error::InitialListFailed(kube::Error::Api(Box::new(status)))
    }

    /// A kind not installed is none of it; one not allowed is none of it
    /// only where the watch says so (exports from a remote whose secret
    /// predates them), never for policy, where "none" would drop denials.
    #[test]
    fn absent_and_forbidden_kinds_are_empty_only_where_allowed() {
        assert!(type_absent(&failed(404), false));
        assert!(!type_absent(&failed(403), false));
        assert!(type_absent(&failed(403), true));
        assert!(!type_absent(&failed(500), true));
    }
}
