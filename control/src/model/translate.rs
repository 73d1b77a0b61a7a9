//! Translation from the clusters' compact Kubernetes objects to the
//! `weft.mesh.v1` resources proxies receive: a service merged across
//! clusters, and a workload per pod.

use std::net::IpAddr;

use weft_xds_proto::mesh;

use super::Model;
use crate::cluster::Key;

impl Model {
    pub(super) fn hostname(&self, key: &Key) -> String {
        format!("{}.{}.svc.{}", key.1, key.0, self.config.domain_suffix)
    }

    /// Whether cluster `id`'s Service `key` is global (merged across
    /// clusters). Precedence, most specific first: the Service's
    /// `weft.io/global` (or `weft.io/cluster-local`), its namespace's
    /// `weft.io/cluster-local`, the `--cluster-local` list, then the mesh
    /// default (`--default-scope`).
    pub(super) fn global_in(&self, id: &str, key: &Key) -> bool {
        let Some(state) = self.clusters.get(id) else {
            return false;
        };
        if let Some(global) = state.data.services.get(key).and_then(|s| s.global) {
            return global;
        }
        if state
            .data
            .namespaces
            .get(&key.0)
            .is_some_and(|n| n.cluster_local)
        {
            return false;
        }
        let exact = format!("{}/{}", key.0, key.1);
        let whole_ns = format!("{}/*", key.0);
        if self
            .config
            .cluster_local
            .iter()
            .any(|c| *c == exact || *c == whole_ns)
        {
            return false;
        }
        self.config.default_global
    }

    /// Whether this control plane's callers see cluster `id`'s endpoints
    /// of `key`: always their own cluster's; another's when its Service
    /// is global and shared, and their own Service (where there is one)
    /// is global too.
    pub(super) fn offered(&self, id: &str, key: &Key) -> bool {
        let local = &self.config.local_cluster;
        if id == local {
            return true;
        }
        let Some(service) = self.clusters.get(id).and_then(|c| c.data.services.get(key)) else {
            return false;
        };
        if !service.shared || !self.global_in(id, key) {
            return false;
        }
        let has_local = self
            .clusters
            .get(local)
            .is_some_and(|c| c.data.services.contains_key(key));
        !has_local || self.global_in(local, key)
    }

    /// Whether cluster `id` is being drained: its remote secret says so in
    /// this cluster, or its own system namespace does.
    pub(super) fn draining(&self, id: &str) -> bool {
        self.drained_by_secrets.contains(id)
            || self
                .clusters
                .get(id)
                .and_then(|c| c.data.namespaces.get(&self.config.system_namespace))
                .and_then(|n| n.draining.as_deref())
                .is_some_and(|named| named == id)
    }

    /// A cluster's network: the label on its system namespace, else this
    /// control plane's `--network` (for a remote, a flat network is the
    /// one guess that needs no gateway).
    pub(super) fn network_of(&self, cluster: &str) -> String {
        self.clusters
            .get(cluster)
            .and_then(|c| c.data.namespaces.get(&self.config.system_namespace))
            .and_then(|n| n.network.clone())
            .unwrap_or_else(|| self.config.network.clone())
    }

    /// The VIP this cluster's callers know a service by when it has no
    /// Service here (it exists only in other clusters): allocated from
    /// 240.240.0.0/16 (which no network routes, as Istio's auto-allocation),
    /// first where a hash of its name says so that a restarted control
    /// plane usually gives the same, kept while the service lasts.
    pub(super) fn allocated_vip(&mut self, key: &Key) -> Option<IpAddr> {
        let local = &self.config.local_cluster;
        let has_local = self
            .clusters
            .get(local)
            .is_some_and(|c| c.data.services.contains_key(key));
        // Offered by another cluster: `offered` holds for this one always.
        let elsewhere = !has_local
            && self
                .clusters
                .keys()
                .any(|id| id != local && self.offered(id, key));
        if !elsewhere {
            if let Some(ip) = self.allocated_vips.remove(key) {
                self.vips_in_use.remove(&ip);
            }
            return None;
        }
        if let Some(ip) = self.allocated_vips.get(key) {
            return Some(*ip);
        }
        // FNV-1a: the same in every process and release.
        let mut hash: u32 = 0x811c_9dc5;
        for byte in format!("{}/{}", key.0, key.1).bytes() {
            hash = (hash ^ u32::from(byte)).wrapping_mul(0x0100_0193);
        }
        for probe in 0..65_534u32 {
            let n = (hash.wrapping_add(probe) % 65_534) + 1;
            let ip = IpAddr::from([240, 240, (n >> 8) as u8, n as u8]);
            if self.vips_in_use.insert(ip) {
                self.allocated_vips.insert(key.clone(), ip);
                return Some(ip);
            }
        }
        tracing::warn!(service = %format!("{}/{}", key.0, key.1), "no VIP left to allocate in 240.240.0.0/16");
        None
    }

