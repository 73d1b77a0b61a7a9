//! Networks and their east-west gateways, as a caller sees them. A
//! workload on this proxy's network is reached directly; one on another
//! network only through a healthy gateway of that network, and not at all
//! without one. The gateways arrive as `NetworkGateway` resources, checked
//! once here; a gateway known by hostname (a cloud load balancer) is
//! resolved here too, again once the answer is older than
//! `RESOLVE_EVERY`, keeping the last good answer while DNS fails.
//!
//! A gateway this proxy failed to reach is stepped around at once, for
//! `EJECTION`, without waiting for the control plane's probe: the probe
//! bounds how long a dead gateway is tried by every proxy, this bounds how
//! many requests one proxy sends into it.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weft_certs::Identity;
use weft_xds_proto::mesh::{self, GatewayHealth};

use crate::name::Name;
use crate::resources::{Interner, InvalidResource, Workload, addresses_of, decode_named};

/// How long a resolved gateway hostname is used before asking again.
pub const RESOLVE_EVERY: Duration = Duration::from_secs(30);
/// How long a gateway this proxy failed to reach is left out.
pub const EJECTION: Duration = Duration::from_secs(5);

/// An east-west gateway into `network`.
#[derive(Debug, PartialEq, Eq)]
pub struct Gateway {
    pub name: Name,
    pub cluster_id: Name,
    pub network: Name,
    pub addresses: Box<[IpAddr]>,
    /// Resolved when `addresses` is empty.
    pub hostname: Name,
    pub port: u16,
    /// Any of these may answer; each is checked as a SPIFFE identity on
    /// arrival.
    pub identities: Box<[Identity]>,
    /// Taken out by the control plane's probe.
    pub healthy: bool,
}

pub fn decode_gateway(
    name: &str,
    bytes: &[u8],
    names: &mut Interner,
) -> Result<Gateway, InvalidResource> {
    let invalid = |reason: String| InvalidResource::Field {
        name: name.into(),
        reason,
    };
    let g: mesh::NetworkGateway = decode_named(name, bytes, |g: &mesh::NetworkGateway| &g.name)?;
    let addresses: Box<[IpAddr]> = addresses_of(name, &g.addresses)?.into();
    if addresses.is_empty() && g.hostname.is_empty() {
        return Err(invalid("a gateway needs an address or a hostname".into()));
    }
    let port = u16::try_from(g.port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| invalid(format!("port {} out of range", g.port)))?;
    if g.network.is_empty() {
        return Err(invalid("a gateway needs a network".into()));
    }
    let identities = g
        .identities
        .iter()
        .map(|id| {
            Identity::new(&id.trust_domain, &id.namespace, &id.service_account)
                .map_err(|e| invalid(format!("identity: {e}")))
        })
        .collect::<Result<Box<[Identity]>, _>>()?;
    if identities.is_empty() {
        return Err(invalid("a gateway needs an identity to prove".into()));
    }
    Ok(Gateway {
        name: names.name(name),
        cluster_id: names.name(&g.cluster_id),
        network: names.name(&g.network),
        addresses,
        hostname: names.name(&g.hostname),
        port,
        identities,
        healthy: g.health != GatewayHealth::GatewayUnhealthy as i32,
    })
}

/// Whether `workload` is on `network` as far as routing cares: an empty
/// network on either side is the flat network of a mesh that names none.
pub fn same_network(network: &str, workload: &Workload) -> bool {
    network.is_empty()
        || workload.profile.network.is_empty()
        || *workload.profile.network == *network
}

/// The gateway that leads to `workload` from `network`, if it is
/// elsewhere and one is usable: healthy, not ejected here, not `excluded`
/// (already failed for this request); the one of the workload's own
/// cluster first, as it is the likeliest to be close to it.
pub fn gateway_to<'a>(
    gateways: &'a [Arc<Gateway>],
    workload: &Workload,
    ejected: &Ejections,
    excluded: &[Name],
) -> Option<&'a Arc<Gateway>> {
    let network = &workload.profile.network;
    let usable = |g: &&Arc<Gateway>| {
        g.network == *network && g.healthy && !excluded.contains(&g.name) && !ejected.holds(&g.name)
    };
    let mut candidates = gateways.iter().filter(usable);
    let first = candidates.next()?;
    if first.cluster_id == workload.profile.cluster_id {
        return Some(first);
    }
    Some(
        candidates
            .find(|g| g.cluster_id == workload.profile.cluster_id)
            .unwrap_or(first),
    )
}

/// Where a workload on `network`'s side is reached from here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reach<'a> {
    Direct,
    Through(&'a Arc<Gateway>),
    /// On another network with no usable gateway.
    Unreachable,
}

pub fn reach<'a>(
    network: &str,
    gateways: &'a [Arc<Gateway>],
    workload: &Workload,
    ejected: &Ejections,
    excluded: &[Name],
) -> Reach<'a> {
    if same_network(network, workload) {
        return Reach::Direct;
    }
    // Gateways forward only to sidecars' mesh port: a workload without a
    // sidecar on another network cannot be reached safely at all.
    if !workload.profile.sidecar {
        return Reach::Unreachable;
    }
    match gateway_to(gateways, workload, ejected, excluded) {
        Some(gateway) => Reach::Through(gateway),
        None => Reach::Unreachable,
    }
}

