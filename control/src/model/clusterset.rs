//! The clusterset service of the MCS API: a Service exported
//! (`ServiceExport`) from one or more clusters becomes
//! `<svc>.<ns>.svc.clusterset.local`, served by the exporting clusters'
//! endpoints at one clusterset VIP, with the union of their ports.
//! Exports that disagree are resolved as KEP-1645 says: the oldest export
//! wins, and every export of the service is told of the conflict.

use std::net::IpAddr;

use weft_xds_proto::mesh;

use super::Model;
use super::translate::{ip_bytes, service_ports};
use crate::cluster::{Key, ServicePortInfo};
use crate::mcs::{self, CLUSTERSET_DOMAIN, Condition};

/// What the exports of one service add up to.
#[derive(Debug)]
pub(super) struct ClusterSet {
    /// Clusters that export it and have the Service, oldest export first.
    pub(super) exporters: Vec<String>,
    /// The union of their ports; where two disagree, the older export's.
    pub(super) ports: Vec<ServicePortInfo>,
    pub(super) headless: bool,
    /// Each disagreement: what, which cluster won, and why.
    pub(super) conflicts: Vec<String>,
}

/// A ServiceImport as this cluster should hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceImportView {
    pub key: Key,
    pub headless: bool,
    pub ports: Vec<ServicePortInfo>,
    /// The clusterset VIP (none when headless).
    pub vip: Option<IpAddr>,
    pub clusters: Vec<String>,
}

impl ServiceImportView {
    /// The object's `spec` and `status`, as the KEP words them.
    pub fn spec_and_status(&self) -> (serde_json::Value, serde_json::Value) {
        let ports: Vec<serde_json::Value> = self
            .ports
            .iter()
            .map(|p| {
                let mut port = serde_json::json!({"port": p.port, "protocol": "TCP"});
                if !p.name.is_empty() {
                    port["name"] = p.name.clone().into();
                }
                if let Some(app) = app_protocol_name(p.protocol) {
                    port["appProtocol"] = app.into();
                }
                port
            })
            .collect();
        let mut spec = serde_json::json!({
            "type": if self.headless { "Headless" } else { "ClusterSetIP" },
            "ports": ports,
        });
        if let Some(vip) = self.vip {
            spec["ips"] = serde_json::json!([vip.to_string()]);
        }
        let clusters: Vec<serde_json::Value> = self
            .clusters
            .iter()
            .map(|c| serde_json::json!({"cluster": c}))
            .collect();
        (spec, serde_json::json!({"clusters": clusters}))
    }
}

fn app_protocol_name(protocol: mesh::AppProtocol) -> Option<&'static str> {
    match protocol {
        mesh::AppProtocol::Http => Some("http"),
        mesh::AppProtocol::Http2 => Some("kubernetes.io/h2c"),
        mesh::AppProtocol::Grpc => Some("grpc"),
        mesh::AppProtocol::Tcp => Some("tcp"),
        _ => None,
    }
}

/// The conditions one of this cluster's ServiceExports should show.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportStatus {
    pub key: Key,
    pub generation: i64,
    pub wanted: Vec<Condition>,
    pub seen: Vec<Condition>,
}

fn condition(kind: &str, status: bool, reason: &str, message: String) -> Condition {
    Condition {
        kind: kind.into(),
        status,
        reason: reason.into(),
        message,
    }
}

impl Model {
    pub(super) fn clusterset_hostname(key: &Key) -> String {
        format!("{}.{}.svc.{CLUSTERSET_DOMAIN}", key.1, key.0)
    }

    /// Whether cluster `id` exports `key` and has the Service to export.
    pub(super) fn exports(&self, id: &str, key: &Key) -> bool {
        self.clusters
            .get(id)
            .is_some_and(|c| c.data.exports.contains_key(key) && c.data.services.contains_key(key))
    }

    /// What the exports of `key` add up to; `None` when no cluster
    /// exports a Service by that name.
    pub(super) fn clusterset(&self, key: &Key) -> Option<ClusterSet> {
        let mut exporters: Vec<(&str, &str)> = self
            .clusters
            .iter()
            .filter(|(id, _)| self.exports(id, key))
            .filter_map(|(id, state)| {
                let export = state.data.exports.get(key)?;
                Some((export.created.as_str(), id.as_str()))
            })
            .collect();
        // Oldest first; the same second falls back on the cluster's name,
        // so that every control plane decides alike.
        exporters.sort();
        let mut ports: Vec<ServicePortInfo> = Vec::new();
        let mut conflicts = Vec::new();
        let mut headless = None;
        let mut oldest_headless = String::new();
        for (_, id) in &exporters {
            let Some(service) = self
                .clusters
                .get(*id)
                .and_then(|c| c.data.services.get(key))
            else {
                continue;
            };
            let this_headless = service.vip.is_none();
            match headless {
                None => {
                    headless = Some(this_headless);
                    oldest_headless = id.to_string();
                }
                Some(h) if h != this_headless => conflicts.push(format!(
                    "headlessness: {id}'s Service is {} but {oldest_headless}'s, the oldest export, is {}; {oldest_headless}'s is used",
                    if this_headless { "headless" } else { "not headless" },
                    if h { "headless" } else { "not headless" },
                )),
                Some(_) => {}
            }
            for port in &service.ports {
                match ports
                    .iter()
                    .find(|p| p.port == port.port || (!p.name.is_empty() && p.name == port.name))
                {
                    None => ports.push(port.clone()),
                    Some(kept)
                        if kept.name == port.name
                            && kept.port == port.port
                            && kept.protocol == port.protocol => {}
                    Some(kept) => {
                        let winner = exporters
                            .iter()
                            .map(|(_, c)| *c)
                            .find(|c| {
                                self.clusters
                                    .get(*c)
                                    .and_then(|s| s.data.services.get(key))
                                    .is_some_and(|s| s.ports.contains(kept))
                            })
                            .unwrap_or("an older export");
                        conflicts.push(format!(
                            "port {}: {id} has {} where {winner}, the oldest export, has {}; {winner}'s is used",
                            if port.name.is_empty() { port.port.to_string() } else { port.name.clone() },
                            describe(port),
                            describe(kept),
                        ));
                    }
                }
            }
        }
        let headless = headless?;
        Some(ClusterSet {
            exporters: exporters
                .into_iter()
                .map(|(_, id)| id.to_string())
                .collect(),
            ports,
            headless,
            conflicts,
        })
    }

