//! The proxy's view of the mesh: an immutable snapshot built from the
//! control plane's resources, with the indexes request handling needs
//! (services by VIP and port and by hostname, workloads by address and by
//! service). A new snapshot replaces the old one whole; readers never wait.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use prost::Message;
use weft_xds_proto::mesh;

/// Why a resource was refused (and the update NACKed).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidResource {
    #[error("{name}: not a valid encoding: {reason}")]
    Decode { name: String, reason: String },
    #[error("{name}: address of {len} bytes (expected 4 or 16)")]
    Address { name: String, len: usize },
    #[error("{name}: resource name does not match its content ({expected})")]
    Name { name: String, expected: String },
    #[error("{name}: {reason}")]
    Field { name: String, reason: String },
}

pub fn ip_from_bytes(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes)
            .ok()
            .map(|b| IpAddr::V4(Ipv4Addr::from(b))),
        16 => <[u8; 16]>::try_from(bytes)
            .ok()
            .map(|b| IpAddr::V6(Ipv6Addr::from(b))),
        _ => None,
    }
}

/// Decodes and checks a Workload; refusing here is what makes a bad push a
/// NACK instead of a broken proxy.
pub fn decode_workload(name: &str, bytes: &[u8]) -> Result<mesh::Workload, InvalidResource> {
    let workload = mesh::Workload::decode(bytes).map_err(|e| InvalidResource::Decode {
        name: name.into(),
        reason: e.to_string(),
    })?;
    if workload.uid != name {
        return Err(InvalidResource::Name {
            name: name.into(),
            expected: workload.uid,
        });
    }
    for address in &workload.addresses {
        if ip_from_bytes(address).is_none() {
            return Err(InvalidResource::Address {
                name: name.into(),
                len: address.len(),
            });
        }
    }
    if workload.addresses.is_empty() {
        return Err(InvalidResource::Field {
            name: name.into(),
            reason: "a workload needs at least one address".into(),
        });
    }
    Ok(workload)
}

pub fn decode_service(name: &str, bytes: &[u8]) -> Result<mesh::Service, InvalidResource> {
    let service = mesh::Service::decode(bytes).map_err(|e| InvalidResource::Decode {
        name: name.into(),
        reason: e.to_string(),
    })?;
    let expected = format!("{}/{}", service.namespace, service.hostname);
    if expected != name {
        return Err(InvalidResource::Name {
            name: name.into(),
            expected,
        });
    }
    for vip in &service.vips {
        if ip_from_bytes(&vip.address).is_none() {
            return Err(InvalidResource::Address {
                name: name.into(),
                len: vip.address.len(),
            });
        }
    }
    Ok(service)
}

/// One immutable view of the mesh.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub services: BTreeMap<String, Arc<mesh::Service>>,
    pub workloads: BTreeMap<String, Arc<mesh::Workload>>,
    /// (VIP, port) → service.
    by_vip: HashMap<SocketAddr, Arc<mesh::Service>>,
    /// Hostname (and its short forms) → service.
    by_host: HashMap<String, Arc<mesh::Service>>,
    /// Workload address → workload.
    by_ip: HashMap<IpAddr, Arc<mesh::Workload>>,
    /// Service hostname → the workloads that back it. The indexes hold the
    /// resources themselves (shared pointers), not their names: no string
    /// is copied per workload, and request handling does no second lookup.
    by_service: HashMap<String, Vec<Arc<mesh::Workload>>>,
}

impl Snapshot {
    pub fn build(
        services: BTreeMap<String, Arc<mesh::Service>>,
        workloads: BTreeMap<String, Arc<mesh::Workload>>,
    ) -> Snapshot {
        let mut by_vip = HashMap::new();
        let mut by_host = HashMap::new();
        for service in services.values() {
            for vip in &service.vips {
                if let Some(ip) = ip_from_bytes(&vip.address) {
                    for port in &service.ports {
                        if let Ok(port) = u16::try_from(port.port) {
                            by_vip.insert(SocketAddr::new(ip, port), service.clone());
                        }
                    }
                }
            }
            by_host.insert(service.hostname.clone(), service.clone());
            // "name.ns" and "name.ns.svc" resolve too, as in cluster DNS.
            by_host.insert(
                format!("{}.{}", service.name, service.namespace),
                service.clone(),
            );
            by_host.insert(
                format!("{}.{}.svc", service.name, service.namespace),
                service.clone(),
            );
        }
        let mut by_ip = HashMap::with_capacity(workloads.len());
        let mut by_service: HashMap<String, Vec<Arc<mesh::Workload>>> = HashMap::new();
        for workload in workloads.values() {
            for address in &workload.addresses {
                if let Some(ip) = ip_from_bytes(address) {
                    by_ip.insert(ip, workload.clone());
                }
            }
            for binding in &workload.services {
                match by_service.get_mut(&binding.hostname) {
                    Some(members) => members.push(workload.clone()),
                    None => {
                        by_service.insert(binding.hostname.clone(), vec![workload.clone()]);
                    }
                }
            }
        }
        Snapshot {
            services,
            workloads,
            by_vip,
            by_host,
            by_ip,
            by_service,
        }
    }

