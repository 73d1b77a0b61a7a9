//! Building blocks for `weft.mesh.v1` messages in tests and benchmarks,
//! written once so that a fixture reads as what it means: a workload in a
//! cluster, backing a service on some ports. Behind the `testing` feature.

use crate::mesh;

/// A SPIFFE identity in the `cluster.local` trust domain.
pub fn identity(namespace: &str, service_account: &str) -> mesh::Identity {
    mesh::Identity {
        trust_domain: "cluster.local".into(),
        namespace: namespace.into(),
        service_account: service_account.into(),
    }
}

pub fn locality(region: &str, zone: &str) -> mesh::Locality {
    mesh::Locality {
        region: region.into(),
        zone: zone.into(),
        subzone: String::new(),
    }
}

/// A workload's part in a service: (service port, target port) pairs.
pub fn binding(namespace: &str, hostname: &str, ports: &[(u32, u32)]) -> mesh::ServiceBinding {
    mesh::ServiceBinding {
        namespace: namespace.into(),
        hostname: hostname.into(),
        ports: ports
            .iter()
            .map(|&(service_port, target_port)| mesh::PortMapping {
                service_port,
                target_port,
            })
            .collect(),
    }
}

pub fn port(
    port: u32,
    name: &str,
    protocol: mesh::AppProtocol,
    target_port: u32,
) -> mesh::ServicePort {
    mesh::ServicePort {
        port,
        name: name.into(),
        app_protocol: protocol as i32,
        target_port,
    }
}

pub fn vip(cluster_id: &str, network: &str, address: [u8; 4]) -> mesh::ClusterVip {
    mesh::ClusterVip {
        cluster_id: cluster_id.into(),
        network: network.into(),
        address: address.to_vec(),
    }
}

/// A service `name.namespace.svc.cluster.local` with one VIP in `c1`.
pub fn service(
    namespace: &str,
    name: &str,
    vip_address: [u8; 4],
    ports: Vec<mesh::ServicePort>,
) -> mesh::Service {
    mesh::Service {
        name: name.into(),
        namespace: namespace.into(),
        hostname: format!("{name}.{namespace}.svc.cluster.local"),
        vips: vec![vip("c1", "n", vip_address)],
        ports,
        cluster_local: false,
        clusters: vec!["c1".into()],
        affinity: mesh::Affinity::Local as i32,
    }
}

/// A workload with a sidecar (`uid` is `cluster/namespace/name`), at
/// `address`, running as `service_account`, backing `bindings`.
pub fn workload(
    uid: &str,
    address: Vec<u8>,
    service_account: &str,
    bindings: Vec<mesh::ServiceBinding>,
) -> mesh::Workload {
    let mut parts = uid.splitn(3, '/');
    let cluster_id = parts.next().unwrap_or_default();
    let namespace = parts.next().unwrap_or_default();
    let name = parts.next().unwrap_or(uid);
    mesh::Workload {
        uid: uid.into(),
        name: name.into(),
        namespace: namespace.into(),
        cluster_id: cluster_id.into(),
        addresses: vec![address],
        identity: Some(identity(namespace, service_account)),
        tunnel_protocol: mesh::TunnelProtocol::Hbone as i32,
        services: bindings,
        ..Default::default()
    }
}

/// A healthy east-west gateway of `cluster` into `network` at `address`,
/// port 15008, running as `weft-system/weft-eastwest-gateway`.
pub fn gateway(cluster_id: &str, network: &str, address: [u8; 4]) -> mesh::NetworkGateway {
    mesh::NetworkGateway {
        name: format!("{cluster_id}/weft-system/weft-eastwest-gateway"),
        cluster_id: cluster_id.into(),
        network: network.into(),
        addresses: vec![address.to_vec()],
        hostname: String::new(),
        port: 15008,
        identities: vec![identity("weft-system", "weft-eastwest-gateway")],
        health: mesh::GatewayHealth::GatewayHealthy as i32,
    }
}
