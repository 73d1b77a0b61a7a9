//! One cluster's compact objects as its watchers last reported them, with
//! the indexes that say which pods and services a change touches.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use crate::cluster::{Key, Kind, Locality, NamespaceInfo, Object, PodInfo, ServiceInfo, SliceInfo};
use crate::mcs::ExportInfo;
use crate::security::authorization::AuthorizationInfo;
use crate::security::peer_authentication::PeerAuthenticationInfo;
use crate::traffic::TrafficInfo;

#[derive(Default)]
pub(super) struct ClusterData {
    pub(super) pods: HashMap<Key, PodInfo>,
    pub(super) slices: HashMap<Key, SliceInfo>,
    pub(super) services: HashMap<Key, ServiceInfo>,
    pub(super) nodes: HashMap<String, Locality>,
    pub(super) namespaces: HashMap<String, NamespaceInfo>,
    /// MCS ServiceExports, by the Service they export.
    pub(super) exports: BTreeMap<Key, ExportInfo>,
    /// (ns, pod) → slices naming it.
    pub(super) slices_by_pod: HashMap<Key, BTreeSet<String>>,
    /// (ns, service) → its slices.
    pub(super) slices_by_service: HashMap<Key, BTreeSet<String>>,
    pub(super) pods_by_node: HashMap<String, BTreeSet<Key>>,
    /// Security policy: the local cluster's only.
    pub(super) authorizations: BTreeMap<Key, Arc<AuthorizationInfo>>,
    pub(super) peer_authentications: BTreeMap<Key, Arc<PeerAuthenticationInfo>>,
    /// Traffic policy: the local cluster's only, by kind.
    pub(super) traffic: BTreeMap<(Kind, Key), Arc<TrafficInfo>>,
    pub(super) synced: BTreeSet<Kind>,
}

/// What a change touched.
#[derive(Default)]
pub(super) struct Touched {
    pub(super) pods: Vec<Key>,
    pub(super) services: Vec<Key>,
    pub(super) all_pods: bool,
    pub(super) policies: Vec<(Kind, Key)>,
}

impl ClusterData {
    pub(super) fn pods_of_slice(&self, ns: &str, slice: &SliceInfo) -> Vec<Key> {
        slice
            .endpoints
            .iter()
            .filter_map(|e| e.pod.clone())
            .map(|p| (ns.to_string(), p))
            .collect()
    }

    pub(super) fn pods_of_service(&self, key: &Key) -> Vec<Key> {
        self.slices_by_service
            .get(key)
            .into_iter()
            .flatten()
            .filter_map(|slice| self.slices.get(&(key.0.clone(), slice.clone())))
            .flat_map(|s| self.pods_of_slice(&key.0, s))
            .collect()
    }

    pub(super) fn apply(
        &mut self,
        kind: Kind,
        key: Key,
        object: Option<Object>,
        touched: &mut Touched,
    ) {
        match (kind, object) {
            (Kind::Authorization, object) => {
                match object {
                    Some(Object::Authorization(info)) => {
                        self.authorizations.insert(key.clone(), info)
                    }
                    _ => self.authorizations.remove(&key),
                };
                touched.policies.push((kind, key));
            }
            (Kind::PeerAuthentication, object) => {
                match object {
                    Some(Object::PeerAuthentication(info)) => {
                        self.peer_authentications.insert(key.clone(), info)
                    }
                    _ => self.peer_authentications.remove(&key),
                };
                touched.policies.push((kind, key));
            }
            (
                Kind::VirtualService | Kind::DestinationRule | Kind::HttpRoute | Kind::GrpcRoute,
                object,
            ) => {
                match object {
                    Some(Object::Traffic(info)) => self.traffic.insert((kind, key.clone()), info),
                    _ => self.traffic.remove(&(kind, key.clone())),
                };
                touched.policies.push((kind, key));
            }
            (Kind::Pod, object) => {
                if let Some(old) = self.pods.remove(&key)
                    && let Some(set) = self.pods_by_node.get_mut(&old.node)
                {
                    set.remove(&key);
                }
                if let Some(Object::Pod(pod)) = object {
                    self.pods_by_node
                        .entry(pod.node.clone())
                        .or_default()
                        .insert(key.clone());
                    self.pods.insert(key.clone(), pod);
                }
                touched.pods.push(key);
            }
            (Kind::Slice, object) => {
                let (ns, name) = key.clone();
                if let Some(old) = self.slices.remove(&key) {
                    touched.pods.extend(self.pods_of_slice(&ns, &old));
                    for pod in self.pods_of_slice(&ns, &old) {
                        if let Some(set) = self.slices_by_pod.get_mut(&pod) {
                            set.remove(&name);
                        }
                    }
                    if let Some(set) = self
                        .slices_by_service
                        .get_mut(&(ns.clone(), old.service.clone()))
                    {
                        set.remove(&name);
                    }
                }
                if let Some(Object::Slice(slice)) = object {
                    for pod in self.pods_of_slice(&ns, &slice) {
                        self.slices_by_pod
                            .entry(pod.clone())
                            .or_default()
                            .insert(name.clone());
                        touched.pods.push(pod);
                    }
                    self.slices_by_service
                        .entry((ns.clone(), slice.service.clone()))
                        .or_default()
                        .insert(name.clone());
                    self.slices.insert(key, slice);
                }
            }
            (Kind::Service, object) => {
                match object {
                    Some(Object::Service(service)) => {
                        self.services.insert(key.clone(), service);
                    }
                    _ => {
                        self.services.remove(&key);
                    }
                }
                touched.pods.extend(self.pods_of_service(&key));
                touched.services.push(key);
            }
            (Kind::ServiceExport, object) => {
                let export = match object {
                    Some(Object::Export(export)) => Some(export),
                    _ => None,
                };
                let old = match export {
                    Some(export) => self.exports.insert(key.clone(), export),
                    None => self.exports.remove(&key),
                };
                // Its status being written changes nothing the mesh uses.
                let same = match (&old, self.exports.get(&key)) {
                    (Some(old), Some(new)) => old.same_export(new),
                    (None, None) => true,
                    _ => false,
                };
                if !same {
                    touched.pods.extend(self.pods_of_service(&key));
                    touched.services.push(key);
                }
            }
            (Kind::Node, object) => {
                let name = key.1;
                match object {
                    Some(Object::Node(locality)) => {
                        if self.nodes.get(&name) == Some(&locality) {
                            return;
                        }
                        self.nodes.insert(name.clone(), locality);
                    }
                    _ => {
                        self.nodes.remove(&name);
                    }
                }
                touched
                    .pods
                    .extend(self.pods_by_node.get(&name).into_iter().flatten().cloned());
            }
            (Kind::Namespace, object) => {
                let name = key.1;
                let info = match object {
                    Some(Object::Namespace(info)) => Some(info),
                    _ => None,
                };
                if self.namespaces.get(&name) == info.as_ref() {
                    return;
                }
                match info {
                    Some(info) => self.namespaces.insert(name.clone(), info),
                    None => self.namespaces.remove(&name),
                };
                // Rare: a namespace's mesh settings changed. Network changes
                // reach every workload; cluster-local only this namespace.
                touched.all_pods = true;
                touched
                    .services
                    .extend(self.services.keys().filter(|(ns, _)| *ns == name).cloned());
            }
        }
    }

