//! The proxy's own form of the control plane's `Service` and `Workload`
//! resources: checked once when they arrive (a bad one is NACKed, never
//! met by a request), and compact. A mesh of 10,000 pods repeats a few
//! dozen namespaces, clusters, localities and identities: those strings,
//! and everything the pods of one deployment share (their `Profile`), are
//! stored once and pointed to, so a workload costs about as much as its
//! name and address. Clones on the request path are reference-count bumps.

use std::collections::HashSet;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use prost::Message;
use weft_certs::Identity;
use weft_xds_proto::mesh;

pub use crate::name::Name;

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

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Locality {
    pub region: Name,
    pub zone: Name,
    pub subzone: Name,
}

/// One service port. Ports are checked to fit 16 bits on arrival.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServicePort {
    pub port: u16,
    pub name: Name,
    pub app_protocol: mesh::AppProtocol,
    /// 0: the same as `port`.
    pub target_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterVip {
    pub cluster_id: Name,
    pub network: Name,
    pub address: IpAddr,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Service {
    /// The name the control plane sent it under: `namespace/hostname`.
    pub resource_name: Name,
    pub name: Name,
    pub namespace: Name,
    pub hostname: Name,
    pub vips: Box<[ClusterVip]>,
    pub ports: Box<[ServicePort]>,
    pub cluster_local: bool,
    pub clusters: Box<[Name]>,
    /// Which clusters' endpoints callers prefer.
    pub affinity: mesh::Affinity,
}

impl Service {
    pub fn port(&self, port: u16) -> Option<&ServicePort> {
        self.ports.iter().find(|p| p.port == port)
    }
}

/// A workload's membership in one service, with its port mappings (none:
/// every service port maps to the same port number).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceBinding {
    pub hostname: Name,
    pub namespace: Name,
    /// (service port, target port).
    pub ports: Box<[(u16, u16)]>,
}

/// What the pods of one deployment have in common.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Profile {
    pub namespace: Name,
    pub cluster_id: Name,
    pub network: Name,
    pub locality: Locality,
    /// Checked as a SPIFFE identity on arrival.
    pub identity: Option<Arc<Identity>>,
    /// `identity` as a URI, for metrics; empty without one.
    pub principal: Name,
    /// Runs a sidecar: reached through the HBONE tunnel.
    pub sidecar: bool,
    pub canonical_name: Name,
    pub canonical_revision: Name,
    pub services: Box<[ServiceBinding]>,
    /// Security policy, set for workloads of this proxy's own cluster:
    /// the Authorizations attached to this workload alone (by selector or
    /// target), and its PeerAuthentication mode.
    pub authorization_policies: Box<[Name]>,
    pub inbound_mtls: Mtls,
    /// The pod's labels, sorted by key, for subsets and sourceLabels.
    pub labels: Box<[(Name, Name)]>,
}

impl Profile {
    pub fn label(&self, key: &str) -> Option<&str> {
        label_in(&self.labels, key)
    }
}

/// The value of `key` in labels sorted by key.
pub fn label_in<'a>(labels: &'a [(Name, Name)], key: &str) -> Option<&'a str> {
    labels
        .binary_search_by(|(k, _)| (**k).cmp(key))
        .ok()
        .map(|at| &*labels[at].1)
}

/// How a workload takes plaintext, per PeerAuthentication.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Mtls {
    pub mode: mesh::MtlsMode,
    /// (workload port, mode), sorted.
    pub ports: Box<[(u16, mesh::MtlsMode)]>,
}

