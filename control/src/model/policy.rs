//! Security policy in the model: which `Authorization` resources exist,
//! and, per workload of the local cluster, which of them apply and what
//! mTLS mode it runs with. Policy is read from the local cluster only.

use std::collections::BTreeMap;

use weft_xds_proto::mesh;

use super::Model;
use crate::cluster::{Key, Kind};
use crate::security::authorization::{self, AuthorizationInfo};
use crate::security::peer_authentication::{self, PeerAuthenticationInfo};
use crate::security::{self, Attachment, Written};

/// A policy's `Accepted` condition as it should be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyStatus {
    pub kind: Kind,
    pub key: Key,
    pub wanted: Written,
    pub seen: Option<Written>,
}

impl Model {
    pub(super) fn local_data(&self) -> Option<&super::cluster_data::ClusterData> {
        self.clusters
            .get(&self.config.local_cluster)
            .map(|state| &state.data)
    }

    /// A policy in `namespace` changed: the workloads it may attach to
    /// are rebuilt (those whose resource is unchanged push nothing).
    pub(super) fn touch_policy(&mut self, kind: Kind, key: Key) {
        if kind.is_traffic() {
            return self.touch_traffic(kind, key);
        }
        if kind == Kind::Authorization {
            self.dirty_authorizations.insert(key.clone());
        }
        let root = key.0 == self.config.root_namespace;
        let local = self.config.local_cluster.clone();
        let Some(data) = self.local_data() else {
            return;
        };
        let pods: Vec<Key> = data
            .pods
            .keys()
            .filter(|(ns, _)| root || *ns == key.0)
            .cloned()
            .collect();
        for pod in pods {
            self.dirty_pods.insert((local.clone(), pod));
        }
    }

    pub(super) fn build_authorization(&self, key: &Key) -> Option<mesh::Authorization> {
        let info = self.local_data()?.authorizations.get(key)?;
        let scope = security::scope(&key.0, &info.attachment, &self.config.root_namespace);
        Some(authorization::resource(&key.0, &key.1, scope, info))
    }

    /// Whether an Authorization with a selector or targets applies to a
    /// pod of the local cluster (those without are the proxy's to match).
    fn attaches(&self, policy: &Key, info: &AuthorizationInfo, pod: &Key) -> bool {
        let Some(data) = self.local_data() else {
            return false;
        };
        let Some(labels) = data.pods.get(pod).map(|p| &p.labels) else {
            return false;
        };
        let backs = |service: &str| {
            data.slices_by_pod
                .get(pod)
                .into_iter()
                .flatten()
                .any(|slice| {
                    data.slices
                        .get(&(pod.0.clone(), slice.clone()))
                        .is_some_and(|s| s.service == service)
                })
        };
        info.attachment != Attachment::All
            && security::applies(
                &policy.0,
                &info.attachment,
                &self.config.root_namespace,
                &pod.0,
                labels,
                backs,
            )
    }

    /// What a local pod's Workload says of security policy: the
    /// Authorizations attached to it alone, and its mTLS mode.
    pub(super) fn workload_policy(&self, pod: &Key) -> (Vec<String>, Option<mesh::InboundMtls>) {
        let Some(data) = self.local_data() else {
            return (Vec::new(), None);
        };
        let mut names: Vec<String> = data
            .authorizations
            .iter()
            .filter(|(policy, info)| self.attaches(policy, info, pod))
            .map(|((ns, name), _)| format!("{ns}/{name}"))
            .collect();
        names.sort();
        let labels = data.pods.get(pod).map(|p| &p.labels);
        let empty = BTreeMap::new();
        let mtls = peer_authentication::effective(
            &pod.0,
            labels.unwrap_or(&empty),
            &self.config.root_namespace,
            data.peer_authentications.iter().map(|(k, v)| (k, &**v)),
        );
        let set = mtls.mode != mesh::MtlsMode::MtlsUnset as i32 || !mtls.ports.is_empty();
        (names, set.then_some(mtls))
    }

    /// Every policy's condition, as it should be and as last seen.
    pub fn policy_statuses(&self) -> Vec<PolicyStatus> {
        let Some(data) = self.local_data() else {
            return Vec::new();
        };
        let authorizations = data.authorizations.iter().map(|(key, info)| PolicyStatus {
            kind: Kind::Authorization,
            key: key.clone(),
            wanted: authorization_condition(info),
            seen: info.status.clone(),
        });
        let root = &self.config.root_namespace;
        let peers = data
            .peer_authentications
            .iter()
            .map(|(key, info)| PolicyStatus {
                kind: Kind::PeerAuthentication,
                key: key.clone(),
                wanted: peer_condition(
                    info,
                    peer_authentication::ignored_in_root(info, &key.0, root),
                ),
                seen: info.status.clone(),
            });
        let mut all: Vec<PolicyStatus> = authorizations.chain(peers).collect();
        all.extend(self.traffic_statuses());
        all
    }
}

fn condition(generation: i64, accepted: bool, reason: &str, message: String) -> Written {
    Written {
        observed_generation: generation,
        accepted,
        reason: reason.into(),
        message,
        resolved: None,
    }
}

fn authorization_condition(info: &AuthorizationInfo) -> Written {
    if info.problems.is_empty() {
        let how = if info.dry_run {
            "evaluated in dry-run: logged and counted, not enforced"
        } else {
            "enforced by the destination's sidecar"
        };
        condition(info.generation, true, "Accepted", how.into())
    } else {
        condition(
            info.generation,
            false,
            "UnsupportedValue",
            format!(
                "denies every request to its workloads (fail closed) until fixed: {}",
                info.problems.join("; ")
            ),
        )
    }
}

fn peer_condition(info: &PeerAuthenticationInfo, ignored_in_root: bool) -> Written {
    if ignored_in_root {
        return condition(
            info.generation,
            false,
            "Ignored",
            "a policy with a selector in the root namespace applies to no workload".into(),
        );
    }
    if info.problems.is_empty() {
        condition(info.generation, true, "Accepted", "in effect".into())
    } else {
        condition(
            info.generation,
            false,
            "UnsupportedValue",
            info.problems.join("; "),
        )
    }
}
