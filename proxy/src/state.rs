//! The proxy's view of the mesh: an immutable snapshot built from the
//! control plane's resources, with the indexes request handling needs
//! (services by VIP and port and by hostname, workloads by address and by
//! service). A new snapshot replaces the old one whole; readers never wait.
//! The indexes point at the resources (shared, see `resources`): a new
//! snapshot copies pointers, never a workload.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use prost::Message;
use weft_xds_proto::mesh;

use crate::resources::{
    Interner, InvalidResource, Service, Workload, decode_service, decode_workload,
};

/// One immutable view of the mesh.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Sorted by namespace and hostname.
    pub services: Vec<Arc<Service>>,
    /// Sorted by uid.
    pub workloads: Vec<Arc<Workload>>,
    /// (VIP, port) → service.
    by_vip: HashMap<SocketAddr, Arc<Service>>,
    /// Hostname (and its short forms) → service.
    by_host: HashMap<Box<str>, Arc<Service>>,
    /// Workload address → workload, sorted by address: a third of the
    /// memory of a hash map, for a binary search per lookup.
    by_ip: Box<[(IpAddr, Arc<Workload>)]>,
    /// Service hostname → the workloads that back it.
    by_service: HashMap<Arc<str>, Vec<Arc<Workload>>>,
}

impl Snapshot {
    pub fn build(
        services: impl IntoIterator<Item = Arc<Service>>,
        workloads: impl IntoIterator<Item = Arc<Workload>>,
    ) -> Snapshot {
        let mut services: Vec<Arc<Service>> = services.into_iter().collect();
        let mut workloads: Vec<Arc<Workload>> = workloads.into_iter().collect();
        // Usually sorted already (they come from ordered maps): then cheap.
        services.sort_by(|a, b| (&a.namespace, &a.hostname).cmp(&(&b.namespace, &b.hostname)));
        workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
        let mut by_vip = HashMap::new();
        let mut by_host = HashMap::with_capacity(services.len() * 3);
        for service in &services {
            for vip in &service.vips {
                for port in &service.ports {
                    by_vip.insert(SocketAddr::new(vip.address, port.port), service.clone());
                }
            }
            by_host.insert(Box::from(&*service.hostname), service.clone());
            // "name.ns" and "name.ns.svc" resolve too, as in cluster DNS.
            let short = format!("{}.{}", service.name, service.namespace);
            by_host.insert(format!("{short}.svc").into(), service.clone());
            by_host.insert(short.into(), service.clone());
        }
        let mut by_ip = Vec::with_capacity(workloads.len());
        let mut by_service: HashMap<Arc<str>, Vec<Arc<Workload>>> = HashMap::new();
        for workload in &workloads {
            for ip in workload.addresses() {
                by_ip.push((ip, workload.clone()));
            }
            for binding in &workload.profile.services {
                by_service
                    .entry(binding.hostname.clone())
                    .or_default()
                    .push(workload.clone());
            }
        }
        by_service.values_mut().for_each(Vec::shrink_to_fit);
        // Two workloads may claim one address for a moment (a pod IP reused
        // before the old pod's removal arrived): the sort is stable, so
        // the last by uid is kept, as a map filled in uid order would.
        by_ip.sort_by_key(|(ip, _)| *ip);
        let mut deduplicated: Vec<(IpAddr, Arc<Workload>)> = Vec::with_capacity(by_ip.len());
        for entry in by_ip {
            match deduplicated.last_mut() {
                Some(last) if last.0 == entry.0 => *last = entry,
                _ => deduplicated.push(entry),
            }
        }
        let by_ip = deduplicated.into_boxed_slice();
        Snapshot {
            services,
            workloads,
            by_vip,
            by_host,
            by_ip,
            by_service,
        }
    }

    /// A snapshot from messages as the control plane sends them, checked
    /// the same way: for tools and tests that have no control plane.
    pub fn from_messages(
        services: &[mesh::Service],
        workloads: &[mesh::Workload],
    ) -> Result<Snapshot, InvalidResource> {
        let names = &mut Interner::default();
        let services = services
            .iter()
            .map(|s| {
                let name = format!("{}/{}", s.namespace, s.hostname);
                decode_service(&name, &s.encode_to_vec(), names).map(Arc::new)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let workloads = workloads
            .iter()
            .map(|w| decode_workload(&w.uid, &w.encode_to_vec(), names).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Snapshot::build(services, workloads))
    }

    pub fn service_by_vip(&self, addr: SocketAddr) -> Option<&Arc<Service>> {
        self.by_vip.get(&addr)
    }

    /// A mesh hostname: full (`name.ns.svc.cluster.local`) or short
    /// (`name.ns`, `name.ns.svc`).
    pub fn service_by_host(&self, host: &str) -> Option<&Arc<Service>> {
        self.by_host.get(host.trim_end_matches('.'))
    }

    /// A service by VIP or hostname, as a client names it.
    pub fn service(&self, host: &str, port: u16) -> Option<&Arc<Service>> {
        match host.parse::<IpAddr>() {
            Ok(ip) => self.service_by_vip(SocketAddr::new(ip, port)),
            Err(_) => self.service_by_host(host),
        }
    }

    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        self.workloads
            .binary_search_by(|w| (*w.uid).cmp(uid))
            .ok()
            .map(|at| &self.workloads[at])
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        self.by_ip
            .binary_search_by_key(&ip, |(at, _)| *at)
            .ok()
            .map(|i| &self.by_ip[i].1)
    }

    /// The workloads backing a service, in every cluster.
    pub fn endpoints(&self, service: &Service) -> &[Arc<Workload>] {
        self.by_service
            .get(&service.hostname)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::Interner;
    use crate::resources::fixtures::*;

    #[test]
    fn indexes_find_services_and_workloads() {
        let names = &mut Interner::default();
        let snapshot = Snapshot::build(
            [Arc::new(service())],
            [
                Arc::new(workload(
                    workload_message("c1/demo/a", [10, 1, 0, 5]),
                    names,
                )),
                Arc::new(workload(
                    workload_message("c2/demo/b", [10, 2, 0, 5]),
                    names,
                )),
            ],
        );
        let svc = snapshot
            .service_by_vip("10.96.0.10:80".parse().unwrap())
            .unwrap();
        assert_eq!(&*svc.name, "echo");
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
        assert!(snapshot.service("10.96.0.10", 80).is_some());
        assert!(snapshot.service("echo.other", 80).is_none());
        assert_eq!(snapshot.endpoints(svc).len(), 2);
        assert!(snapshot.workload("c2/demo/b").is_some());
        assert!(snapshot.workload("c2/demo/c").is_none());
        assert_eq!(
            &*snapshot
                .workload_by_ip("10.2.0.5".parse().unwrap())
                .unwrap()
                .uid,
            "c2/demo/b"
        );
    }
}