impl Mtls {
    /// The mode on `port`; `MtlsUnset` when no policy says.
    pub fn on(&self, port: u16) -> mesh::MtlsMode {
        self.ports
            .binary_search_by_key(&port, |(p, _)| *p)
            .map_or(self.mode, |at| self.ports[at].1)
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Workload {
    pub uid: Name,
    pub node: Name,
    /// The first address, kept inline: most pods have only one.
    pub address: IpAddr,
    pub healthy: bool,
    pub stale: bool,
    /// Its cluster is being drained: used only when nothing else is.
    pub draining: bool,
    /// What few pods have, out of line: one pointer, usually null, instead
    /// of 32 bytes in every workload (a tenth of what one costs).
    unusual: Option<Box<Unusual>>,
    pub profile: Arc<Profile>,
}

#[derive(Debug, PartialEq, Eq)]
struct Unusual {
    /// The pod's name, when it is not the last segment of `uid` (the
    /// usual `cluster/namespace/name`): see `name()`.
    own_name: Option<Name>,
    more_addresses: Box<[IpAddr]>,
}

impl Workload {
    pub fn name(&self) -> &str {
        match self.unusual.as_ref().and_then(|u| u.own_name.as_ref()) {
            Some(name) => name,
            None => self.uid.rsplit('/').next().unwrap_or_default(),
        }
    }

    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        let more = self
            .unusual
            .as_ref()
            .map_or(&[][..], |u| &u.more_addresses[..]);
        std::iter::once(self.address).chain(more.iter().copied())
    }

    /// The port a workload serves `service`'s `port` on, if it backs it there.
    pub fn target_port(&self, service: &Service, port: &ServicePort) -> Option<u16> {
        let binding = self
            .profile
            .services
            .iter()
            .find(|b| b.hostname == service.hostname)?;
        if binding.ports.is_empty() {
            return Some(nonzero_or(port.target_port, port.port));
        }
        binding
            .ports
            .iter()
            .find(|(service_port, _)| *service_port == port.port)
            .map(|(_, target)| nonzero_or(*target, nonzero_or(port.target_port, port.port)))
    }

    /// The name dashboards group by: the canonical (deployment) name when
    /// the control plane knows it, else the pod name.
    pub fn display_name(&self) -> Name {
        if self.profile.canonical_name.is_empty() {
            Name::from(self.name())
        } else {
            self.profile.canonical_name.clone()
        }
    }
}

fn nonzero_or(port: u16, fallback: u16) -> u16 {
    if port == 0 { fallback } else { port }
}

/// Stores each distinct value once. Values nothing else points to any more
/// are dropped by `prune`, which the owner calls after updates.
#[derive(Default, Clone)]
pub struct Interner {
    names: HashSet<Name>,
    profiles: HashSet<Arc<Profile>>,
    identities: HashSet<Arc<Identity>>,
    /// Sizes after the last prune: pruning waits until they double.
    pruned_at: usize,
}

/// The one shared copy of `value` in `set`, added if it is new.
fn shared<T: std::hash::Hash + Eq>(set: &mut HashSet<Arc<T>>, value: T) -> Arc<T> {
    if let Some(existing) = set.get(&value) {
        return existing.clone();
    }
    let added = Arc::new(value);
    set.insert(added.clone());
    added
}

impl Interner {
    pub fn name(&mut self, text: &str) -> Name {
        if let Some(name) = self.names.get(text) {
            return name.clone();
        }
        let name = Name::from(text);
        self.names.insert(name.clone());
        name
    }

    fn profile(&mut self, profile: Profile) -> Arc<Profile> {
        shared(&mut self.profiles, profile)
    }

    fn identity(&mut self, identity: Identity) -> Arc<Identity> {
        shared(&mut self.identities, identity)
    }