    pub(super) fn build_service(
        &self,
        key: &Key,
        allocated: Option<IpAddr>,
    ) -> Option<mesh::Service> {
        let local = &self.config.local_cluster;
        let local_service = self
            .clusters
            .get(local)
            .and_then(|c| c.data.services.get(key));
        let local_only = local_service.is_some() && !self.global_in(local, key);
        let mut vips = Vec::new();
        let mut clusters = Vec::new();
        let mut ports: Option<&Vec<crate::cluster::ServicePortInfo>> = None;
        // The caller's own Service decides the affinity; without one, the
        // first cluster that offers it.
        let mut affinity = local_service.and_then(|s| s.affinity);
        for (id, state) in &self.clusters {
            let Some(service) = state.data.services.get(key) else {
                continue;
            };
            if !self.offered(id, key) {
                continue;
            }
            clusters.push(id.clone());
            if ports.is_none() || id == local {
                ports = Some(&service.ports);
            }
            if local_service.is_none() && affinity.is_none() {
                affinity = service.affinity;
            }
            if let Some(vip) = service.vip {
                vips.push(mesh::ClusterVip {
                    cluster_id: id.clone(),
                    network: self.network_of(id),
                    address: ip_bytes(vip),
                });
            }
        }
        let ports = ports?;
        if let Some(address) = allocated {
            vips.push(mesh::ClusterVip {
                cluster_id: local.clone(),
                network: self.network_of(local),
                address: ip_bytes(address),
            });
        }
        Some(mesh::Service {
            name: key.1.clone(),
            namespace: key.0.clone(),
            hostname: self.hostname(key),
            vips,
            ports: ports
                .iter()
                .map(|p| mesh::ServicePort {
                    port: p.port,
                    name: p.name.clone(),
                    app_protocol: p.protocol as i32,
                    target_port: p.target_port,
                })
                .collect(),
            cluster_local: local_only,
            clusters,
            affinity: affinity.unwrap_or(mesh::Affinity::Local) as i32,
        })
    }

    pub(super) fn build_workload(&self, cluster: &str, key: &Key) -> Option<mesh::Workload> {
        let state = self.clusters.get(cluster)?;
        let data = &state.data;
        let pod = data.pods.get(key)?;
        if pod.ips.is_empty() {
            return None;
        }
        let mut endpoint_ready = None;
        let mut services = Vec::new();
        for slice_name in data.slices_by_pod.get(key).into_iter().flatten() {
            let Some(slice) = data.slices.get(&(key.0.clone(), slice_name.clone())) else {
                continue;
            };
            let service_key = (key.0.clone(), slice.service.clone());
            if !self.offered(cluster, &service_key) {
                continue;
            }
            let ready = slice
                .endpoints
                .iter()
                .filter(|e| e.pod.as_deref() == Some(key.1.as_str()))
                .any(|e| e.ready);
            endpoint_ready = Some(endpoint_ready.unwrap_or(false) || ready);
            let service_ports = data.services.get(&service_key).map(|s| &s.ports);
            let ports = slice
                .ports
                .iter()
                .filter_map(|(name, target)| {
                    let port = service_ports?.iter().find(|p| {
                        p.name == *name || service_ports.is_some_and(|all| all.len() == 1)
                    })?;
                    Some(mesh::PortMapping {
                        service_port: port.port,
                        target_port: *target,
                    })
                })
                .collect();
            services.push(mesh::ServiceBinding {
                namespace: key.0.clone(),
                hostname: self.hostname(&service_key),
                ports,
            });
        }
        services.sort_by(|a, b| a.hostname.cmp(&b.hostname));
        services.dedup_by(|a, b| a.hostname == b.hostname);
        let locality = data.nodes.get(&pod.node).cloned().unwrap_or_default();
        let (authorization_policies, inbound_mtls) = if cluster == self.config.local_cluster {
            self.workload_policy(key)
        } else {
            (Vec::new(), None)
        };
        let healthy = pod.ready && endpoint_ready.unwrap_or(true);
        Some(mesh::Workload {
            uid: format!("{cluster}/{}/{}", key.0, key.1),
            name: key.1.clone(),
            namespace: key.0.clone(),
            cluster_id: cluster.to_string(),
            network: self.network_of(cluster),
            addresses: pod.ips.iter().map(|ip| ip_bytes(*ip)).collect(),
            locality: Some(mesh::Locality {
                region: locality.region,
                zone: locality.zone,
                subzone: locality.subzone,
            }),
            identity: Some(mesh::Identity {
                trust_domain: self.config.trust_domain.clone(),
                namespace: key.0.clone(),
                service_account: pod.service_account.clone(),
            }),
            status: if healthy {
                mesh::WorkloadStatus::Healthy
            } else {
                mesh::WorkloadStatus::Unhealthy
            } as i32,
            services,
            tunnel_protocol: if pod.sidecar {
                mesh::TunnelProtocol::Hbone
            } else {
                mesh::TunnelProtocol::None
            } as i32,
            node: pod.node.clone(),
            canonical_name: pod.canonical_name.clone(),
            canonical_revision: pod.canonical_revision.clone(),
            stale: state.stale,
            draining: self.draining(cluster),
            authorization_policies,
            inbound_mtls,
            labels: pod.labels.clone().into_iter().collect(),
        })
    }
}

pub fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}
