//! The merged mesh model: every cluster's compact objects, and from them the
//! `Service` and `Workload` resources proxies receive.
//!
//! Changes mark what they affect as dirty; a flush (after the debounce)
//! rebuilds only those resources, encodes them, and keeps the ones whose bytes
//! really changed, all under one new version. The tables remember, per
//! resource, the version it last changed at, and a log ordered by version,
//! so "everything since version v" is a range scan. That keeps each proxy's
//! state down to one number, whatever the size of the mesh.

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use bytes::Bytes;
use prost::Message;
use weft_xds_proto::type_url;

mod cluster_data;
mod clusterset;
mod network;
mod policy;
mod table;
pub mod traffic;
mod translate;
mod vips;

use cluster_data::{ClusterData, Touched};
pub use clusterset::{ExportStatus, ServiceImportView};
pub use network::{GatewayView, health_name};
pub use policy::PolicyStatus;
pub use table::{Entry, Table, resource_version};
pub use translate::ip_bytes;
use vips::VipPool;

use crate::cluster::{Change, ClusterUpdate, Key, Kind};

#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub local_cluster: String,
    pub network: String,
    pub trust_domain: String,
    pub domain_suffix: String,
    pub system_namespace: String,
    /// Security policy here without a selector is mesh-wide.
    pub root_namespace: String,
    /// "ns/name" or "ns/*": services never merged across clusters.
    pub cluster_local: Vec<String>,
    /// Whether a Service without a scope annotation is merged across
    /// clusters (`--default-scope global`).
    pub default_global: bool,
    /// `--mcs-cluster-local`: `cluster.local` names never cross clusters.
    pub mcs_cluster_local: bool,
}

pub struct ClusterState {
    data: ClusterData,
    generation: u64,
    /// A replacement client's data, filling up until it has synced.
    staging: Option<(u64, ClusterData)>,
    errors: BTreeMap<Kind, String>,
    /// Why the API server is taken for unreachable, while it is.
    unreachable: Option<String>,
    stale: bool,
    added: Instant,
    last_synced: Option<Instant>,
}

/// What the debug endpoint and metrics say about a cluster.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ClusterStatus {
    pub id: String,
    pub local: bool,
    pub network: String,
    pub draining: bool,
    pub synced: bool,
    pub stale: bool,
    pub generation: u64,
    pub rotating: bool,
    pub errors: BTreeMap<String, String>,
    pub services: usize,
    pub pods: usize,
    pub endpoint_slices: usize,
    pub seconds_since_added: u64,
}

pub struct Model {
    config: ModelConfig,
    clusters: BTreeMap<String, ClusterState>,
    pub services: Table,
    pub workloads: Table,
    pub authorizations: Table,
    pub routes: Table,
    pub destinations: Table,
    pub gateways: Table,
    /// (cluster, service) of every Service labelled as a network's
    /// gateway.
    gateway_services: std::collections::BTreeSet<(String, Key)>,
    /// What each gateway's probe last concluded, by gateway name.
    gateway_health: BTreeMap<String, weft_xds_proto::mesh::GatewayHealth>,
    /// What each gateway's last probe saw, for operators.
    gateway_probes: BTreeMap<String, String>,
    gateways_dirty: bool,
    /// Clusters the remote secrets here mark as draining.
    drained_by_secrets: std::collections::BTreeSet<String>,
    /// VIPs of services with no Service in this cluster.
    allocated_vips: VipPool,
    /// Clusterset VIPs of exported services (MCS).
    clusterset_vips: VipPool,
    version: u64,
    dirty_pods: HashSet<(String, Key)>,
    dirty_services: HashSet<Key>,
    dirty_authorizations: HashSet<Key>,
    dirty_traffic: HashSet<(Kind, Key)>,
    /// Why a policy kind's watch fails, while it does: the policy last
    /// listed stays in force meanwhile.
    policy_errors: BTreeMap<Kind, String>,
    /// The remote-cluster Secrets have been listed once, so every remote
    /// that exists is known: before that, "all remotes synced" says nothing.
    remotes_listed: bool,
}

impl Model {
    pub fn new(config: ModelConfig) -> Self {
        Model {
            config,
            clusters: BTreeMap::new(),
            services: Table::new(type_url::SERVICE),
            workloads: Table::new(type_url::WORKLOAD),
            authorizations: Table::new(type_url::AUTHORIZATION),
            routes: Table::new(type_url::ROUTE_SET),
            destinations: Table::new(type_url::DESTINATION_POLICY),
            gateways: Table::new(type_url::NETWORK_GATEWAY),
            gateway_services: Default::default(),
            gateway_health: BTreeMap::new(),
            gateway_probes: BTreeMap::new(),
            gateways_dirty: false,
            drained_by_secrets: Default::default(),
            allocated_vips: VipPool::new([240, 240]),
            clusterset_vips: VipPool::new([240, 241]),
            version: 0,
            dirty_pods: HashSet::new(),
            dirty_services: HashSet::new(),
            dirty_authorizations: HashSet::new(),
            dirty_traffic: HashSet::new(),
            policy_errors: BTreeMap::new(),
            remotes_listed: false,
        }
    }

    /// No change is waiting for the next flush: the tables hold everything
    /// the clusters' data says.
    pub fn is_clean(&self) -> bool {
        !self.has_pending()
    }