    pub fn len(&self) -> usize {
        self.names.len() + self.profiles.len() + self.identities.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forgets values held only here, once the set has doubled since the
    /// last time: churn (rollouts, new revisions) cannot grow it forever,
    /// and a steady mesh pays nothing.
    pub fn prune(&mut self) {
        if self.len() < (2 * self.pruned_at).max(1024) {
            return;
        }
        // Profiles first: they hold names.
        self.profiles.retain(|p| Arc::strong_count(p) > 1);
        self.identities.retain(|i| Arc::strong_count(i) > 1);
        self.names.retain(|n| n.holders() > 1);
        self.names.shrink_to_fit();
        self.profiles.shrink_to_fit();
        self.identities.shrink_to_fit();
        self.pruned_at = self.len();
    }
}

fn port16(name: &str, what: &str, port: u32) -> Result<u16, InvalidResource> {
    u16::try_from(port).map_err(|_| InvalidResource::Field {
        name: name.into(),
        reason: format!("{what} {port} is not a port number"),
    })
}

/// Decodes and checks a Workload; refusing here is what makes a bad push a
/// NACK instead of a broken proxy.
/// Decodes a resource and checks that it carries the name it was sent
/// under (`own` reads it).
pub fn decode_named<M: Message + Default>(
    name: &str,
    bytes: &[u8],
    own: impl Fn(&M) -> &str,
) -> Result<M, InvalidResource> {
    let resource = M::decode(bytes).map_err(|e| InvalidResource::Decode {
        name: name.into(),
        reason: e.to_string(),
    })?;
    if own(&resource) != name {
        return Err(InvalidResource::Name {
            name: name.into(),
            expected: own(&resource).to_string(),
        });
    }
    Ok(resource)
}

/// A resource's addresses; one of a length no address has refuses it.
pub fn addresses_of(name: &str, raw: &[Vec<u8>]) -> Result<Vec<IpAddr>, InvalidResource> {
    raw.iter()
        .map(|a| {
            ip_from_bytes(a).ok_or_else(|| InvalidResource::Address {
                name: name.into(),
                len: a.len(),
            })
        })
        .collect()
}

pub fn decode_workload(
    name: &str,
    bytes: &[u8],
    names: &mut Interner,
) -> Result<Workload, InvalidResource> {
    let workload: mesh::Workload = decode_named(name, bytes, |w: &mesh::Workload| &w.uid)?;
    let addresses = addresses_of(name, &workload.addresses)?;
    let Some((&address, more_addresses)) = addresses.split_first() else {
        return Err(InvalidResource::Field {
            name: name.into(),
            reason: "a workload needs at least one address".into(),
        });
    };
    let identity = workload
        .identity
        .as_ref()
        .map(|id| {
            Identity::new(&id.trust_domain, &id.namespace, &id.service_account).map_err(|e| {
                InvalidResource::Field {
                    name: name.into(),
                    reason: format!("identity: {e}"),
                }
            })
        })
        .transpose()?;
    let sidecar = workload.tunnel_protocol == mesh::TunnelProtocol::Hbone as i32;
    if sidecar && identity.is_none() {
        return Err(InvalidResource::Field {
            name: name.into(),
            reason: "a workload with a sidecar needs an identity".into(),
        });
    }
    let services = workload
        .services
        .iter()
        .map(|b| {
            Ok(ServiceBinding {
                hostname: names.name(&b.hostname),
                namespace: names.name(&b.namespace),
                ports: b
                    .ports
                    .iter()
                    .map(|m| {
                        Ok((
                            port16(name, "service port", m.service_port)?,
                            port16(name, "target port", m.target_port)?,
                        ))
                    })
                    .collect::<Result<_, InvalidResource>>()?,
            })
        })
        .collect::<Result<_, InvalidResource>>()?;
    let locality = workload.locality.unwrap_or_default();
    let mtls_mode = |mode: i32| {
        mesh::MtlsMode::try_from(mode).map_err(|_| InvalidResource::Field {
            name: name.into(),
            reason: format!("unknown mTLS mode {mode}"),
        })
    };
    let inbound_mtls = match &workload.inbound_mtls {
        None => Mtls::default(),
        Some(mtls) => {
            let mut ports = mtls
                .ports
                .iter()
                .map(|(port, mode)| Ok((port16(name, "mTLS port", *port)?, mtls_mode(*mode)?)))
                .collect::<Result<Vec<_>, InvalidResource>>()?;
            ports.sort();
            Mtls {
                mode: mtls_mode(mtls.mode)?,
                ports: ports.into(),
            }
        }
    };
    let authorization_policies = workload
        .authorization_policies
        .iter()
        .map(|policy| names.name(policy))
        .collect();
    let principal = names.name(&identity.as_ref().map(Identity::uri).unwrap_or_default());
    let identity = identity.map(|id| names.identity(id));
    let mut labels: Vec<(Name, Name)> = workload
        .labels
        .iter()
        .map(|(k, v)| (names.name(k), names.name(v)))
        .collect();
    labels.sort();
    let labels = labels.into_boxed_slice();
    let profile = Profile {
        namespace: names.name(&workload.namespace),
        cluster_id: names.name(&workload.cluster_id),
        network: names.name(&workload.network),
        locality: Locality {
            region: names.name(&locality.region),
            zone: names.name(&locality.zone),
            subzone: names.name(&locality.subzone),
        },
        identity,
        principal,
        sidecar,
        canonical_name: names.name(&workload.canonical_name),
        canonical_revision: names.name(&workload.canonical_revision),
        services,
        authorization_policies,
        inbound_mtls,
        labels,
    };
    let derivable = workload.uid.rsplit('/').next() == Some(workload.name.as_str());
    let unusual = (!derivable || !more_addresses.is_empty()).then(|| {
        Box::new(Unusual {
            own_name: (!derivable).then(|| Name::from(workload.name)),
            more_addresses: more_addresses.into(),
        })
    });
    Ok(Workload {
        uid: Name::from(workload.uid),
        node: names.name(&workload.node),
        address,
        healthy: workload.status == mesh::WorkloadStatus::Healthy as i32,
        stale: workload.stale,
        draining: workload.draining,
        unusual,
        profile: names.profile(profile),
    })
}

pub fn decode_service(
    name: &str,
    bytes: &[u8],
    names: &mut Interner,
) -> Result<Service, InvalidResource> {
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
    let vips = service
        .vips
        .iter()
        .map(|vip| {
            Ok(ClusterVip {
                cluster_id: names.name(&vip.cluster_id),
                network: names.name(&vip.network),
                address: ip_from_bytes(&vip.address).ok_or_else(|| InvalidResource::Address {
                    name: name.into(),
                    len: vip.address.len(),
                })?,
            })
        })
        .collect::<Result<_, InvalidResource>>()?;
    let ports = service
        .ports
        .iter()
        .map(|p| {
            Ok(ServicePort {
                port: port16(name, "port", p.port)?,
                name: names.name(&p.name),
                app_protocol: p.app_protocol(),
                target_port: port16(name, "target port", p.target_port)?,
            })
        })
        .collect::<Result<_, InvalidResource>>()?;
    Ok(Service {
        resource_name: Name::from(name),
        name: Name::from(service.name),
        namespace: names.name(&service.namespace),
        hostname: Name::from(service.hostname),
        vips,
        ports,
        cluster_local: service.cluster_local,
        clusters: service.clusters.iter().map(|c| names.name(c)).collect(),
        // A value this proxy does not know is today's default.
        affinity: mesh::Affinity::try_from(service.affinity).unwrap_or(mesh::Affinity::Local),
    })
}

#[cfg(test)]
pub mod fixtures {
    //! Resources for tests, built the way the control plane sends them.
    use super::*;