/// What each gateway weighs for a caller on `network`: the healthy
/// endpoints among `endpoints` behind it, summed over all their
/// localities. Each endpoint stays a candidate of its own, with its own
/// locality for failover order, so a gateway weighs exactly this much
/// when endpoints are chosen; the sum is what operators are shown.
pub fn gateway_weights<'a>(
    network: &str,
    gateways: &'a [Arc<Gateway>],
    endpoints: &[Arc<Workload>],
) -> Vec<(&'a Name, u32)> {
    let none = Ejections::default();
    let mut weights: Vec<(&'a Name, u32)> = Vec::new();
    for workload in endpoints.iter().filter(|w| w.healthy) {
        if let Reach::Through(gateway) = reach(network, gateways, workload, &none, &[]) {
            match weights.iter_mut().find(|(name, _)| **name == gateway.name) {
                Some((_, weight)) => *weight += 1,
                None => weights.push((&gateway.name, 1)),
            }
        }
    }
    weights
}

/// Gateways this proxy failed to reach, and until when they are left out.
#[derive(Debug, Default)]
pub struct Ejections(Mutex<Vec<(Name, Instant)>>);

impl Ejections {
    pub fn eject(&self, gateway: &Name) {
        let until = Instant::now() + EJECTION;
        let mut held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        held.retain(|(name, until)| name != gateway && *until > Instant::now());
        held.push((gateway.clone(), until));
    }

    pub fn holds(&self, gateway: &Name) -> bool {
        let held = self.0.lock().unwrap_or_else(|p| p.into_inner());
        held.iter()
            .any(|(name, until)| name == gateway && *until > Instant::now())
    }
}

/// Addresses of gateways known by hostname, resolved on demand.
#[derive(Debug, Default)]
pub struct Resolver {
    cache: Mutex<Vec<(Name, Instant, Vec<IpAddr>)>>,
}

impl Resolver {
    /// Where to connect to `gateway`: its addresses, or its hostname's,
    /// resolved again once the last answer is older than `RESOLVE_EVERY`.
    pub async fn addresses(&self, gateway: &Gateway) -> std::io::Result<Vec<SocketAddr>> {
        if !gateway.addresses.is_empty() {
            return Ok(gateway
                .addresses
                .iter()
                .map(|ip| SocketAddr::new(*ip, gateway.port))
                .collect());
        }
        let cached = {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache
                .iter()
                .find(|(host, _, _)| *host == gateway.hostname)
                .map(|(_, at, ips)| (at.elapsed() < RESOLVE_EVERY, ips.clone()))
        };
        if let Some((true, ips)) = &cached {
            return Ok(ips
                .iter()
                .map(|ip| SocketAddr::new(*ip, gateway.port))
                .collect());
        }
        match tokio::net::lookup_host((&*gateway.hostname, gateway.port)).await {
            Ok(found) => {
                let found: Vec<SocketAddr> = found.collect();
                let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
                cache.retain(|(host, _, _)| *host != gateway.hostname);
                cache.push((
                    gateway.hostname.clone(),
                    Instant::now(),
                    found.iter().map(|a| a.ip()).collect(),
                ));
                Ok(found)
            }
            // DNS failing is no reason to drop a gateway that answered.
            Err(err) => match cached {
                Some((_, ips)) if !ips.is_empty() => {
                    tracing::debug!(hostname = %gateway.hostname, %err, "re-resolving a gateway failed; keeping its last addresses");
                    Ok(ips
                        .iter()
                        .map(|ip| SocketAddr::new(*ip, gateway.port))
                        .collect())
                }
                _ => Err(err),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use prost::Message;
    use weft_xds_proto::testing;

    use super::*;
    use crate::resources::decode_workload;

    fn gateway(names: &mut Interner, cluster: &str, network: &str, healthy: bool) -> Arc<Gateway> {
        let mut g = testing::gateway(cluster, network, [192, 0, 2, 1]);
        if !healthy {
            g.health = GatewayHealth::GatewayUnhealthy as i32;
        }
        Arc::new(decode_gateway(&g.name.clone(), &g.encode_to_vec(), names).unwrap())
    }

    fn workload(names: &mut Interner, uid: &str, network: &str, sidecar: bool) -> Workload {
        let mut w = testing::workload(uid, vec![10, 2, 0, 1], "echo", Vec::new());
        w.network = network.into();
        if !sidecar {
            w.tunnel_protocol = mesh::TunnelProtocol::None as i32;
            w.identity = None;
        }
        decode_workload(uid, &w.encode_to_vec(), names).unwrap()
    }

    #[test]
    fn other_networks_are_reached_through_a_usable_gateway_of_the_workload_s_cluster_first() {
        let names = &mut Interner::default();
        let gateways = vec![
            gateway(names, "c3", "n2", true),
            gateway(names, "c2", "n2", true),
            gateway(names, "c4", "n4", false),
        ];
        let none = Ejections::default();
        let here = workload(names, "c1/demo/a", "n1", true);
        let there = workload(names, "c2/demo/b", "n2", true);
        let plain = workload(names, "c2/demo/p", "n2", false);
        let behind_dead = workload(names, "c4/demo/d", "n4", true);
        let flat = workload(names, "c9/demo/f", "", true);
        assert_eq!(reach("n1", &gateways, &here, &none, &[]), Reach::Direct);
        assert_eq!(reach("n1", &gateways, &flat, &none, &[]), Reach::Direct);
        assert_eq!(reach("", &gateways, &there, &none, &[]), Reach::Direct);
        assert_eq!(
            reach("n1", &gateways, &there, &none, &[]),
            Reach::Through(&gateways[1]),
            "the gateway of the workload's own cluster"
        );
        assert_eq!(
            reach("n1", &gateways, &there, &none, &[gateways[1].name.clone()]),
            Reach::Through(&gateways[0]),
            "another gateway into the network once that one failed"
        );
        let ejected = Ejections::default();
        ejected.eject(&gateways[1].name);
        ejected.eject(&gateways[0].name);
        assert_eq!(
            reach("n1", &gateways, &there, &ejected, &[]),
            Reach::Unreachable
        );
        assert_eq!(
            reach("n1", &gateways, &plain, &none, &[]),
            Reach::Unreachable
        );
        assert_eq!(
            reach("n1", &gateways, &behind_dead, &none, &[]),
            Reach::Unreachable,
            "a gateway the probe took out"
        );
    }

    #[test]
    fn a_gateway_weighs_its_healthy_endpoints_summed_over_localities() {
        let names = &mut Interner::default();
        let gateways = vec![gateway(names, "c1", "n1", true)];
        let mut endpoints = Vec::new();
        for (i, zone) in ["a", "a", "a", "b", "b"].iter().enumerate() {
            let mut w = testing::workload(
                &format!("c1/demo/e{i}"),
                vec![10, 1, 0, i as u8 + 1],
                "echo",
                Vec::new(),
            );
            w.network = "n1".into();
            w.locality = Some(testing::locality("eu", zone));
            endpoints.push(Arc::new(
                decode_workload(&w.uid.clone(), &w.encode_to_vec(), names).unwrap(),
            ));
        }
        let mut down = testing::workload("c1/demo/down", vec![10, 1, 0, 9], "echo", Vec::new());
        down.network = "n1".into();
        down.status = mesh::WorkloadStatus::Unhealthy as i32;
        endpoints.push(Arc::new(
            decode_workload("c1/demo/down", &down.encode_to_vec(), names).unwrap(),
        ));
        let weights = gateway_weights("n2", &gateways, &endpoints);
        assert_eq!(
            weights,
            vec![(&gateways[0].name, 5)],
            "3 in zone a and 2 in zone b weigh 5, not the first zone's 3"
        );
        assert!(
            gateway_weights("n1", &gateways, &endpoints).is_empty(),
            "no gateway on its own network"
        );
    }

    #[test]
    fn a_malformed_gateway_is_refused() {
        let names = &mut Interner::default();
        let good = testing::gateway("c2", "n2", [192, 0, 2, 1]);
        type Spoil = fn(&mut mesh::NetworkGateway);
        let cases: [(&str, Spoil); 5] = [
            ("needs an address or a hostname", |g| g.addresses.clear()),
            ("out of range", |g| g.port = 70_000),
            ("needs a network", |g| g.network.clear()),
            ("needs an identity", |g| g.identities.clear()),
            ("address of 3 bytes", |g| g.addresses = vec![vec![1, 2, 3]]),
        ];
        for (says, spoil) in cases {
            let mut g = good.clone();
            spoil(&mut g);
            let err = decode_gateway(&good.name, &g.encode_to_vec(), names).unwrap_err();
            assert!(err.to_string().contains(says), "{says}: {err}");
        }
        let err = decode_gateway("other", &good.encode_to_vec(), names).unwrap_err();
        assert!(matches!(err, InvalidResource::Name { .. }));
        assert!(decode_gateway(&good.name, b"\xff\xff", names).is_err());
    }

    #[tokio::test]
    async fn a_hostname_is_resolved_and_its_answer_kept() {
        let names = &mut Interner::default();
        let mut g = testing::gateway("c2", "n2", [192, 0, 2, 1]);
        g.addresses.clear();
        g.hostname = "localhost".into();
        let g = decode_gateway(&g.name.clone(), &g.encode_to_vec(), names).unwrap();
        let resolver = Resolver::default();
        let found = resolver.addresses(&g).await.unwrap();
        assert!(
            found
                .iter()
                .any(|a| a.ip().is_loopback() && a.port() == 15008),
            "{found:?}"
        );
        assert_eq!(resolver.cache.lock().unwrap().len(), 1);
    }
}
