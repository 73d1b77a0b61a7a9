//! Traffic policy in the model: each local VirtualService, HTTPRoute and
//! GRPCRoute is one `RouteSet`, each DestinationRule one
//! `DestinationPolicy`. An object weft refuses is not sent (its status
//! says why), so callers keep the routing they had without it. Whether
//! the backends an object names exist (a Service anywhere in the mesh, a
//! subset some DestinationRule defines) goes to its status: Istio's rule
//! "add the subset before the route that uses it".

use super::{Model, PolicyStatus};
use crate::cluster::{Key, Kind};
use crate::security::Written;
use crate::traffic::{Reference, Resource, TrafficInfo};

/// The resource name of a traffic object: routes are named by kind, since
/// a VirtualService and an HTTPRoute may share a name.
pub fn resource_name(kind: Kind, key: &Key) -> String {
    match kind {
        Kind::DestinationRule => format!("{}/{}", key.0, key.1),
        Kind::VirtualService => format!("virtualservice/{}/{}", key.0, key.1),
        Kind::GrpcRoute => format!("grpcroute/{}/{}", key.0, key.1),
        _ => format!("httproute/{}/{}", key.0, key.1),
    }
}

/// How a reference resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dangling {
    NoService(Reference),
    NoSubset(Reference),
}

impl std::fmt::Display for Dangling {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dangling::NoService(r) => write!(f, "{}: no Service {} in the mesh", r.at, r.host),
            Dangling::NoSubset(r) => write!(
                f,
                "{}: no DestinationRule defines subset {:?} of {} (add the subset before the route that uses it); its share is answered 503",
                r.at, r.subset, r.host
            ),
        }
    }
}

/// The references of `info` that resolve to nothing, given the mesh's
/// service hostnames and the subsets defined per host.
pub fn dangling<'a>(
    info: &TrafficInfo,
    has_service: impl Fn(&str) -> bool,
    subsets: impl Fn(&str) -> Vec<&'a str>,
) -> Vec<Dangling> {
    let mut out = Vec::new();
    for reference in &info.references {
        if !has_service(&reference.host) {
            out.push(Dangling::NoService(reference.clone()));
        } else if !reference.subset.is_empty()
            && !subsets(&reference.host).contains(&reference.subset.as_str())
        {
            out.push(Dangling::NoSubset(reference.clone()));
        }
    }
    out
}

impl Model {
    pub(super) fn touch_traffic(&mut self, kind: Kind, key: Key) {
        self.dirty_traffic.insert((kind, key));
    }

    fn traffic_info(&self, kind: Kind, key: &Key) -> Option<&TrafficInfo> {
        self.local_data()?
            .traffic
            .get(&(kind, key.clone()))
            .map(|i| &**i)
    }

    /// The resource a traffic object goes out as, if it is sent at all.
    pub(super) fn build_traffic(&self, kind: Kind, key: &Key) -> Option<Resource> {
        let info = self.traffic_info(kind, key)?;
        info.problems.is_empty().then(|| info.resource.clone())
    }

    /// Whether any cluster has the Service a hostname
    /// (`name.ns.svc.<suffix>`) names.
    fn service_exists(&self, hostname: &str) -> bool {
        let suffix = format!(".svc.{}", self.config.domain_suffix);
        let Some((name, namespace)) = hostname
            .strip_suffix(&suffix)
            .and_then(|short| short.split_once('.'))
        else {
            return false;
        };
        let key = (namespace.to_string(), name.to_string());
        self.clusters
            .values()
            .any(|state| state.data.services.contains_key(&key))
    }

    fn subsets_of(&self, host: &str) -> Vec<&str> {
        let Some(data) = self.local_data() else {
            return Vec::new();
        };
        data.traffic
            .iter()
            .filter(|((kind, _), info)| *kind == Kind::DestinationRule && info.problems.is_empty())
            .filter_map(|(_, info)| match &info.resource {
                Resource::Destination(d) if d.host == host => Some(d),
                _ => None,
            })
            .flat_map(|d| d.subsets.iter().map(|s| s.name.as_str()))
            .collect()
    }

    /// The Service parents a Gateway API route names, as written.
    pub fn route_parents(&self, kind: Kind, key: &Key) -> Vec<serde_json::Value> {
        self.traffic_info(kind, key)
            .map(|info| info.parents.clone())
            .unwrap_or_default()
    }

    /// What each traffic object's references resolve to.
    pub fn traffic_dangling(&self, kind: Kind, key: &Key) -> Vec<Dangling> {
        match self.traffic_info(kind, key) {
            Some(info) => dangling(info, |h| self.service_exists(h), |h| self.subsets_of(h)),
            None => Vec::new(),
        }
    }

    pub(super) fn traffic_statuses(&self) -> Vec<PolicyStatus> {
        let Some(data) = self.local_data() else {
            return Vec::new();
        };
        data.traffic
            .iter()
            .map(|((kind, key), info)| PolicyStatus {
                kind: *kind,
                key: key.clone(),
                wanted: traffic_condition(info, &self.traffic_dangling(*kind, key)),
                seen: info.status.clone(),
            })
            .collect()
    }

    /// Every traffic object's resource names and kinds, for the tables.
    pub(super) fn flush_traffic(&mut self, version: u64) -> bool {
        use bytes::Bytes;
        use prost::Message;
        let mut changed = false;
        let dirty: Vec<(Kind, Key)> = self.dirty_traffic.drain().collect();
        for (kind, key) in dirty {
            let name = resource_name(kind, &key);
            match self.build_traffic(kind, &key) {
                Some(Resource::Routes(routes)) => {
                    changed |= self.routes.upsert(
                        &name,
                        Some(Bytes::from(routes.encode_to_vec())),
                        version,
                    )
                }
                Some(Resource::Destination(policy)) => {
                    changed |= self.destinations.upsert(
                        &name,
                        Some(Bytes::from(policy.encode_to_vec())),
                        version,
                    )
                }
                None if kind == Kind::DestinationRule => {
                    changed |= self.destinations.upsert(&name, None, version)
                }
                None => changed |= self.routes.upsert(&name, None, version),
            }
        }
        changed
    }
}

/// The conditions a traffic object should show: `Accepted` (refused
/// objects are not applied) and `ResolvedRefs`.
pub fn traffic_condition(info: &TrafficInfo, dangling: &[Dangling]) -> Written {
    let (accepted, reason, message) = if info.problems.is_empty() {
        let mut message = "applied by the callers' sidecars".to_string();
        if !info.ignored.is_empty() {
            message.push_str(&format!(
                "; ignored (tuning weft does without): {}",
                info.ignored.join(", ")
            ));
        }
        (true, "Accepted", message)
    } else {
        (
            false,
            "UnsupportedValue",
            format!("not applied until fixed: {}", info.problems.join("; ")),
        )
    };
    let resolved = if dangling.is_empty() {
        (
            true,
            "ResolvedRefs".to_string(),
            "every reference resolves".to_string(),
        )
    } else {
        let reason = if dangling.iter().any(|d| matches!(d, Dangling::NoService(_))) {
            "BackendNotFound"
        } else {
            "SubsetNotFound"
        };
        (
            false,
            reason.to_string(),
            dangling
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("; "),
        )
    };
    Written {
        observed_generation: info.generation,
        accepted,
        reason: reason.into(),
        message,
        resolved: Some(resolved),
    }
}