    use weft_xds_proto::testing;

    pub fn service_message() -> mesh::Service {
        let http = testing::port(80, "http", mesh::AppProtocol::Http, 8080);
        testing::service("demo", "echo", [10, 96, 0, 10], vec![http])
    }

    pub fn workload_message(uid: &str, ip: [u8; 4]) -> mesh::Workload {
        let binding = testing::binding("demo", "echo.demo.svc.cluster.local", &[(80, 8080)]);
        mesh::Workload {
            // Every test workload is in demo, whatever its uid says.
            namespace: "demo".into(),
            identity: Some(testing::identity("demo", "echo")),
            locality: Some(testing::locality("eu", "a")),
            ..testing::workload(uid, ip.to_vec(), "echo", vec![binding])
        }
    }

    pub fn service() -> Service {
        let bytes = service_message().encode_to_vec();
        decode_service(
            "demo/echo.demo.svc.cluster.local",
            &bytes,
            &mut Interner::default(),
        )
        .expect("a valid service")
    }

    pub fn workload(message: mesh::Workload, names: &mut Interner) -> Workload {
        let uid = message.uid.clone();
        decode_workload(&uid, &message.encode_to_vec(), names).expect("a valid workload")
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    #[test]
    fn invalid_resources_are_refused() {
        let names = &mut Interner::default();
        let good = workload_message("c1/demo/a", [10, 1, 0, 5]).encode_to_vec();
        assert!(decode_workload("c1/demo/a", &good, names).is_ok());
        assert!(matches!(
            decode_workload("c1/demo/other", &good, names),
            Err(InvalidResource::Name { .. })
        ));
        assert!(matches!(
            decode_workload("x", &[0xff, 0xff], names),
            Err(InvalidResource::Decode { .. })
        ));
        let mut bad = workload_message("c1/demo/a", [10, 1, 0, 5]);
        bad.addresses = vec![vec![1, 2, 3]];
        assert!(matches!(
            decode_workload("c1/demo/a", &bad.encode_to_vec(), names),
            Err(InvalidResource::Address { len: 3, .. })
        ));
        bad.addresses.clear();
        assert!(matches!(
            decode_workload("c1/demo/a", &bad.encode_to_vec(), names),
            Err(InvalidResource::Field { .. })
        ));
        let mut bad = workload_message("c1/demo/a", [10, 1, 0, 5]);
        bad.services[0].ports[0].target_port = 70_000;
        assert!(decode_workload("c1/demo/a", &bad.encode_to_vec(), names).is_err());
        let mut bad = workload_message("c1/demo/a", [10, 1, 0, 5]);
        bad.identity = None;
        assert!(
            decode_workload("c1/demo/a", &bad.encode_to_vec(), names).is_err(),
            "a sidecar without an identity cannot be verified"
        );
        let mut bad = workload_message("c1/demo/a", [10, 1, 0, 5]);
        if let Some(id) = bad.identity.as_mut() {
            id.namespace = "Not/Valid".into();
        }
        assert!(decode_workload("c1/demo/a", &bad.encode_to_vec(), names).is_err());

        let svc = service_message().encode_to_vec();
        assert!(decode_service("demo/echo.demo.svc.cluster.local", &svc, names).is_ok());
        assert!(decode_service("demo/wrong", &svc, names).is_err());
        let mut bad = service_message();
        bad.ports[0].port = 65_536;
        assert!(
            decode_service(
                "demo/echo.demo.svc.cluster.local",
                &bad.encode_to_vec(),
                names
            )
            .is_err()
        );
    }

    #[test]
    fn pods_of_one_deployment_share_their_profile_and_strings() {
        let names = &mut Interner::default();
        let a = workload(workload_message("c1/demo/a", [10, 1, 0, 5]), names);
        let b = workload(workload_message("c1/demo/b", [10, 1, 0, 6]), names);
        assert!(Arc::ptr_eq(&a.profile, &b.profile));
        assert_eq!(
            &*a.profile.principal,
            "spiffe://cluster.local/ns/demo/sa/echo"
        );
        let mut other = workload_message("c1/demo/c", [10, 1, 0, 7]);
        other.canonical_revision = "v2".into();
        let c = workload(other, names);
        assert!(!Arc::ptr_eq(&a.profile, &c.profile));
        assert!(a.profile.namespace.shares_with(&c.profile.namespace));
        let (ia, ic) = (a.profile.identity.as_ref(), c.profile.identity.as_ref());
        assert!(Arc::ptr_eq(ia.unwrap(), ic.unwrap()));
    }

    #[test]
    fn names_and_addresses_read_back() {
        let names = &mut Interner::default();
        // The usual pod keeps nothing out of line, and fits in 72 bytes
        // (what 10,000 of them cost: `cargo bench --bench snapshot`).
        let usual = workload(workload_message("c1/demo/a", [10, 1, 0, 5]), names);
        assert!(usual.unusual.is_none());
        assert!(std::mem::size_of::<Workload>() <= 72);
        let mut m = workload_message("c1/demo/a", [10, 1, 0, 5]);
        m.addresses.push(vec![0; 16]);
        let w = workload(m, names);
        assert_eq!(w.name(), "a");
        assert_eq!(
            w.addresses().collect::<Vec<_>>(),
            ["10.1.0.5".parse::<IpAddr>().unwrap(), "::".parse().unwrap()]
        );
        let mut m = workload_message("c1/demo/a", [10, 1, 0, 5]);
        m.name = "other".into();
        assert_eq!(workload(m, names).name(), "other");
        let mut m = workload_message("c1/demo/a", [10, 1, 0, 5]);
        m.name = String::new();
        assert_eq!(workload(m, names).name(), "");
    }

    #[test]
    fn pruning_forgets_what_nothing_uses() {
        let names = &mut Interner::default();
        let kept = workload(workload_message("c1/demo/kept", [10, 1, 0, 5]), names);
        for n in 0..600u32 {
            let mut m = workload_message(&format!("c1/demo/p{n}"), [10, 2, 0, 1]);
            m.canonical_revision = format!("rev-{n}");
            drop(workload(m, names));
        }
        assert!(names.len() >= 1200);
        names.prune();
        assert!(names.len() < 20, "{}", names.len());
        // What is still used stays shared.
        let again = workload(workload_message("c1/demo/again", [10, 1, 0, 6]), names);
        assert!(Arc::ptr_eq(&kept.profile, &again.profile));
    }

    #[test]
    fn target_ports_follow_bindings_then_the_service() {
        let names = &mut Interner::default();
        let service = service();
        let port = service.port(80).unwrap();
        let w = workload(workload_message("c1/demo/a", [10, 1, 0, 5]), names);
        assert_eq!(w.target_port(&service, port), Some(8080));
        let mut m = workload_message("c1/demo/b", [10, 1, 0, 6]);
        m.services[0].ports.clear();
        assert_eq!(workload(m, names).target_port(&service, port), Some(8080));
        let mut m = workload_message("c1/demo/c", [10, 1, 0, 7]);
        m.services[0].ports[0].service_port = 81;
        assert_eq!(workload(m, names).target_port(&service, port), None);
        let mut m = workload_message("c1/demo/d", [10, 1, 0, 8]);
        m.services[0].hostname = "other.demo.svc.cluster.local".into();
        assert_eq!(workload(m, names).target_port(&service, port), None);
    }
}
