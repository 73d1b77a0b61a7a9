//! Istio's `PeerAuthentication` read, and resolved to the mode one workload
//! runs with: the most specific policy wins (a workload selector over its
//! namespace over the mesh, the root namespace), the oldest of equals wins,
//! UNSET inherits from the level above, and `portLevelMtls` overrides a
//! workload policy per port.

use std::collections::BTreeMap;

use serde_json::Value;
use weft_xds_proto::mesh::{self, MtlsMode};

use super::Problems;

/// (namespace, name).
type Key = (String, String);

#[derive(Clone, Debug, PartialEq)]
pub struct PeerAuthenticationInfo {
    pub generation: i64,
    pub created: String,
    pub selector: Option<BTreeMap<String, String>>,
    pub mode: MtlsMode,
    pub ports: BTreeMap<u32, MtlsMode>,
    /// Why (part of) the policy is not taken as written.
    pub problems: Vec<String>,
    pub status: Option<super::Written>,
}

fn mode(at: &str, value: &Value, problems: &mut Problems) -> MtlsMode {
    problems.unknown_fields(at, value, &["mode"]);
    match value["mode"].as_str().unwrap_or("UNSET") {
        "UNSET" => MtlsMode::MtlsUnset,
        "PERMISSIVE" => MtlsMode::Permissive,
        "STRICT" => MtlsMode::Strict,
        "DISABLE" => MtlsMode::Disable,
        other => {
            // Fail closed: a mode weft cannot read is taken as STRICT.
            problems.add(
                &format!("{at}.mode"),
                format!("unknown mode {other:?}; enforced as STRICT"),
            );
            MtlsMode::Strict
        }
    }
}

