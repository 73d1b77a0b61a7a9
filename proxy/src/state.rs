//! The proxy's view of the mesh: an immutable snapshot built from the
//! control plane's resources, with the indexes request handling needs
//! (services by VIP and port and by hostname, workloads by address and by
//! service). A new snapshot replaces the old one whole; readers never wait.
//! The indexes point at the resources (shared, see `resources`): a new
//! snapshot copies pointers, never a workload.
//!
//! Every index is a sorted slice searched by bisection, most of them of
//! 4-byte positions in `services` or `workloads`: a sidecar holds one
//! snapshot of the whole mesh, and at 10,000 workloads hash maps of
//! pointers and owned keys cost several times as much memory for lookups
//! that are a few comparisons either way (`cargo bench -p weft-proxy
//! --bench snapshot`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use prost::Message;
use weft_xds_proto::mesh;

use crate::authorization::{InboundPolicy, Policy, Scope};
use crate::resources::{
    Interner, InvalidResource, Name, Service, Workload, decode_service, decode_workload,
};
use crate::routes::{Caller, Destination, HostRoutes, RouteSet};

/// The pod a proxy serves, as far as security policy needs to know it.
#[derive(Clone, Debug, Default)]
pub struct Local {
    pub addresses: Vec<IpAddr>,
    /// Its namespace, for namespace-wide policy while the mesh does not
    /// yet show its workload.
    pub namespace: String,
    /// Its network, while the mesh does not yet show its workload (which
    /// says, from the cluster's label).
    pub network: String,
}

/// One immutable view of the mesh.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Sorted by namespace and hostname.
    pub services: Vec<Arc<Service>>,
    /// Sorted by uid.
    pub workloads: Vec<Arc<Workload>>,
    /// (VIP, port, position in `services`), sorted.
    by_vip: Box<[(IpAddr, u16, u32)]>,
    /// Positions in `services`, sorted by hostname.
    by_hostname: Box<[u32]>,
    /// Positions in `services`, sorted by (name, namespace): the short
    /// forms `name.ns` and `name.ns.svc`, as in cluster DNS.
    by_short_name: Box<[u32]>,
    /// Workload address → position in `workloads`, sorted by address.
    by_ipv4: Box<[(Ipv4Addr, u32)]>,
    by_ipv6: Box<[(Ipv6Addr, u32)]>,
    /// The workloads backing each service, one run per service hostname,
    /// each run in uid order.
    backends: Box<[Arc<Workload>]>,
    /// Service hostname → its run in `backends` (start, length), sorted.
    by_service: Box<[(Name, u32, u32)]>,
    /// Every Authorization, sorted by name.
    pub policies: Box<[Arc<Policy>]>,
    /// The inbound policy of each of this pod's addresses, compiled
    /// when the snapshot is built.
    inbound: Box<[(IpAddr, Arc<InboundPolicy>)]>,
    /// Traffic policy, shared with the next snapshot while it is
    /// unchanged.
    pub traffic: Arc<Traffic>,
    /// The network this pod is on: workloads elsewhere are reached
    /// through `gateways`.
    pub network: Name,
    /// East-west gateways into other networks, sorted by name.
    pub gateways: Box<[Arc<crate::network::Gateway>]>,
}

/// Traffic policy as this pod sees it as a caller.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Every RouteSet and DestinationPolicy, sorted by name.
    pub route_sets: Box<[Arc<RouteSet>]>,
    pub destination_policies: Box<[Arc<Destination>]>,
    /// Per service hostname, the routes and the destination policy this
    /// pod sees, sorted by hostname.
    routes: Box<[(Name, Arc<HostRoutes>)]>,
    destinations: Box<[(Name, Arc<Destination>)]>,
    /// Who they were settled for.
    pub caller: Caller,
}

impl Traffic {
    pub fn new(
        route_sets: impl IntoIterator<Item = Arc<RouteSet>>,
        destinations: impl IntoIterator<Item = Arc<Destination>>,
        caller: Caller,
    ) -> Traffic {
        let route_sets: Box<[Arc<RouteSet>]> = route_sets.into_iter().collect();
        let destination_policies: Box<[Arc<Destination>]> = destinations.into_iter().collect();
        Traffic {
            routes: crate::routes::host_routes(&route_sets, &caller),
            destinations: crate::routes::destinations(&destination_policies, &caller),
            route_sets,
            destination_policies,
            caller,
        }
    }
}