    /// The clusterset service proxies here receive for `key`.
    pub(super) fn build_clusterset_service(
        &self,
        key: &Key,
        vip: Option<IpAddr>,
    ) -> Option<mesh::Service> {
        let set = self.clusterset(key)?;
        let local = &self.config.local_cluster;
        let affinity = self
            .clusters
            .get(local)
            .and_then(|c| c.data.services.get(key))
            .or_else(|| {
                let first = set.exporters.first()?;
                self.clusters.get(first)?.data.services.get(key)
            })
            .and_then(|s| s.affinity);
        Some(mesh::Service {
            name: key.1.clone(),
            namespace: key.0.clone(),
            hostname: Self::clusterset_hostname(key),
            vips: vip
                .filter(|_| !set.headless)
                .map(|vip| mesh::ClusterVip {
                    cluster_id: local.clone(),
                    network: self.network_of(local),
                    address: ip_bytes(vip),
                })
                .into_iter()
                .collect(),
            ports: service_ports(&set.ports),
            cluster_local: false,
            clusters: set.exporters,
            affinity: affinity.unwrap_or(mesh::Affinity::Local) as i32,
        })
    }

    /// The clusterset VIP of `key`: allocated while some cluster exports
    /// it, released when none does.
    pub(super) fn clusterset_vip(&mut self, key: &Key) -> Option<IpAddr> {
        if self.clusters.keys().any(|id| self.exports(id, key)) {
            self.clusterset_vips.allocate(key)
        } else {
            self.clusterset_vips.release(key);
            None
        }
    }

    /// The ServiceImports this cluster should hold: one per exported
    /// service whose namespace exists here.
    pub fn service_imports(&self) -> Vec<ServiceImportView> {
        let local = self.clusters.get(&self.config.local_cluster);
        let mut keys: Vec<&Key> = self
            .clusters
            .values()
            .flat_map(|c| c.data.exports.keys())
            .collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter(|key| local.is_some_and(|c| c.data.namespaces.contains_key(&key.0)))
            .filter_map(|key| {
                let set = self.clusterset(key)?;
                Some(ServiceImportView {
                    key: key.clone(),
                    headless: set.headless,
                    ports: set.ports,
                    vip: self.clusterset_vips.get(key).filter(|_| !set.headless),
                    clusters: set.exporters,
                })
            })
            .collect()
    }

    /// The conditions of this cluster's own ServiceExports.
    pub fn export_statuses(&self) -> Vec<ExportStatus> {
        let Some(local) = self.clusters.get(&self.config.local_cluster) else {
            return Vec::new();
        };
        local
            .data
            .exports
            .iter()
            .map(|(key, export)| {
                let service = format!("{}/{}", key.0, key.1);
                let wanted = match self.clusterset(key) {
                    _ if !local.data.services.contains_key(key) => vec![
                        condition(
                            mcs::CONDITION_VALID,
                            false,
                            "NoService",
                            format!("there is no Service {service} in this cluster to export"),
                        ),
                        condition(mcs::CONDITION_CONFLICT, false, "NoConflicts", String::new()),
                    ],
                    Some(set) => vec![
                        condition(
                            mcs::CONDITION_VALID,
                            true,
                            "Exported",
                            format!(
                                "{service} is served as {} by {}{}",
                                Self::clusterset_hostname(key),
                                set.exporters.join(", "),
                                if export.ignored.is_empty() {
                                    String::new()
                                } else {
                                    format!("; {} {}", export.ignored.join(", "), mcs::IGNORED)
                                }
                            ),
                        ),
                        if set.conflicts.is_empty() {
                            condition(mcs::CONDITION_CONFLICT, false, "NoConflicts", String::new())
                        } else {
                            let reason = if set.conflicts.iter().all(|c| c.starts_with("port")) {
                                "PortConflict"
                            } else {
                                "Conflict"
                            };
                            condition(
                                mcs::CONDITION_CONFLICT,
                                true,
                                reason,
                                set.conflicts.join("; "),
                            )
                        },
                    ],
                    None => Vec::new(),
                };
                ExportStatus {
                    key: key.clone(),
                    generation: export.generation,
                    wanted,
                    seen: export.seen.clone(),
                }
            })
            .filter(|s| !s.wanted.is_empty())
            .collect()
    }
}

fn describe(port: &ServicePortInfo) -> String {
    let name = if port.name.is_empty() {
        "unnamed"
    } else {
        &port.name
    };
    let protocol = app_protocol_name(port.protocol).unwrap_or("unspecified");
    format!("{name} {} ({protocol})", port.port)
}
