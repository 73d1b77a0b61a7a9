//! East-west gateways: which Service leads into which network, how its
//! probe last went, and the `NetworkGateway` resources built from them.
//! Proxies only ever need the gateways of networks other than their own,
//! and every proxy this control plane serves is on its cluster's network:
//! the gateways of that network are shown, never sent.

use std::collections::BTreeSet;

use bytes::Bytes;
use prost::Message;
use weft_xds_proto::mesh::{self, GatewayHealth};

use super::{Model, ip_bytes};
use crate::cluster::{GatewayInfo, Key};

/// One gateway as `/debug/gateways` and the prober see it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct GatewayView {
    /// `<cluster>/<namespace>/<service>`.
    pub name: String,
    pub cluster: String,
    pub network: String,
    pub addresses: Vec<std::net::IpAddr>,
    pub hostname: String,
    pub port: u32,
    pub identity: String,
    /// `unknown`, `healthy` or `unhealthy`.
    pub health: &'static str,
    /// Sent to proxies: on another network, and usable.
    pub published: bool,
    /// Why it cannot be used, when it cannot.
    pub problem: Option<String>,
    /// What its last probe saw.
    pub probe: String,
}

pub fn health_name(health: GatewayHealth) -> &'static str {
    match health {
        GatewayHealth::GatewayUnknown => "unknown",
        GatewayHealth::GatewayHealthy => "healthy",
        GatewayHealth::GatewayUnhealthy => "unhealthy",
    }
}

fn gateway_name(cluster: &str, key: &Key) -> String {
    format!("{cluster}/{}/{}", key.0, key.1)
}

impl Model {
    /// Notes whether `key` is a gateway in any cluster now; called for
    /// each service rebuilt.
    pub(super) fn note_gateway(&mut self, key: &Key) {
        for (id, state) in &self.clusters {
            let entry = (id.clone(), key.clone());
            let is_gateway = state
                .data
                .services
                .get(key)
                .is_some_and(|s| s.gateway.is_some());
            let changed = if is_gateway {
                self.gateway_services.insert(entry)
            } else {
                self.gateway_services.remove(&entry)
            };
            // A gateway's Service changes rarely; any change to one is
            // worth a rebuild of the handful there are.
            self.gateways_dirty |= changed || is_gateway;
        }
        let before = self.gateway_services.len();
        self.gateway_services
            .retain(|(id, _)| self.clusters.contains_key(id));
        self.gateways_dirty |= before != self.gateway_services.len();
    }

    fn gateway_info(&self, cluster: &str, key: &Key) -> Option<&GatewayInfo> {
        self.clusters
            .get(cluster)?
            .data
            .services
            .get(key)?
            .gateway
            .as_deref()
    }

    /// What the probe last concluded about gateway `name`.
    pub fn gateway_health(&self, name: &str) -> GatewayHealth {
        self.gateway_health
            .get(name)
            .copied()
            .unwrap_or(GatewayHealth::GatewayUnknown)
    }

    /// The resource proxies get, if they should get one.
    fn build_gateway(&self, cluster: &str, key: &Key) -> Option<mesh::NetworkGateway> {
        let info = self.gateway_info(cluster, key)?;
        let name = gateway_name(cluster, key);
        let usable = info.problem.is_none() && info.network != self.local_network();
        usable.then(|| mesh::NetworkGateway {
            cluster_id: cluster.to_string(),
            network: info.network.clone(),
            addresses: info.addresses.iter().map(|ip| ip_bytes(*ip)).collect(),
            hostname: info.hostname.clone(),
            port: info.port,
            identities: vec![mesh::Identity {
                trust_domain: self.config.trust_domain.clone(),
                namespace: key.0.clone(),
                service_account: info.service_account.clone(),
            }],
            health: self.gateway_health(&name) as i32,
            name,
        })
    }

    /// Rebuilds the gateway table when anything it depends on changed.
    pub(super) fn flush_gateways(&mut self, version: u64) -> bool {
        if !std::mem::take(&mut self.gateways_dirty) {
            return false;
        }
        let mut changed = false;
        let mut live = BTreeSet::new();
        let entries: Vec<(String, Key)> = self.gateway_services.iter().cloned().collect();
        for (cluster, key) in entries {
            let name = gateway_name(&cluster, &key);
            let body = self
                .build_gateway(&cluster, &key)
                .map(|g| Bytes::from(g.encode_to_vec()));
            changed |= self.gateways.upsert(&name, body, version);
            live.insert(name);
        }
        let gone: Vec<String> = self
            .gateways
            .live()
            .map(|(name, _)| name.clone())
            .filter(|name| !live.contains(name))
            .collect();
        for name in gone {
            changed |= self.gateways.upsert(&name, None, version);
        }
        self.gateway_health.retain(|name, _| live.contains(name));
        self.gateway_probes.retain(|name, _| live.contains(name));
        changed
    }

    /// Records a probe's verdict and what it saw; a change of verdict
    /// reaches proxies on the next flush.
    pub fn set_gateway_health(&mut self, name: &str, health: GatewayHealth, seen: String) {
        self.gateway_probes.insert(name.to_string(), seen);
        if self.gateway_health(name) != health {
            self.gateway_health.insert(name.to_string(), health);
            self.gateways_dirty = true;
        }
    }

    /// Every gateway known, in every cluster.
    pub fn gateways(&self) -> Vec<GatewayView> {
        let local = self.local_network();
        self.gateway_services
            .iter()
            .filter_map(|(cluster, key)| {
                let info = self.gateway_info(cluster, key)?;
                let name = gateway_name(cluster, key);
                Some(GatewayView {
                    cluster: cluster.clone(),
                    network: info.network.clone(),
                    addresses: info.addresses.clone(),
                    hostname: info.hostname.clone(),
                    port: info.port,
                    identity: format!(
                        "spiffe://{}/ns/{}/sa/{}",
                        self.config.trust_domain, key.0, info.service_account
                    ),
                    health: health_name(self.gateway_health(&name)),
                    published: info.problem.is_none() && info.network != local,
                    problem: info.problem.clone(),
                    probe: self.gateway_probes.get(&name).cloned().unwrap_or_default(),
                    name,
                })
            })
            .collect()
    }

    /// This control plane's own network: its proxies are all on it.
    pub fn local_network(&self) -> String {
        self.network_of(&self.config.local_cluster)
    }
}