    pub fn service_by_vip(&self, addr: SocketAddr) -> Option<&Arc<mesh::Service>> {
        self.by_vip.get(&addr)
    }

    /// A mesh hostname: full (`name.ns.svc.cluster.local`) or short
    /// (`name.ns`, `name.ns.svc`).
    pub fn service_by_host(&self, host: &str) -> Option<&Arc<mesh::Service>> {
        self.by_host.get(host.trim_end_matches('.'))
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<mesh::Workload>> {
        self.by_ip.get(&ip)
    }

    /// The workloads backing a service, in every cluster.
    pub fn endpoints(&self, service: &mesh::Service) -> impl Iterator<Item = &Arc<mesh::Workload>> {
        self.by_service.get(&service.hostname).into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service() -> mesh::Service {
        mesh::Service {
            name: "echo".into(),
            namespace: "demo".into(),
            hostname: "echo.demo.svc.cluster.local".into(),
            vips: vec![mesh::ClusterVip {
                cluster_id: "c1".into(),
                network: "n".into(),
                address: vec![10, 96, 0, 10],
            }],
            ports: vec![mesh::ServicePort {
                port: 80,
                name: "http".into(),
                app_protocol: 2,
                target_port: 8080,
            }],
            cluster_local: false,
            clusters: vec!["c1".into()],
        }
    }

    fn workload(uid: &str, ip: [u8; 4]) -> mesh::Workload {
        mesh::Workload {
            uid: uid.into(),
            addresses: vec![ip.to_vec()],
            services: vec![mesh::ServiceBinding {
                namespace: "demo".into(),
                hostname: "echo.demo.svc.cluster.local".into(),
                ports: vec![mesh::PortMapping {
                    service_port: 80,
                    target_port: 8080,
                }],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn indexes_find_services_and_workloads() {
        let services = BTreeMap::from([(
            "demo/echo.demo.svc.cluster.local".to_string(),
            Arc::new(service()),
        )]);
        let workloads = BTreeMap::from([
            (
                "c1/demo/a".to_string(),
                Arc::new(workload("c1/demo/a", [10, 1, 0, 5])),
            ),
            (
                "c2/demo/b".to_string(),
                Arc::new(workload("c2/demo/b", [10, 2, 0, 5])),
            ),
        ]);
        let snapshot = Snapshot::build(services, workloads);
        let svc = snapshot
            .service_by_vip("10.96.0.10:80".parse().unwrap())
            .unwrap();
        assert_eq!(svc.name, "echo");
        assert!(
            snapshot
                .service_by_vip("10.96.0.10:81".parse().unwrap())
                .is_none()
        );
        for host in [
            "echo.demo.svc.cluster.local",
            "echo.demo.svc.cluster.local.",
            "echo.demo",
            "echo.demo.svc",
        ] {
            assert!(snapshot.service_by_host(host).is_some(), "{host}");
        }
        assert_eq!(snapshot.endpoints(svc).count(), 2);
        assert_eq!(
            snapshot
                .workload_by_ip("10.2.0.5".parse().unwrap())
                .unwrap()
                .uid,
            "c2/demo/b"
        );
    }

    #[test]
    fn invalid_resources_are_refused() {
        let good = workload("c1/demo/a", [10, 1, 0, 5]).encode_to_vec();
        assert!(decode_workload("c1/demo/a", &good).is_ok());
        assert!(matches!(
            decode_workload("c1/demo/other", &good),
            Err(InvalidResource::Name { .. })
        ));
        assert!(matches!(
            decode_workload("x", &[0xff, 0xff]),
            Err(InvalidResource::Decode { .. })
        ));
        let mut bad = workload("c1/demo/a", [10, 1, 0, 5]);
        bad.addresses = vec![vec![1, 2, 3]];
        assert!(matches!(
            decode_workload("c1/demo/a", &bad.encode_to_vec()),
            Err(InvalidResource::Address { len: 3, .. })
        ));
        bad.addresses.clear();
        assert!(matches!(
            decode_workload("c1/demo/a", &bad.encode_to_vec()),
            Err(InvalidResource::Field { .. })
        ));
        let svc = service().encode_to_vec();
        assert!(decode_service("demo/echo.demo.svc.cluster.local", &svc).is_ok());
        assert!(decode_service("demo/wrong", &svc).is_err());
    }
}