pub fn read(object: &Value) -> PeerAuthenticationInfo {
    let spec = &object["spec"];
    let mut problems = Problems::default();
    problems.unknown_fields("spec", spec, &["selector", "mtls", "portLevelMtls"]);
    let selector = super::match_labels("spec.selector", &spec["selector"], &mut problems);
    let mtls = mode("spec.mtls", &spec["mtls"], &mut problems);
    let mut ports = BTreeMap::new();
    if let Some(levels) = spec["portLevelMtls"].as_object() {
        if selector.is_none() {
            problems.add(
                "spec.portLevelMtls",
                "ignored: port-level modes need a workload selector",
            );
        } else {
            for (port, level) in levels {
                let at = format!("spec.portLevelMtls[{port}]");
                match port.parse::<u32>().ok().filter(|p| (1..=65535).contains(p)) {
                    Some(number) => {
                        ports.insert(number, mode(&at, level, &mut problems));
                    }
                    None => problems.add(&at, "not a port number"),
                }
            }
        }
    }
    let meta = &object["metadata"];
    PeerAuthenticationInfo {
        generation: meta["generation"].as_i64().unwrap_or(0),
        created: meta["creationTimestamp"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        selector,
        mode: mtls,
        ports,
        problems: problems.into_list(),
        status: super::written(object),
    }
}

/// Whether the policy applies to nobody because of where it is: a
/// selector in the root namespace.
pub fn ignored_in_root(info: &PeerAuthenticationInfo, namespace: &str, root: &str) -> bool {
    namespace == root && info.selector.is_some()
}

/// The mode a workload in `namespace` with `labels` runs with, given every
/// PeerAuthentication of its cluster.
pub fn effective<'a>(
    namespace: &str,
    labels: &BTreeMap<String, String>,
    root: &str,
    policies: impl Iterator<Item = (&'a Key, &'a PeerAuthenticationInfo)>,
) -> mesh::InboundMtls {
    // Per level, the oldest policy (then the first by name) wins.
    let mut levels: [Option<(&str, &str, &PeerAuthenticationInfo)>; 3] = [None; 3];
    for ((ns, name), info) in policies {
        let level = match &info.selector {
            Some(_) if ns == root => continue,
            Some(selector) if ns == namespace && super::selects(selector, labels) => 0,
            Some(_) => continue,
            None if ns == namespace => 1,
            None if ns == root => 2,
            None => continue,
        };
        let candidate = (info.created.as_str(), name.as_str(), info);
        let slot = &mut levels[level];
        if slot.is_none_or(|(created, name, _)| (candidate.0, candidate.1) < (created, name)) {
            *slot = Some(candidate);
        }
    }
    let inherited = levels
        .iter()
        .flatten()
        .map(|(_, _, info)| info.mode)
        .find(|mode| *mode != MtlsMode::MtlsUnset)
        .unwrap_or(MtlsMode::MtlsUnset);
    let ports = levels[0]
        .map(|(_, _, info)| {
            info.ports
                .iter()
                .map(|(port, mode)| {
                    let mode = if *mode == MtlsMode::MtlsUnset {
                        inherited
                    } else {
                        *mode
                    };
                    (*port, mode as i32)
                })
                .collect()
        })
        .unwrap_or_default();
    mesh::InboundMtls {
        mode: inherited as i32,
        ports,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(ns: &str, name: &str, created: &str, spec: Value) -> (Key, PeerAuthenticationInfo) {
        let object = json!({"metadata": {"name": name, "namespace": ns, "creationTimestamp": created}, "spec": spec});
        ((ns.into(), name.into()), read(&object))
    }

    fn labels(app: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("app".to_string(), app.to_string())])
    }

    fn resolve(
        policies: &[(Key, PeerAuthenticationInfo)],
        ns: &str,
        app: &str,
    ) -> mesh::InboundMtls {
        effective(
            ns,
            &labels(app),
            "weft-system",
            policies.iter().map(|(k, v)| (k, v)),
        )
    }

    const T1: &str = "2026-01-01T00:00:00Z";
    const T2: &str = "2026-01-02T00:00:00Z";

    #[test]
    fn the_most_specific_level_wins_and_unset_inherits() {
        let policies = vec![
            policy(
                "weft-system",
                "mesh",
                T1,
                json!({"mtls": {"mode": "STRICT"}}),
            ),
            policy("demo", "ns", T1, json!({"mtls": {"mode": "PERMISSIVE"}})),
            policy(
                "demo",
                "echo",
                T1,
                json!({"selector": {"matchLabels": {"app": "echo"}}, "mtls": {"mode": "UNSET"},
                       "portLevelMtls": {"9000": {"mode": "DISABLE"}, "8080": {"mode": "UNSET"}}}),
            ),
        ];
        let echo = resolve(&policies, "demo", "echo");
        assert_eq!(
            echo.mode,
            MtlsMode::Permissive as i32,
            "UNSET inherits the namespace's"
        );
        assert_eq!(echo.ports[&9000], MtlsMode::Disable as i32);
        assert_eq!(echo.ports[&8080], MtlsMode::Permissive as i32);
        let other = resolve(&policies, "demo", "other");
        assert_eq!(other.mode, MtlsMode::Permissive as i32);
        assert!(other.ports.is_empty());
        let elsewhere = resolve(&policies, "prod", "echo");
        assert_eq!(
            elsewhere.mode,
            MtlsMode::Strict as i32,
            "the mesh-wide policy"
        );
        assert_eq!(
            resolve(&[], "demo", "echo").mode,
            MtlsMode::MtlsUnset as i32
        );
    }

    #[test]
    fn the_oldest_of_equals_wins_and_a_root_selector_is_ignored() {
        let policies = vec![
            policy("demo", "newer", T2, json!({"mtls": {"mode": "DISABLE"}})),
            policy("demo", "older", T1, json!({"mtls": {"mode": "STRICT"}})),
            policy(
                "weft-system",
                "picky",
                T1,
                json!({"selector": {"matchLabels": {"app": "echo"}}, "mtls": {"mode": "DISABLE"}}),
            ),
        ];
        assert_eq!(
            resolve(&policies, "demo", "echo").mode,
            MtlsMode::Strict as i32
        );
        assert!(ignored_in_root(
            &policies[2].1,
            "weft-system",
            "weft-system"
        ));
        assert_eq!(
            resolve(&policies, "prod", "echo").mode,
            MtlsMode::MtlsUnset as i32
        );
    }

    #[test]
    fn unreadable_modes_fail_closed_and_port_levels_need_a_selector() {
        let (_, bad) = policy("demo", "bad", T1, json!({"mtls": {"mode": "STRICTEST"}}));
        assert_eq!(bad.mode, MtlsMode::Strict);
        assert!(
            bad.problems[0].starts_with("spec.mtls.mode"),
            "{:?}",
            bad.problems
        );
        let (_, no_selector) = policy(
            "demo",
            "ports",
            T1,
            json!({"portLevelMtls": {"8080": {"mode": "DISABLE"}}}),
        );
        assert!(no_selector.ports.is_empty());
        assert!(no_selector.problems[0].starts_with("spec.portLevelMtls"));
    }
}