/// A position in `services` or `workloads`. A mesh has far fewer than 2^32.
fn position(at: usize) -> u32 {
    at as u32
}

/// Sorts by `key` and keeps, among entries with equal keys, the last one
/// (the sort is stable): what a map filled in the same order would hold.
/// Two entries may claim one key for a moment (a pod IP reused before the
/// old pod's removal arrived).
/// What the hostnames of MCS clusterset services end with.
pub const CLUSTERSET_SUFFIX: &str = ".svc.clusterset.local";

fn sorted_last_wins<T, K: Ord>(mut entries: Vec<T>, key: impl Fn(&T) -> K) -> Box<[T]> {
    entries.sort_by_key(&key);
    let mut kept: Vec<T> = Vec::with_capacity(entries.len());
    for entry in entries {
        match kept.last_mut() {
            Some(last) if key(last) == key(&entry) => *last = entry,
            _ => kept.push(entry),
        }
    }
    kept.into_boxed_slice()
}

/// The entry of a sorted slice that `order` (an entry against the one
/// wanted) finds equal.
fn find<T>(entries: &[T], order: impl Fn(&T) -> std::cmp::Ordering) -> Option<&T> {
    entries.binary_search_by(order).ok().map(|at| &entries[at])
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

        let mut vips = Vec::new();
        for (at, service) in services.iter().enumerate() {
            for vip in &service.vips {
                for port in &service.ports {
                    vips.push((vip.address, port.port, position(at)));
                }
            }
        }
        let by_vip = sorted_last_wins(vips, |&(ip, port, _)| (ip, port));
        let all = || (0..services.len()).map(position).collect::<Vec<u32>>();
        let by_hostname = sorted_last_wins(all(), |&at| &*services[at as usize].hostname);
        // Short names are the pod's search path expanding into this
        // cluster's domain: never an MCS clusterset service, which shares
        // its name and namespace.
        let short_named: Vec<u32> = all()
            .into_iter()
            .filter(|&at| !services[at as usize].hostname.ends_with(CLUSTERSET_SUFFIX))
            .collect();
        let by_short_name = sorted_last_wins(short_named, |&at| {
            let service = &services[at as usize];
            (&*service.name, &*service.namespace)
        });

        let mut ipv4 = Vec::with_capacity(workloads.len());
        let mut ipv6 = Vec::new();
        let mut memberships: Vec<(&Name, u32)> = Vec::with_capacity(workloads.len());
        for (at, workload) in workloads.iter().enumerate() {
            for ip in workload.addresses() {
                match ip {
                    IpAddr::V4(ip) => ipv4.push((ip, position(at))),
                    IpAddr::V6(ip) => ipv6.push((ip, position(at))),
                }
            }
            for binding in &workload.profile.services {
                memberships.push((&binding.hostname, position(at)));
            }
        }
        let by_ipv4 = sorted_last_wins(ipv4, |&(ip, _)| ip);
        let by_ipv6 = sorted_last_wins(ipv6, |&(ip, _)| ip);

        // Stable: within a service, workloads stay in uid order.
        memberships.sort_by(|a, b| a.0.cmp(b.0));
        let mut backends = Vec::with_capacity(memberships.len());
        let mut by_service: Vec<(Name, u32, u32)> = Vec::new();
        for (hostname, at) in memberships {
            match by_service.last_mut() {
                Some(run) if run.0 == *hostname => run.2 += 1,
                _ => by_service.push((hostname.clone(), position(backends.len()), 1)),
            }
            backends.push(workloads[at as usize].clone());
        }

        Snapshot {
            by_vip,
            by_hostname,
            by_short_name,
            by_ipv4,
            by_ipv6,
            backends: backends.into_boxed_slice(),
            by_service: by_service.into_boxed_slice(),
            services,
            workloads,
            policies: Box::default(),
            inbound: Box::default(),
            traffic: Arc::default(),
            network: Name::from(""),
            gateways: Box::default(),
        }
    }

    /// The workload of the pod at `local`, once the mesh shows it.
    fn own_workload(&self, local: &Local) -> Option<&Arc<Workload>> {
        local
            .addresses
            .iter()
            .find_map(|ip| self.workload_by_ip(*ip))
    }

    /// This pod as a caller: its namespace and, once its workload is
    /// known, its labels.
    pub fn caller(&self, local: &Local) -> Caller {
        let me = self.own_workload(local);
        Caller {
            namespace: me.map_or_else(
                || Name::from(local.namespace.as_str()),
                |w| w.profile.namespace.clone(),
            ),
            labels: me.map(|w| w.profile.labels.clone()).unwrap_or_default(),
        }
    }

    /// Adds the gateways into other networks, and which network the pod at
    /// `local` is on.
    pub fn with_gateways(
        mut self,
        gateways: impl IntoIterator<Item = Arc<crate::network::Gateway>>,
        local: &Local,
    ) -> Self {
        let me = self.own_workload(local);
        self.network = me.map_or_else(
            || Name::from(local.network.as_str()),
            |w| w.profile.network.clone(),
        );
        let mut gateways: Vec<_> = gateways.into_iter().collect();
        gateways.sort_by(|a, b| a.name.cmp(&b.name));
        self.gateways = gateways.into_boxed_slice();
        self
    }

    /// Where `workload` is reached from this pod: directly, through a
    /// gateway, or (on a network without a usable one) not at all.
    pub fn reach<'a>(
        &'a self,
        workload: &Workload,
        ejected: &crate::network::Ejections,
        excluded: &[Name],
    ) -> crate::network::Reach<'a> {
        crate::network::reach(&self.network, &self.gateways, workload, ejected, excluded)
    }

    /// Adds traffic policy, settled for the pod at `local` as the caller.
    pub fn with_traffic(
        self,
        route_sets: impl IntoIterator<Item = Arc<RouteSet>>,
        destinations: impl IntoIterator<Item = Arc<Destination>>,
        local: &Local,
    ) -> Self {
        let caller = self.caller(local);
        self.with_settled_traffic(Arc::new(Traffic::new(route_sets, destinations, caller)))
    }

    /// Adds traffic policy already settled (for this snapshot's caller).
    pub fn with_settled_traffic(mut self, traffic: Arc<Traffic>) -> Self {
        self.traffic = traffic;
        self
    }

    /// Every host's routes as this pod sees them.
    pub fn host_routes(&self) -> &[(Name, Arc<HostRoutes>)] {
        &self.traffic.routes
    }

    /// The routes this pod sees for a service hostname.
    pub fn routes_for(&self, hostname: &str) -> Option<&Arc<HostRoutes>> {
        find(&self.traffic.routes, |(host, _)| (**host).cmp(hostname)).map(|(_, r)| r)
    }

    /// The destination policy this pod sees for a service hostname.
    pub fn destination_for(&self, hostname: &str) -> Option<&Arc<Destination>> {
        find(&self.traffic.destinations, |(host, _)| {
            (**host).cmp(hostname)
        })
        .map(|(_, d)| d)
    }

    /// Adds the Authorizations, and groups those the pod at `local` is
    /// subject to: mesh-wide ones, its namespace's, and those attached to
    /// its workload. A policy its workload names but the proxy has not
    /// received yet denies everything until it arrives (fail closed).
    pub fn with_policies(
        mut self,
        policies: impl IntoIterator<Item = Arc<Policy>>,
        local: &Local,
    ) -> Self {
        let mut policies: Vec<Arc<Policy>> = policies.into_iter().collect();
        policies.sort_by(|a, b| a.name.cmp(&b.name));
        let mut inbound = Vec::with_capacity(local.addresses.len());
        for &ip in &local.addresses {
            let workload = self.workload_by_ip(ip);
            let namespace = workload.map_or(local.namespace.as_str(), |w| &*w.profile.namespace);
            let attached = workload.map_or(&[][..], |w| &w.profile.authorization_policies[..]);
            let applicable = policies.iter().filter(|p| match p.scope {
                Scope::Mesh => true,
                Scope::Namespace => *p.namespace == *namespace,
                Scope::Workload => attached.contains(&p.name),
            });
            let missing = attached
                .iter()
                .filter(|name| policies.binary_search_by(|p| p.name.cmp(name)).is_err())
                .map(|name| Arc::new(Policy::deny_all(name, "attached but not received yet")));
            let policy = InboundPolicy::new(applicable.cloned().chain(missing));
            inbound.push((ip, Arc::new(policy)));
        }
        self.policies = policies.into();
        self.inbound = inbound.into();
        self
    }

    /// The inbound policy of this pod's address `ip`; none for an
    /// address that is not this pod's.
    pub fn inbound(&self, ip: IpAddr) -> Option<&Arc<InboundPolicy>> {
        self.inbound
            .iter()
            .find(|(at, _)| *at == ip)
            .map(|(_, p)| p)
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
        let wanted = (addr.ip(), addr.port());
        find(&self.by_vip, |&(ip, port, _)| (ip, port).cmp(&wanted))
            .map(|&(_, _, at)| &self.services[at as usize])
    }

    /// A mesh hostname: full (`name.ns.svc.cluster.local`) or short
    /// (`name.ns`, `name.ns.svc`).
    pub fn service_by_host(&self, host: &str) -> Option<&Arc<Service>> {
        let host = host.trim_end_matches('.');
        let service = |&at: &u32| &self.services[at as usize];
        if let Some(found) = find(&self.by_hostname, |at| (*service(at).hostname).cmp(host)) {
            return Some(service(found));
        }
        // Names and namespaces are DNS labels: no dots inside either.
        let short = host.strip_suffix(".svc").unwrap_or(host);
        let (name, namespace) = short.split_once('.')?;
        if namespace.contains('.') {
            return None;
        }
        find(&self.by_short_name, |at| {
            (&*service(at).name, &*service(at).namespace).cmp(&(name, namespace))
        })
        .map(service)
    }

    /// A service by VIP or hostname, as a client names it.
    pub fn service(&self, host: &str, port: u16) -> Option<&Arc<Service>> {
        match host.parse::<IpAddr>() {
            Ok(ip) => self.service_by_vip(SocketAddr::new(ip, port)),
            Err(_) => self.service_by_host(host),
        }
    }

    pub fn workload(&self, uid: &str) -> Option<&Arc<Workload>> {
        find(&self.workloads, |w| (*w.uid).cmp(uid))
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<Workload>> {
        let at = match ip {
            IpAddr::V4(ip) => find(&self.by_ipv4, |(at, _)| at.cmp(&ip)).map(|&(_, at)| at),
            IpAddr::V6(ip) => find(&self.by_ipv6, |(at, _)| at.cmp(&ip)).map(|&(_, at)| at),
        }?;
        Some(&self.workloads[at as usize])
    }

    /// The workloads backing a service, in every cluster.
    pub fn endpoints(&self, service: &Service) -> &[Arc<Workload>] {
        find(&self.by_service, |(hostname, _, _)| {
            hostname.cmp(&service.hostname)
        })
        .map(|&(_, start, len)| &self.backends[start as usize..(start + len) as usize])
        .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::Interner;
    use crate::resources::fixtures::*;

    #[test]
    fn short_names_mean_this_cluster_s_service_not_the_clusterset_one() {
        use weft_xds_proto::testing;
        let ports = vec![testing::port(
            80,
            "http",
            weft_xds_proto::mesh::AppProtocol::Http,
            8080,
        )];
        let local = testing::service("demo", "echo", [10, 96, 0, 10], ports.clone());
        let mut clusterset = testing::service("demo", "echo", [240, 241, 0, 9], ports);
        clusterset.hostname = "echo.demo.svc.clusterset.local".into();
        let snapshot = Snapshot::from_messages(&[clusterset, local], &[]).unwrap();
        for host in ["echo.demo", "echo.demo.svc", "echo.demo.svc.cluster.local"] {
            assert_eq!(
                &*snapshot.service_by_host(host).unwrap().hostname,
                "echo.demo.svc.cluster.local",
                "{host}"
            );
        }
        assert_eq!(
            &*snapshot
                .service_by_host("echo.demo.svc.clusterset.local")
                .unwrap()
                .hostname,
            "echo.demo.svc.clusterset.local"
        );
    }

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

    /// The sorted indexes answer as maps filled in the same order would:
    /// over a mesh with shared VIPs, reused pod addresses, IPv6 and pods
    /// backing several services, every lookup is checked against a map.
    #[test]
    fn sorted_indexes_answer_as_maps_would() {
        use std::collections::HashMap;
        let services: Vec<mesh::Service> = (0..40u8)
            .map(|n| {
                let mut s = crate::resources::fixtures::service_message();
                s.name = format!("svc-{n}");
                s.namespace = format!("ns-{}", n % 3);
                s.hostname = format!("svc-{n}.ns-{}.svc.cluster.local", n % 3);
                // Every fourth service shares the previous one's VIP.
                s.vips[0].address = vec![10, 96, 0, n - n % 4 / 3];
                s.ports[0].port = 80;
                s.ports.push(mesh::ServicePort {
                    port: 9000 + u32::from(n),
                    name: "tcp".into(),
                    app_protocol: 0,
                    target_port: 0,
                });
                s
            })
            .collect();
        let workloads: Vec<mesh::Workload> = (0..300u16)
            .map(|n| {
                // Pairs of pods share an address, as a reused pod IP does.
                let ip = [10, 1, (n / 2 / 250) as u8, (n / 2 % 250) as u8];
                let mut w = workload_message(&format!("c{}/demo/pod-{n:03}", n % 2), ip);
                if n % 5 == 0 {
                    let mut v6 = vec![0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                    v6.extend_from_slice(&n.to_be_bytes());
                    w.addresses.push(v6);
                }
                w.services = (0..1 + n % 3)
                    .map(|k| {
                        let m = (n + k * 7) % 40;
                        mesh::ServiceBinding {
                            namespace: format!("ns-{}", m % 3),
                            hostname: format!("svc-{m}.ns-{}.svc.cluster.local", m % 3),
                            ports: vec![],
                        }
                    })
                    .collect();
                w
            })
            .collect();
        let snapshot = Snapshot::from_messages(&services, &workloads).unwrap();

        let mut by_vip = HashMap::new();
        let mut by_host = HashMap::new();
        for service in &snapshot.services {
            for vip in &service.vips {
                for port in &service.ports {
                    by_vip.insert(
                        SocketAddr::new(vip.address, port.port),
                        service.name.clone(),
                    );
                }
            }
            by_host.insert(service.hostname.to_string(), service.name.clone());
            let short = format!("{}.{}", service.name, service.namespace);
            by_host.insert(format!("{short}.svc"), service.name.clone());
            by_host.insert(short, service.name.clone());
        }
        let mut by_ip = HashMap::new();
        let mut by_service: HashMap<String, Vec<Name>> = HashMap::new();
        for workload in &snapshot.workloads {
            for ip in workload.addresses() {
                by_ip.insert(ip, workload.uid.clone());
            }
            for binding in &workload.profile.services {
                by_service
                    .entry(binding.hostname.to_string())
                    .or_default()
                    .push(workload.uid.clone());
            }
        }
        assert!(
            by_vip.len() < 80 && by_ip.len() < 360,
            "collisions exercised"
        );

        for (addr, name) in &by_vip {
            assert_eq!(snapshot.service_by_vip(*addr).map(|s| &s.name), Some(name));
        }
        assert!(
            snapshot
                .service_by_vip("10.96.0.1:81".parse().unwrap())
                .is_none()
        );
        for (host, name) in &by_host {
            assert_eq!(
                snapshot.service_by_host(host).map(|s| &s.name),
                Some(name),
                "{host}"
            );
        }
        for host in [
            "svc-1",
            "svc-1.ns-9",
            "svc-1.ns-1.other",
            "svc-1.ns-1.svc.x",
            "",
        ] {
            assert!(snapshot.service_by_host(host).is_none(), "{host}");
        }
        for (ip, uid) in &by_ip {
            assert_eq!(snapshot.workload_by_ip(*ip).map(|w| &w.uid), Some(uid));
        }
        assert!(
            snapshot
                .workload_by_ip("10.9.9.9".parse().unwrap())
                .is_none()
        );
        assert!(
            snapshot
                .workload_by_ip("fd00::ffff".parse().unwrap())
                .is_none()
        );
        for service in &snapshot.services {
            let found: Vec<&Name> = snapshot.endpoints(service).iter().map(|w| &w.uid).collect();
            let expected: Vec<&Name> = by_service
                .get(&*service.hostname)
                .map(|uids| uids.iter().collect())
                .unwrap_or_default();
            assert_eq!(found, expected, "{}", service.hostname);
        }
        for workload in &snapshot.workloads {
            assert_eq!(
                snapshot.workload(&workload.uid).map(|w| &w.uid),
                Some(&workload.uid)
            );
        }
    }
}