    pub(super) fn objects(&self, kind: Kind) -> BTreeMap<Key, Object> {
        match kind {
            Kind::Authorization => self
                .authorizations
                .iter()
                .map(|(k, v)| (k.clone(), Object::Authorization(v.clone())))
                .collect(),
            Kind::PeerAuthentication => self
                .peer_authentications
                .iter()
                .map(|(k, v)| (k.clone(), Object::PeerAuthentication(v.clone())))
                .collect(),
            Kind::VirtualService | Kind::DestinationRule | Kind::HttpRoute | Kind::GrpcRoute => {
                self.traffic
                    .iter()
                    .filter(|((k, _), _)| *k == kind)
                    .map(|((_, key), v)| (key.clone(), Object::Traffic(v.clone())))
                    .collect()
            }
            Kind::Pod => self
                .pods
                .iter()
                .map(|(k, v)| (k.clone(), Object::Pod(v.clone())))
                .collect(),
            Kind::Slice => self
                .slices
                .iter()
                .map(|(k, v)| (k.clone(), Object::Slice(v.clone())))
                .collect(),
            Kind::Service => self
                .services
                .iter()
                .map(|(k, v)| (k.clone(), Object::Service(v.clone())))
                .collect(),
            Kind::ServiceExport => self
                .exports
                .iter()
                .map(|(k, v)| (k.clone(), Object::Export(v.clone())))
                .collect(),
            Kind::Node => self
                .nodes
                .iter()
                .map(|(k, v)| ((String::new(), k.clone()), Object::Node(v.clone())))
                .collect(),
            Kind::Namespace => self
                .namespaces
                .iter()
                .map(|(k, v)| ((String::new(), k.clone()), Object::Namespace(v.clone())))
                .collect(),
        }
    }

    /// Replaces one kind's whole set, touching only what differs.
    pub(super) fn reset(&mut self, kind: Kind, items: Vec<(Key, Object)>, touched: &mut Touched) {
        let current = self.objects(kind);
        let fresh: BTreeMap<Key, Object> = items.into_iter().collect();
        for key in current.keys().filter(|k| !fresh.contains_key(*k)) {
            self.apply(kind, key.clone(), None, touched);
        }
        for (key, object) in fresh {
            if current.get(&key) != Some(&object) {
                self.apply(kind, key, Some(object), touched);
            }
        }
        self.synced.insert(kind);
    }

    pub(super) fn fully_synced(&self) -> bool {
        crate::cluster::KINDS
            .iter()
            .all(|k| self.synced.contains(k))
    }

    /// Security policy has been listed (or found not installed).
    pub(super) fn policy_synced(&self) -> bool {
        crate::cluster::POLICY_KINDS
            .iter()
            .all(|k| self.synced.contains(k))
    }
}