    /// Called once the remote-cluster Secrets have been listed.
    pub fn set_remotes_listed(&mut self) {
        self.remotes_listed = true;
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Registers a cluster's client generation. For a cluster already known
    /// this is a rotation: the new client fills a staging copy, swapped in
    /// only once it has synced, so no workload disappears meanwhile.
    pub fn add_cluster(&mut self, id: &str, generation: u64) {
        match self.clusters.get_mut(id) {
            Some(state) => state.staging = Some((generation, ClusterData::default())),
            None => {
                self.clusters.insert(
                    id.to_string(),
                    ClusterState {
                        data: ClusterData::default(),
                        generation,
                        staging: None,
                        errors: BTreeMap::new(),
                        unreachable: None,
                        stale: false,
                        added: Instant::now(),
                        last_synced: None,
                    },
                );
            }
        }
    }

    /// Forgets a cluster and everything it contributed.
    pub fn remove_cluster(&mut self, id: &str) {
        if let Some(state) = self.clusters.remove(id) {
            self.touch_all(id, &state.data);
        }
    }

    fn touch_all(&mut self, id: &str, data: &ClusterData) {
        for key in data.pods.keys() {
            self.dirty_pods.insert((id.to_string(), key.clone()));
        }
        self.dirty_services.extend(data.services.keys().cloned());
    }

    /// Whether the active client of `id` has `generation` (for the secret
    /// controller, to know when a rotation has been swapped in).
    pub fn active_generation(&self, id: &str) -> Option<u64> {
        self.clusters.get(id).map(|c| c.generation)
    }

    pub fn apply(&mut self, update: ClusterUpdate) {
        if update.change.kind().is_some_and(Kind::is_policy) {
            return self.apply_policy(update);
        }
        let Some(state) = self.clusters.get_mut(&update.cluster) else {
            return;
        };
        let staging = matches!(&state.staging, Some((g, _)) if *g == update.generation);
        if !staging && update.generation != state.generation {
            return; // A late event from a replaced client.
        }
        let mut touched = Touched::default();
        let mut stale_changed = false;
        {
            let data = if staging {
                &mut state.staging.as_mut().expect("checked above").1
            } else {
                &mut state.data
            };
            match update.change {
                Change::Object(kind, key, object) => {
                    data.apply(kind, key, object, &mut touched);
                    if !staging {
                        state.errors.remove(&kind);
                    }
                }
                Change::Reset(kind, items) => {
                    data.reset(kind, items, &mut touched);
                    if !staging {
                        state.errors.remove(&kind);
                    }
                }
                Change::Error(kind, message) => {
                    if !staging {
                        state.errors.insert(kind, message);
                    }
                }
                Change::Recovered(kind) => {
                    if !staging {
                        state.errors.remove(&kind);
                    }
                }
                Change::Unreachable(why) => {
                    if !staging {
                        state.unreachable = Some(why);
                    }
                }
                Change::Reachable => {
                    if !staging {
                        state.unreachable = None;
                    }
                }
            }
        }
        if !staging {
            let stale = !state.errors.is_empty() || state.unreachable.is_some();
            if stale != state.stale {
                state.stale = stale;
                stale_changed = true;
            }
            if state.data.fully_synced() && !stale {
                state.last_synced = Some(Instant::now());
            }
        }
        let cluster = update.cluster.clone();
        if staging {
            let ready = state
                .staging
                .as_ref()
                .is_some_and(|(_, data)| data.fully_synced());
            if ready && let Some((generation, data)) = state.staging.take() {
                tracing::info!(cluster = %cluster, generation, "new credentials synced; switching over");
                let old = std::mem::replace(&mut state.data, data);
                state.generation = generation;
                state.errors.clear();
                state.unreachable = None;
                state.stale = false;
                state.last_synced = Some(Instant::now());
                // Everything either client knew is recomputed; what is
                // unchanged produces no push.
                let new_keys: Vec<Key> = state.data.pods.keys().cloned().collect();
                let new_services: Vec<Key> = state.data.services.keys().cloned().collect();
                self.touch_all(&cluster, &old);
                for key in new_keys {
                    self.dirty_pods.insert((cluster.clone(), key));
                }
                self.dirty_services.extend(new_services);
            }
            return;
        }
        if touched.all_pods {
            // A network label changed: which gateways are sent may too.
            self.gateways_dirty = true;
        }
        if stale_changed || touched.all_pods {
            let keys: Vec<Key> = state.data.pods.keys().cloned().collect();
            for key in keys {
                self.dirty_pods.insert((cluster.clone(), key));
            }
        }
        for key in touched.pods {
            self.dirty_pods.insert((cluster.clone(), key));
        }
        // A Service's scope in one cluster decides which clusters'
        // endpoints the others' workloads are bound to.
        let elsewhere: Vec<(String, Key)> = self
            .clusters
            .iter()
            .filter(|(id, _)| **id != cluster)
            .flat_map(|(id, state)| {
                touched
                    .services
                    .iter()
                    .flat_map(|key| state.data.pods_of_service(key))
                    .map(|pod| (id.clone(), pod))
                    .collect::<Vec<_>>()
            })
            .collect();
        self.dirty_pods.extend(elsewhere);
        self.dirty_services.extend(touched.services);
    }

    /// The clusters the remote secrets here mark as draining; their
    /// workloads are rebuilt when that changes.
    pub fn set_drained_by_secrets(&mut self, ids: std::collections::BTreeSet<String>) {
        if ids == self.drained_by_secrets {
            return;
        }
        let changed: Vec<String> = ids
            .symmetric_difference(&self.drained_by_secrets)
            .cloned()
            .collect();
        self.drained_by_secrets = ids;
        for id in changed {
            if let Some(state) = self.clusters.get(&id) {
                let pods: Vec<Key> = state.data.pods.keys().cloned().collect();
                self.dirty_pods
                    .extend(pods.into_iter().map(|pod| (id.clone(), pod)));
            }
        }
    }

    /// A change to security policy, from the local cluster's watchers.
    fn apply_policy(&mut self, update: ClusterUpdate) {
        if update.cluster != self.config.local_cluster {
            return;
        }
        let Some(state) = self.clusters.get_mut(&update.cluster) else {
            return;
        };
        let mut touched = Touched::default();
        match update.change {
            Change::Object(kind, key, object) => {
                state.data.apply(kind, key, object, &mut touched);
                self.policy_errors.remove(&kind);
            }
            Change::Reset(kind, items) => {
                state.data.reset(kind, items, &mut touched);
                self.policy_errors.remove(&kind);
            }
            Change::Error(kind, message) => {
                tracing::warn!(?kind, %message, "watching security policy failed; the policy last listed stays in force");
                self.policy_errors.insert(kind, message);
            }
            Change::Recovered(kind) => {
                self.policy_errors.remove(&kind);
            }
            _ => {}
        }
        for (kind, key) in touched.policies {
            self.touch_policy(kind, key);
        }
    }

    /// Why each policy kind's watch fails, while it does.
    pub fn policy_errors(&self) -> &BTreeMap<Kind, String> {
        &self.policy_errors
    }

    pub fn has_pending(&self) -> bool {
        !self.dirty_pods.is_empty()
            || !self.dirty_services.is_empty()
            || !self.dirty_authorizations.is_empty()
            || !self.dirty_traffic.is_empty()
            || self.gateways_dirty
    }

    /// Rebuilds what changed. Returns the new version if any resource did.
    pub fn flush(&mut self) -> Option<u64> {
        if !self.has_pending() {
            return None;
        }
        let version = self.version + 1;
        let mut changed = false;
        let pods: Vec<(String, Key)> = self.dirty_pods.drain().collect();
        for (cluster, key) in pods {
            let uid = format!("{cluster}/{}/{}", key.0, key.1);
            let body = self
                .build_workload(&cluster, &key)
                .map(|w| Bytes::from(w.encode_to_vec()));
            changed |= self.workloads.upsert(&uid, body, version);
        }
        let services: Vec<Key> = self.dirty_services.drain().collect();
        for key in services {
            self.note_gateway(&key);
            let name = format!("{}/{}", key.0, self.hostname(&key));
            let allocated = self.allocated_vip(&key);
            let body = self
                .build_service(&key, allocated)
                .map(|s| Bytes::from(s.encode_to_vec()));
            changed |= self.services.upsert(&name, body, version);
            let name = format!("{}/{}", key.0, Self::clusterset_hostname(&key));
            let vip = self.clusterset_vip(&key);
            let body = self
                .build_clusterset_service(&key, vip)
                .map(|s| Bytes::from(s.encode_to_vec()));
            changed |= self.services.upsert(&name, body, version);
        }
        let authorizations: Vec<Key> = self.dirty_authorizations.drain().collect();
        for key in authorizations {
            let name = format!("{}/{}", key.0, key.1);
            let body = self
                .build_authorization(&key)
                .map(|a| Bytes::from(a.encode_to_vec()));
            changed |= self.authorizations.upsert(&name, body, version);
        }
        changed |= self.flush_traffic(version);
        changed |= self.flush_gateways(version);
        changed.then(|| {
            self.version = version;
            version
        })
    }

    /// The local cluster has synced (its security policy too, so that no
    /// proxy is served a mesh without it), the remote-cluster Secrets have
    /// been listed, and every remote has synced or had `remote_timeout` to
    /// do so: one dead remote never holds readiness.
    pub fn ready(&self, remote_timeout: Duration) -> bool {
        self.remotes_listed
            && self.clusters.iter().all(|(id, state)| {
                let synced = state.last_synced.is_some();
                if *id == self.config.local_cluster {
                    synced && state.data.policy_synced()
                } else {
                    synced || state.added.elapsed() >= remote_timeout
                }
            })
            && self.clusters.contains_key(&self.config.local_cluster)
    }

    /// Every cluster known has synced at least once and the remote
    /// secrets have been listed: what the model lacks now is gone, not
    /// yet to come (a dead remote's last known objects still count).
    pub fn all_synced(&self) -> bool {
        self.remotes_listed && self.clusters.values().all(|c| c.last_synced.is_some())
    }

    pub fn cluster_status(&self) -> Vec<ClusterStatus> {
        self.clusters
            .iter()
            .map(|(id, state)| ClusterStatus {
                id: id.clone(),
                local: *id == self.config.local_cluster,
                network: self.network_of(id),
                draining: self.draining(id),
                synced: state.last_synced.is_some(),
                stale: state.stale,
                generation: state.generation,
                rotating: state.staging.is_some(),
                errors: state
                    .errors
                    .iter()
                    .map(|(k, v)| (format!("{k:?}"), v.clone()))
                    .chain(
                        state
                            .unreachable
                            .iter()
                            .map(|why| ("ApiServer".to_string(), why.clone())),
                    )
                    .collect(),
                services: state.data.services.len(),
                pods: state.data.pods.len(),
                endpoint_slices: state.data.slices.len(),
                seconds_since_added: state.added.elapsed().as_secs(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{
        EndpointInfo, Locality, Object, PodInfo, ServiceInfo, ServicePortInfo, SliceInfo,
    };
    use prost::Message;
    use weft_xds_proto::mesh::{self, AppProtocol};

    fn config() -> ModelConfig {
        ModelConfig {
            local_cluster: "c1".into(),
            network: "n1".into(),
            trust_domain: "cluster.local".into(),
            domain_suffix: "cluster.local".into(),
            system_namespace: "weft-system".into(),
            root_namespace: "weft-system".into(),
            cluster_local: vec![],
            default_global: true,
            mcs_cluster_local: false,
        }
    }

    fn update(cluster: &str, generation: u64, change: Change) -> ClusterUpdate {
        ClusterUpdate {
            cluster: cluster.into(),
            generation,
            change,
        }
    }

    fn key(ns: &str, name: &str) -> Key {
        (ns.into(), name.into())
    }

    fn pod(ip: &str) -> Object {
        Object::Pod(PodInfo {
            ips: vec![ip.parse().unwrap()],
            service_account: "echo".into(),
            node: "node-1".into(),
            ready: true,
            sidecar: true,
            canonical_name: "echo".into(),
            canonical_revision: "v1".into(),
            labels: [("app".to_string(), "echo".to_string())].into(),
        })
    }

    fn service(vip: &str, cluster_local: bool) -> Object {
        scoped(vip, cluster_local.then_some(false), true, None)
    }

    /// A Service with scope annotations: global, shared, affinity.
    fn scoped(
        vip: &str,
        global: Option<bool>,
        shared: bool,
        affinity: Option<mesh::Affinity>,
    ) -> Object {
        Object::Service(ServiceInfo {
            vip: Some(vip.parse().unwrap()),
            ports: vec![ServicePortInfo {
                port: 80,
                name: "http".into(),
                protocol: AppProtocol::Http,
                target_port: 8080,
            }],
            cluster_local: global == Some(false),
            global,
            shared,
            affinity,
            scope_problems: Vec::new(),
            gateway: None,
        })
    }

    fn slice(pods: &[&str]) -> Object {
        Object::Slice(SliceInfo {
            service: "echo".into(),
            endpoints: pods
                .iter()
                .map(|p| EndpointInfo {
                    pod: Some(p.to_string()),
                    addresses: vec![],
                    ready: true,
                })
                .collect(),
            ports: vec![("http".into(), 8080)],
        })
    }

    fn synced_cluster(model: &mut Model, id: &str, vip: &str, pod_ip: &str, cluster_local: bool) {
        model.add_cluster(id, 1);
        let items =
            |kind: Kind, items: Vec<(Key, Object)>| update(id, 1, Change::Reset(kind, items));
        model.apply(items(Kind::Namespace, vec![]));
        model.apply(items(Kind::ServiceExport, vec![]));
        for kind in crate::cluster::POLICY_KINDS {
            model.apply(items(kind, vec![]));
        }
        model.apply(items(
            Kind::Node,
            vec![(
                key("", "node-1"),
                Object::Node(Locality {
                    region: "r".into(),
                    zone: format!("{id}-z"),
                    subzone: String::new(),
                }),
            )],
        ));
        model.apply(items(
            Kind::Service,
            vec![(key("demo", "echo"), service(vip, cluster_local))],
        ));
        model.apply(items(
            Kind::Pod,
            vec![(key("demo", &format!("echo-{id}")), pod(pod_ip))],
        ));
        model.apply(items(
            Kind::Slice,
            vec![(
                key("demo", &format!("echo-{id}-s")),
                slice(&[&format!("echo-{id}")]),
            )],
        ));
    }

    fn workload(model: &Model, uid: &str) -> Option<mesh::Workload> {
        let body = model.workloads.get(uid)?.body.clone()?;
        Some(mesh::Workload::decode(body).unwrap())
    }

    fn service_resource(model: &Model) -> mesh::Service {
        let body = model
            .services
            .get("demo/echo.demo.svc.cluster.local")
            .unwrap()
            .body
            .clone()
            .unwrap();
        mesh::Service::decode(body).unwrap()
    }

    #[test]
    fn services_merge_across_clusters_with_their_own_vips() {
        let mut model = Model::new(config());
        synced_cluster(&mut model, "c1", "10.96.0.10", "10.1.0.5", false);
        synced_cluster(&mut model, "c2", "10.97.0.10", "10.2.0.5", false);
        let v = model.flush().unwrap();
        assert_eq!(v, 1);
        let svc = service_resource(&model);
        assert_eq!(svc.clusters, ["c1", "c2"]);
        assert_eq!(svc.vips.len(), 2);
        assert_eq!(svc.vips[1].address, vec![10, 97, 0, 10]);
        let w = workload(&model, "c2/demo/echo-c2").unwrap();
        assert_eq!(w.cluster_id, "c2");
        assert_eq!(w.identity.unwrap().service_account, "echo");
        assert_eq!(w.locality.unwrap().zone, "c2-z");
        assert_eq!(w.services[0].hostname, "echo.demo.svc.cluster.local");
        assert_eq!(
            w.services[0].ports,
            vec![mesh::PortMapping {
                service_port: 80,
                target_port: 8080
            }]
        );
        assert_eq!(w.status, mesh::WorkloadStatus::Healthy as i32);
        assert!(
            !model.ready(Duration::from_secs(30)),
            "not before the remote-cluster Secrets are listed"
        );
        model.set_remotes_listed();
        assert!(model.ready(Duration::from_secs(30)));
        // Nothing changed: no new version.
        assert_eq!(model.flush(), None);
    }

    #[test]
    fn cluster_local_services_stay_local() {
        let mut model = Model::new(config());
        synced_cluster(&mut model, "c1", "10.96.0.10", "10.1.0.5", true);
        synced_cluster(&mut model, "c2", "10.97.0.10", "10.2.0.5", false);
        model.flush();
        let svc = service_resource(&model);
        assert_eq!(svc.clusters, ["c1"]);
        assert!(svc.cluster_local);
        assert!(
            workload(&model, "c2/demo/echo-c2")
                .unwrap()
                .services
                .is_empty()
        );
        assert_eq!(
            workload(&model, "c1/demo/echo-c1").unwrap().services.len(),
            1
        );
    }

    /// c1 (this control plane's) and c2 each with echo as `c1_scope` and
    /// `c2_scope`, under `default_global`: the clusters of echo's
    /// resource, whether c2's pod is bound to it, and its affinity.
    fn scope_outcome(
        default_global: bool,
        c1_scope: Option<Object>,
        c2_scope: Object,
    ) -> (Vec<String>, bool, i32) {
        let mut model = Model::new(ModelConfig {
            default_global,
            ..config()
        });
        synced_cluster(&mut model, "c1", "10.96.0.10", "10.1.0.5", false);
        synced_cluster(&mut model, "c2", "10.97.0.10", "10.2.0.5", false);
        let set = |model: &mut Model, cluster: &str, object: Option<Object>| {
            model.apply(update(
                cluster,
                1,
                Change::Object(Kind::Service, key("demo", "echo"), object),
            ));
        };
        set(&mut model, "c1", c1_scope);
        set(&mut model, "c2", Some(c2_scope));
        model.flush();
        let bound = !workload(&model, "c2/demo/echo-c2")
            .unwrap()
            .services
            .is_empty();
        let svc = service_resource(&model);
        (svc.clusters, bound, svc.affinity)
    }

    #[test]
    fn service_scope_follows_cilium_with_annotations_over_the_mesh_default() {
        use mesh::Affinity;
        let plain = || scoped("10.96.0.10", None, true, None);
        let both = vec!["c1".to_string(), "c2".to_string()];
        let here = vec!["c1".to_string()];
        let cases = [
            (
                "defaults: merged",
                true,
                Some(plain()),
                plain(),
                both.clone(),
                true,
            ),
            (
                "mesh default local",
                false,
                Some(plain()),
                plain(),
                here.clone(),
                false,
            ),
            (
                "annotations beat a local default",
                false,
                Some(scoped("10.96.0.10", Some(true), true, None)),
                scoped("10.97.0.10", Some(true), true, None),
                both.clone(),
                true,
            ),
            (
                "global: false here keeps it here",
                true,
                Some(scoped("10.96.0.10", Some(false), true, None)),
                plain(),
                here.clone(),
                false,
            ),
            (
                "global: false there keeps c2's endpoints there",
                true,
                Some(plain()),
                scoped("10.97.0.10", Some(false), true, None),
                here.clone(),
                false,
            ),
            (
                "shared: false there hides c2's endpoints",
                true,
                Some(plain()),
                scoped("10.97.0.10", None, false, None),
                here.clone(),
                false,
            ),
            (
                "a remote-only global service",
                true,
                None,
                plain(),
                vec!["c2".to_string()],
                true,
            ),
        ];
        for (what, default_global, c1, c2, clusters, bound) in cases {
            let (got, got_bound, _) = scope_outcome(default_global, c1, c2);
            assert_eq!((got, got_bound), (clusters, bound), "{what}");
        }
        // Affinity is the caller's cluster's, else the offering cluster's.
        let (_, _, affinity) = scope_outcome(
            true,
            Some(scoped("10.96.0.10", None, true, Some(Affinity::None))),
            scoped("10.97.0.10", None, true, Some(Affinity::Remote)),
        );
        assert_eq!(affinity, Affinity::None as i32);
        let (_, _, affinity) = scope_outcome(
            true,
            None,
            scoped("10.97.0.10", None, true, Some(Affinity::Remote)),
        );
        assert_eq!(affinity, Affinity::Remote as i32);
    }

    #[test]
    fn a_remote_only_service_gets_a_vip_here_kept_while_it_lasts() {
        let mut model = Model::new(config());
        synced_cluster(&mut model, "c1", "10.96.0.10", "10.1.0.5", false);
        synced_cluster(&mut model, "c2", "10.97.0.10", "10.2.0.5", false);
        model.flush();
        let vips = |model: &Model| -> Vec<(String, Vec<u8>)> {
            service_resource(model)
                .vips
                .into_iter()
                .map(|v| (v.cluster_id, v.address))
                .collect()
        };
        assert_eq!(vips(&model).len(), 2, "echo is in both: no allocation");
        // c1's Service goes: c1's callers know echo by an allocated VIP.
        model.apply(update(
            "c1",
            1,
            Change::Object(Kind::Service, key("demo", "echo"), None),
        ));
        model.flush();
        let allocated = vips(&model);
        let local: Vec<&(String, Vec<u8>)> = allocated.iter().filter(|(c, _)| c == "c1").collect();
        assert_eq!(local.len(), 1, "{allocated:?}");
        assert_eq!(local[0].1[..2], [240, 240]);
        // Stable across rebuilds.
        model.apply(update(
            "c2",
            1,
            Change::Object(
                Kind::Service,
                key("demo", "echo"),
                Some(scoped("10.97.0.11", None, true, None)),
            ),
        ));
        model.flush();
        assert!(vips(&model).contains(local[0]));
        // Back in c1: its own VIP, the allocation freed.
        model.apply(update(
            "c1",
            1,
            Change::Object(
                Kind::Service,
                key("demo", "echo"),
                Some(service("10.96.0.10", false)),
            ),
        ));
        model.flush();
        assert!(!vips(&model).iter().any(|(_, a)| a[..2] == [240, 240]));
        assert!(model.allocated_vips.is_empty());
        // Gone from every cluster: nothing is allocated for it.
        for cluster in ["c1", "c2"] {
            model.apply(update(
                cluster,
                1,
                Change::Object(Kind::Service, key("demo", "echo"), None),
            ));
        }
        model.flush();
        assert!(model.allocated_vips.is_empty());
    }

    #[test]
    fn a_drained_cluster_s_workloads_say_so_until_undrained() {
        let mut model = Model::new(config());
        synced_cluster(&mut model, "c1", "10.96.0.10", "10.1.0.5", false);
        synced_cluster(&mut model, "c2", "10.97.0.10", "10.2.0.5", false);
        model.flush();
        let draining = |model: &Model, uid: &str| workload(model, uid).unwrap().draining;
        assert!(!draining(&model, "c2/demo/echo-c2"));
        // By the remote secret here.
        model.set_drained_by_secrets(["c2".to_string()].into());
        model.flush();
        assert!(draining(&model, "c2/demo/echo-c2"));
        assert!(!draining(&model, "c1/demo/echo-c1"));
        model.set_drained_by_secrets(Default::default());
        model.flush();
        assert!(!draining(&model, "c2/demo/echo-c2"));
        // By the cluster's own system namespace, naming itself; another
        // cluster's id there counts for nothing.
        let annotate = |model: &mut Model, cluster: &str, named: &str| {
            let info = crate::cluster::NamespaceInfo {
                draining: Some(named.to_string()),
                ..Default::default()
            };
            model.apply(update(
                cluster,
                1,
                Change::Object(
                    Kind::Namespace,
                    key("", "weft-system"),
                    Some(Object::Namespace(info)),
                ),
            ));
        };
        annotate(&mut model, "c1", "c1");
        annotate(&mut model, "c2", "c9");
        model.flush();
        assert!(draining(&model, "c1/demo/echo-c1"));
        assert!(!draining(&model, "c2/demo/echo-c2"));
        let status = model.cluster_status();
        assert!(status.iter().find(|c| c.id == "c1").unwrap().draining);
    }

    #[test]
    fn removal_and_changes_are_versioned_deltas() {
        let mut model = Model::new(config());
        synced_cluster(&mut model, "c1", "10.96.0.10", "10.1.0.5", false);
        synced_cluster(&mut model, "c2", "10.97.0.10", "10.2.0.5", false);
        let v1 = model.flush().unwrap();
        model.apply(update(
            "c2",
            1,
            Change::Object(Kind::Pod, key("demo", "echo-c2b"), Some(pod("10.2.0.6"))),
        ));
        let v2 = model.flush().unwrap();
        let changed: Vec<&String> = model.workloads.changed_since(v1).map(|(n, _)| n).collect();
        assert_eq!(changed, ["c2/demo/echo-c2b"]);
        model.remove_cluster("c2");
        let v3 = model.flush().unwrap();
        let removed: Vec<&String> = model
            .workloads
            .changed_since(v2)
            .filter(|(_, e)| e.body.is_none())
            .map(|(n, _)| n)
            .collect();
        assert_eq!(removed.len(), 2);
        assert_eq!(service_resource(&model).clusters, ["c1"]);
        assert!(v3 > v2);
    }

    #[test]
    fn rotation_swaps_only_after_the_new_client_synced_and_ignores_the_old_one() {
        let mut model = Model::new(config());
        synced_cluster(&mut model, "c1", "10.96.0.10", "10.1.0.5", false);
        synced_cluster(&mut model, "c2", "10.97.0.10", "10.2.0.5", false);
        model.flush();
        model.add_cluster("c2", 2);
        // The new client has listed only some kinds: nothing changes yet.
        model.apply(update("c2", 2, Change::Reset(Kind::Pod, vec![])));
        assert_eq!(model.flush(), None);
        assert!(workload(&model, "c2/demo/echo-c2").is_some());
        for kind in [Kind::Namespace, Kind::Node, Kind::Service, Kind::Slice] {
            let items = match kind {
                Kind::Service => vec![(key("demo", "echo"), service("10.97.0.10", false))],
                Kind::Node => vec![(
                    key("", "node-1"),
                    Object::Node(Locality {
                        region: "r".into(),
                        zone: "c2-z".into(),
                        subzone: String::new(),
                    }),
                )],
                Kind::Slice => vec![(key("demo", "echo-c2-s"), slice(&["echo-c2"]))],
                _ => vec![],
            };
            model.apply(update("c2", 2, Change::Reset(kind, items)));
        }
        assert_eq!(model.active_generation("c2"), Some(1));
        model.apply(update("c2", 2, Change::Reset(Kind::ServiceExport, vec![])));
        // Swapped: the new client's view (no pods) now rules.
        assert_eq!(model.active_generation("c2"), Some(2));
        model.flush();
        assert!(workload(&model, "c2/demo/echo-c2").is_none());
        // Late events from generation 1 are ignored.
        model.apply(update(
            "c2",
            1,
            Change::Object(Kind::Pod, key("demo", "ghost"), Some(pod("10.2.0.9"))),
        ));
        assert!(!model.has_pending());
    }

    #[test]
    fn a_failing_cluster_is_flagged_stale_and_recovers() {
        let mut model = Model::new(config());
        synced_cluster(&mut model, "c1", "10.96.0.10", "10.1.0.5", false);
        synced_cluster(&mut model, "c2", "10.97.0.10", "10.2.0.5", false);
        model.flush();
        model.apply(update(
            "c2",
            1,
            Change::Error(Kind::Pod, "connection refused".into()),
        ));
        model.flush();
        assert!(workload(&model, "c2/demo/echo-c2").unwrap().stale);
        assert!(!workload(&model, "c1/demo/echo-c1").unwrap().stale);
        model.apply(update(
            "c2",
            1,
            Change::Reset(Kind::Pod, vec![(key("demo", "echo-c2"), pod("10.2.0.5"))]),
        ));
        model.flush();
        assert!(!workload(&model, "c2/demo/echo-c2").unwrap().stale);
    }

    fn policy(kind: Kind, ns: &str, name: &str, spec: serde_json::Value) -> ClusterUpdate {
        let object = serde_json::json!({"metadata": {"name": name, "namespace": ns, "generation": 1}, "spec": spec});
        let object = match kind {
            Kind::Authorization => Object::Authorization(std::sync::Arc::new(
                crate::security::authorization::read(&object),
            )),
            _ => Object::PeerAuthentication(std::sync::Arc::new(
                crate::security::peer_authentication::read(&object),
            )),
        };
        update("c1", 1, Change::Object(kind, key(ns, name), Some(object)))
    }

    fn authorization(model: &Model, name: &str) -> Option<mesh::Authorization> {
        let body = model.authorizations.get(name)?.body.clone()?;
        Some(mesh::Authorization::decode(body).unwrap())
    }

    #[test]
    fn policy_of_the_local_cluster_attaches_to_its_workloads() {
        let mut model = Model::new(config());
        synced_cluster(&mut model, "c1", "10.96.0.10", "10.1.0.5", false);
        synced_cluster(&mut model, "c2", "10.97.0.10", "10.2.0.5", false);
        model.set_remotes_listed();
        assert!(
            model.ready(Duration::from_secs(30)),
            "policy kinds listed (empty)"
        );
        model.flush();
        let by_selector =
            serde_json::json!({"selector": {"matchLabels": {"app": "echo"}}, "rules": [{}]});
        model.apply(policy(
            Kind::Authorization,
            "demo",
            "by-label",
            by_selector.clone(),
        ));
        model.apply(policy(
            Kind::Authorization,
            "demo",
            "by-service",
            serde_json::json!({"targetRefs": [{"kind": "Service", "name": "echo"}], "action": "DENY", "rules": [{}]}),
        ));
        model.apply(policy(
            Kind::Authorization,
            "demo",
            "whole-ns",
            serde_json::json!({}),
        ));
        model.apply(policy(
            Kind::Authorization,
            "weft-system",
            "mesh",
            serde_json::json!({"action": "AUDIT"}),
        ));
        model.apply(policy(
            Kind::Authorization,
            "weft-system",
            "root-label",
            by_selector,
        ));
        model.apply(policy(
            Kind::PeerAuthentication,
            "demo",
            "strict",
            serde_json::json!({"mtls": {"mode": "STRICT"}}),
        ));
        // Only the local cluster's policy counts: c2's is its own.
        let mut remote = policy(Kind::Authorization, "demo", "remote", serde_json::json!({}));
        remote.cluster = "c2".into();
        model.apply(remote);
        model.flush().unwrap();
        let local = workload(&model, "c1/demo/echo-c1").unwrap();
        assert_eq!(
            local.authorization_policies,
            ["demo/by-label", "demo/by-service", "weft-system/root-label"]
        );
        assert_eq!(
            local.inbound_mtls.unwrap().mode,
            mesh::MtlsMode::Strict as i32
        );
        let remote = workload(&model, "c2/demo/echo-c2").unwrap();
        assert!(remote.authorization_policies.is_empty());
        assert!(remote.inbound_mtls.is_none());
        let scope = |name| authorization(&model, name).unwrap().scope;
        assert_eq!(
            scope("demo/whole-ns"),
            mesh::AuthorizationScope::Namespace as i32
        );
        assert_eq!(
            scope("weft-system/mesh"),
            mesh::AuthorizationScope::Mesh as i32
        );
        assert_eq!(
            scope("demo/by-label"),
            mesh::AuthorizationScope::Workload as i32
        );
        assert!(authorization(&model, "demo/remote").is_none());
        // A policy weft cannot enforce goes out as a deny-all, and its
        // status says which field.
        model.apply(policy(
            Kind::Authorization,
            "demo",
            "by-label",
            serde_json::json!({"selector": {"matchLabels": {"app": "echo"}}, "action": "CUSTOM"}),
        ));
        model.flush().unwrap();
        let refused = authorization(&model, "demo/by-label").unwrap();
        assert_eq!(refused.action, mesh::AuthorizationAction::Deny as i32);
        assert!(refused.refused.contains("spec.action"));
        let statuses = model.policy_statuses();
        let status = |name: &str| {
            statuses
                .iter()
                .find(|s| s.key.1 == name)
                .map(|s| s.wanted.clone())
                .unwrap()
        };
        assert!(!status("by-label").accepted);
        assert!(status("by-label").message.contains("CUSTOM"));
        assert!(status("whole-ns").accepted);
        assert!(status("strict").accepted);
        // Deleting a policy removes its resource and detaches it.
        model.apply(update(
            "c1",
            1,
            Change::Object(Kind::Authorization, key("demo", "by-label"), None),
        ));
        model.flush().unwrap();
        assert!(authorization(&model, "demo/by-label").is_none());
        assert_eq!(
            workload(&model, "c1/demo/echo-c1")
                .unwrap()
                .authorization_policies,
            ["demo/by-service", "weft-system/root-label"]
        );
        // A failing policy watch keeps the policy and the workloads fresh.
        model.apply(update(
            "c1",
            1,
            Change::Error(Kind::Authorization, "403".into()),
        ));
        assert!(model.policy_errors().contains_key(&Kind::Authorization));
        model.flush();
        assert!(!workload(&model, "c1/demo/echo-c1").unwrap().stale);
    }

    #[test]
    fn the_root_namespace_can_be_istios() {
        let mut model = Model::new(ModelConfig {
            root_namespace: "istio-system".into(),
            ..config()
        });
        synced_cluster(&mut model, "c1", "10.96.0.10", "10.1.0.5", false);
        model.apply(policy(
            Kind::Authorization,
            "istio-system",
            "mesh",
            serde_json::json!({}),
        ));
        model.apply(policy(
            Kind::Authorization,
            "weft-system",
            "here",
            serde_json::json!({}),
        ));
        model.flush().unwrap();
        let scope = |name| authorization(&model, name).unwrap().scope;
        assert_eq!(
            scope("istio-system/mesh"),
            mesh::AuthorizationScope::Mesh as i32
        );
        assert_eq!(
            scope("weft-system/here"),
            mesh::AuthorizationScope::Namespace as i32
        );
    }

    fn export(created: &str) -> Object {
        Object::Export(crate::mcs::ExportInfo {
            created: created.into(),
            generation: 1,
            seen: Vec::new(),
            ignored: Vec::new(),
        })
    }

    fn clusterset_resource(model: &Model) -> Option<mesh::Service> {
        let body = model
            .services
            .get("demo/echo.demo.svc.clusterset.local")?
            .body
            .clone()?;
        Some(mesh::Service::decode(body).unwrap())
    }

    fn bound_hosts(model: &Model, uid: &str) -> Vec<(String, Vec<(u32, u32)>)> {
        workload(model, uid)
            .unwrap()
            .services
            .into_iter()
            .map(|b| {
                let ports = b
                    .ports
                    .iter()
                    .map(|p| (p.service_port, p.target_port))
                    .collect();
                (b.hostname, ports)
            })
            .collect()
    }

    /// Under `--default-scope local`: no export, no clusterset name. c2
    /// exports echo: its endpoints serve echo.demo.svc.clusterset.local
    /// (a 240.241/16 VIP), and c1's cluster.local name stays c1's (its
    /// own Service is local). c1 exports too, older, with a port that
    /// disagrees: the union of ports, c1's port wins, and c1's export is
    /// told of the conflict. A ServiceImport is wanted in c1's demo
    /// namespace. With the exports gone, so is the name and its VIP.
    #[test]
    fn exports_make_a_clusterset_service_with_the_union_of_ports_and_the_oldest_wins() {
        let mut model = Model::new(ModelConfig {
            default_global: false,
            ..config()
        });
        synced_cluster(&mut model, "c1", "10.96.0.10", "10.1.0.5", false);
        synced_cluster(&mut model, "c2", "10.97.0.10", "10.2.0.5", false);
        model.apply(update(
            "c1",
            1,
            Change::Object(
                Kind::Namespace,
                key("", "demo"),
                Some(Object::Namespace(Default::default())),
            ),
        ));
        let Object::Service(mut c2_echo) = service("10.97.0.10", false) else {
            unreachable!()
        };
        c2_echo.ports = vec![
            ServicePortInfo {
                port: 80,
                name: "http".into(),
                protocol: AppProtocol::Grpc,
                target_port: 8080,
            },
            ServicePortInfo {
                port: 9090,
                name: "metrics".into(),
                protocol: AppProtocol::Tcp,
                target_port: 9090,
            },
        ];
        let set = |model: &mut Model, cluster: &str, kind: Kind, object: Option<Object>| {
            model.apply(update(
                cluster,
                1,
                Change::Object(kind, key("demo", "echo"), object),
            ));
            model.flush();
        };
        set(
            &mut model,
            "c2",
            Kind::Service,
            Some(Object::Service(c2_echo)),
        );
        assert!(clusterset_resource(&model).is_none());
        assert!(model.service_imports().is_empty());

        set(
            &mut model,
            "c2",
            Kind::ServiceExport,
            Some(export("2026-12-01T06:05:00Z")),
        );
        let clusterset = clusterset_resource(&model).unwrap();
        assert_eq!(clusterset.clusters, ["c2"]);
        assert_eq!(clusterset.vips.len(), 1);
        assert_eq!(clusterset.vips[0].cluster_id, "c1");
        assert_eq!(clusterset.vips[0].address[..2], [240, 241]);
        assert_eq!(
            bound_hosts(&model, "c2/demo/echo-c2"),
            [(
                "echo.demo.svc.clusterset.local".to_string(),
                vec![(80, 8080)]
            )],
            "c2's pod serves the clusterset name only: c1's echo is local"
        );
        assert_eq!(service_resource(&model).clusters, ["c1"]);
        assert_eq!(
            bound_hosts(&model, "c1/demo/echo-c1"),
            [("echo.demo.svc.cluster.local".to_string(), vec![(80, 8080)])]
        );

        set(
            &mut model,
            "c1",
            Kind::ServiceExport,
            Some(export("2026-12-01T06:00:00Z")),
        );
        let clusterset = clusterset_resource(&model).unwrap();
        assert_eq!(clusterset.clusters, ["c1", "c2"], "oldest export first");
        let ports: Vec<(u32, &str, i32)> = clusterset
            .ports
            .iter()
            .map(|p| (p.port, p.name.as_str(), p.app_protocol))
            .collect();
        assert_eq!(
            ports,
            [
                (80, "http", AppProtocol::Http as i32),
                (9090, "metrics", AppProtocol::Tcp as i32)
            ]
        );
        assert_eq!(
            bound_hosts(&model, "c1/demo/echo-c1")[1].0,
            "echo.demo.svc.clusterset.local"
        );
        let statuses = model.export_statuses();
        assert_eq!(statuses.len(), 1, "c1's own exports only");
        let conditions: Vec<(&str, bool, &str)> = statuses[0]
            .wanted
            .iter()
            .map(|c| (c.kind.as_str(), c.status, c.reason.as_str()))
            .collect();
        assert_eq!(
            conditions,
            [
                ("Valid", true, "Exported"),
                ("Conflict", true, "PortConflict")
            ]
        );
        let message = &statuses[0].wanted[1].message;
        assert!(
            message.contains("port http: c2 has http 80 (grpc) where c1, the oldest export, has http 80 (http); c1's is used"),
            "{message}"
        );
        let imports = model.service_imports();
        assert_eq!(imports.len(), 1);
        assert_eq!(imports[0].clusters, ["c1", "c2"]);
        assert_eq!(
            imports[0].vip.map(translate::ip_bytes),
            Some(clusterset.vips[0].address.clone())
        );
        let (spec, status) = imports[0].spec_and_status();
        assert_eq!(spec["type"], "ClusterSetIP");
        assert_eq!(spec["ports"].as_array().unwrap().len(), 2);
        assert_eq!(status["clusters"][1]["cluster"], "c2");

        // A field of the export's spec weft does not act on is said.
        let Object::Export(mut labelled) = export("2026-12-01T06:00:00Z") else {
            unreachable!()
        };
        labelled.ignored = vec!["spec.exportedLabels".into()];
        set(
            &mut model,
            "c1",
            Kind::ServiceExport,
            Some(Object::Export(labelled)),
        );
        let valid = &model.export_statuses()[0].wanted[0];
        assert!(
            valid.status
                && valid
                    .message
                    .ends_with("spec.exportedLabels not supported by weft: ignored"),
            "{valid:?}"
        );

        // Exported without a Service: not valid, and no clusterset name.
        model.apply(update(
            "c1",
            1,
            Change::Object(
                Kind::ServiceExport,
                key("demo", "ghost"),
                Some(export("2026-12-01T06:00:00Z")),
            ),
        ));
        let ghost = model
            .export_statuses()
            .into_iter()
            .find(|s| s.key.1 == "ghost")
            .unwrap();
        assert_eq!(
            (ghost.wanted[0].status, ghost.wanted[0].reason.as_str()),
            (false, "NoService")
        );
        assert_eq!(model.service_imports().len(), 1);

        set(&mut model, "c1", Kind::ServiceExport, None);
        set(&mut model, "c2", Kind::ServiceExport, None);
        assert!(
            model
                .services
                .get("demo/echo.demo.svc.clusterset.local")
                .unwrap()
                .body
                .is_none()
        );
        assert!(model.clusterset_vips.get(&key("demo", "echo")).is_none());
    }

    /// `--mcs-cluster-local`: echo global everywhere, yet its
    /// cluster.local name is c1's alone; the clusterset name of the
    /// exporting clusters crosses.
    #[test]
    fn with_mcs_cluster_local_only_clusterset_names_cross_clusters() {
        let mut model = Model::new(ModelConfig {
            mcs_cluster_local: true,
            ..config()
        });
        synced_cluster(&mut model, "c1", "10.96.0.10", "10.1.0.5", false);
        synced_cluster(&mut model, "c2", "10.97.0.10", "10.2.0.5", false);
        model.flush();
        assert_eq!(service_resource(&model).clusters, ["c1"]);
        assert!(service_resource(&model).cluster_local);
        assert!(bound_hosts(&model, "c2/demo/echo-c2").is_empty());
        for cluster in ["c1", "c2"] {
            model.apply(update(
                cluster,
                1,
                Change::Object(
                    Kind::ServiceExport,
                    key("demo", "echo"),
                    Some(export("2026-12-01T06:00:00Z")),
                ),
            ));
        }
        model.flush();
        assert_eq!(service_resource(&model).clusters, ["c1"]);
        assert_eq!(clusterset_resource(&model).unwrap().clusters, ["c1", "c2"]);
        assert_eq!(
            bound_hosts(&model, "c2/demo/echo-c2"),
            [(
                "echo.demo.svc.clusterset.local".to_string(),
                vec![(80, 8080)]
            )]
        );
        // A service only c2 has gets no cluster.local VIP here.
        model.apply(update(
            "c1",
            1,
            Change::Object(Kind::Service, key("demo", "echo"), None),
        ));
        model.flush();
        assert!(model.allocated_vips.get(&key("demo", "echo")).is_none());
        assert_eq!(clusterset_resource(&model).unwrap().clusters, ["c2"]);
    }
}
