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
    /// `weft.io/global` (or `weft.io/cluster-local`), a ServiceExport of
    /// it (global), its namespace's
    /// `weft.io/cluster-local`, the `--cluster-local` list, then the mesh
    /// default (`--default-scope`).
    pub(super) fn global_in(&self, id: &str, key: &Key) -> bool {
        let Some(state) = self.clusters.get(id) else {
            return false;
        };
        if let Some(global) = state.data.services.get(key).and_then(|s| s.global) {
            return global;
        }
        // An MCS export asks for exactly this.
        if state.data.exports.contains_key(key) {
            return true;
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
        if self.config.mcs_cluster_local {
            return false;
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
    /// kept while the service lasts.
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
            self.allocated_vips.release(key);
            return None;
        }
        self.allocated_vips.allocate(key)
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
        let local_only = local_service.is_some()
            && (self.config.mcs_cluster_local || !self.global_in(local, key));
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
            ports: service_ports(ports),
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
            let offered = self.offered(cluster, &service_key);
            // Behind the clusterset name too, when its cluster exports it
            // (looked up first: most services are exported nowhere).
            let clusterset = self
                .exports(cluster, &service_key)
                .then(|| self.clusterset(&service_key))
                .flatten();
            if !offered && clusterset.is_none() {
                continue;
            }
            let ready = slice
                .endpoints
                .iter()
                .filter(|e| e.pod.as_deref() == Some(key.1.as_str()))
                .any(|e| e.ready);
            endpoint_ready = Some(endpoint_ready.unwrap_or(false) || ready);
            let own_ports = data.services.get(&service_key).map(|s| &s.ports);
            let own = port_mappings(own_ports, slice);
            if let Some(set) = clusterset {
                let ports = onto_union(&own, own_ports, &set.ports);
                // An empty list would mean every port: serving none of
                // the union's, it is not bound at all.
                if own.is_empty() || !ports.is_empty() {
                    services.push(mesh::ServiceBinding {
                        namespace: key.0.clone(),
                        hostname: Self::clusterset_hostname(&service_key),
                        ports,
                    });
                }
            }
            if offered {
                services.push(mesh::ServiceBinding {
                    namespace: key.0.clone(),
                    hostname: self.hostname(&service_key),
                    ports: own,
                });
            }
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

/// A Service's ports as proxies receive them.
pub(super) fn service_ports(ports: &[crate::cluster::ServicePortInfo]) -> Vec<mesh::ServicePort> {
    ports
        .iter()
        .map(|p| mesh::ServicePort {
            port: p.port,
            name: p.name.clone(),
            app_protocol: p.protocol as i32,
            target_port: p.target_port,
        })
        .collect()
}

/// Which service port reaches which target port of a slice's endpoints:
/// by port name, or the one port when the service has one.
fn port_mappings(
    service_ports: Option<&Vec<crate::cluster::ServicePortInfo>>,
    slice: &crate::cluster::SliceInfo,
) -> Vec<mesh::PortMapping> {
    slice
        .ports
        .iter()
        .filter_map(|(name, target)| {
            let all = service_ports?;
            let port = all.iter().find(|p| p.name == *name || all.len() == 1)?;
            Some(mesh::PortMapping {
                service_port: port.port,
                target_port: *target,
            })
        })
        .collect()
}

/// A cluster's own port mappings, onto the clusterset's union of ports:
/// by port number where the union has it (a conflict over a name or a
/// protocol still leaves the port served), else by port name (where the
/// number lost, the winner's number reaches it).
fn onto_union(
    own: &[mesh::PortMapping],
    own_ports: Option<&Vec<crate::cluster::ServicePortInfo>>,
    union: &[crate::cluster::ServicePortInfo],
) -> Vec<mesh::PortMapping> {
    own.iter()
        .filter_map(|m| {
            if union.iter().any(|u| u.port == m.service_port) {
                return Some(*m);
            }
            let name = &own_ports?.iter().find(|p| p.port == m.service_port)?.name;
            let port = union.iter().find(|u| !name.is_empty() && u.name == *name)?;
            Some(mesh::PortMapping {
                service_port: port.port,
                target_port: m.target_port,
            })
        })
        .collect()
}

pub fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ServicePortInfo;
    use weft_xds_proto::mesh::AppProtocol;

    fn port(name: &str, port: u32) -> ServicePortInfo {
        ServicePortInfo {
            port,
            name: name.into(),
            protocol: AppProtocol::Http,
            target_port: 0,
        }
    }

    fn mapping(service_port: u32, target_port: u32) -> mesh::PortMapping {
        mesh::PortMapping {
            service_port,
            target_port,
        }
    }

    /// A cluster whose `http` is 8080 where the older export's is 80, and
    /// whose `admin` 9000 is nobody else's: 80 reaches its http, 9000
    /// stays, and a port the union lacks by number and name is dropped.
    #[test]
    fn a_cluster_s_ports_map_onto_the_union_by_number_then_by_name() {
        let own_ports = vec![port("http", 8080), port("admin", 9000), port("", 7000)];
        let own = vec![
            mapping(8080, 18080),
            mapping(9000, 19000),
            mapping(7000, 17000),
        ];
        let union = vec![port("http", 80), port("admin", 9000)];
        assert_eq!(
            onto_union(&own, Some(&own_ports), &union),
            [mapping(80, 18080), mapping(9000, 19000)]
        );
        assert!(onto_union(&own, Some(&own_ports), &[port("other", 1)]).is_empty());
    }
}
