//! Security policy from Istio's `security.istio.io` kinds, read from the
//! control plane's own cluster: each cluster's policy governs its own
//! workloads, as in an Istio multi-primary mesh. `authorization` and
//! `peer_authentication` read one kind each (`policy_status`, beside this
//! module, writes back what was accepted and what was refused). Here:
//! what both kinds share (where a policy attaches, how problems are named,
//! the condition written). Nothing here depends on the rest of the
//! control plane.

pub mod authorization;
pub mod peer_authentication;

use std::collections::BTreeMap;

use kube::api::ApiResource;
use serde_json::Value;
use weft_xds_proto::mesh;

/// The API group and version weft watches; v1beta1 objects are served
/// as v1 by the API server (the CRDs in examples/install serve both).
pub const GROUP: &str = "security.istio.io";
pub const VERSION: &str = "v1";

pub fn api_resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: VERSION.into(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

pub fn authorization_policies() -> ApiResource {
    api_resource("AuthorizationPolicy", "authorizationpolicies")
}

pub fn peer_authentications() -> ApiResource {
    api_resource("PeerAuthentication", "peerauthentications")
}

/// What a policy attaches to, within its namespace (or the whole mesh
/// from the root namespace).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attachment {
    /// No selector and no target: every workload in scope.
    All,
    /// Workloads whose labels include these.
    Selector(BTreeMap<String, String>),
    /// Workloads backing these Services (`targetRefs`).
    Services(Vec<String>),
}

/// Whether a policy in `policy_namespace`, attached as `attachment`,
/// applies to a workload in `namespace` with `labels` that backs the
/// Services for which `backs` says so. A root-namespace policy reaches
/// every namespace; targetRefs reach only the policy's own.
pub fn applies(
    policy_namespace: &str,
    attachment: &Attachment,
    root: &str,
    namespace: &str,
    labels: &BTreeMap<String, String>,
    backs: impl Fn(&str) -> bool,
) -> bool {
    let in_reach = policy_namespace == root || policy_namespace == namespace;
    match attachment {
        Attachment::All => in_reach,
        Attachment::Selector(selector) => in_reach && selects(selector, labels),
        Attachment::Services(services) => {
            policy_namespace == namespace && services.iter().any(|s| backs(s))
        }
    }
}

/// The scope an Authorization goes out with: policies without a selector
/// or target are matched by the proxy itself, so that adding one to a
/// namespace does not rewrite every workload in it.
pub fn scope(
    policy_namespace: &str,
    attachment: &Attachment,
    root: &str,
) -> mesh::AuthorizationScope {
    match attachment {
        Attachment::All if policy_namespace == root => mesh::AuthorizationScope::Mesh,
        Attachment::All => mesh::AuthorizationScope::Namespace,
        _ => mesh::AuthorizationScope::Workload,
    }
}

/// Reads `selector` and `targetRef(s)`.
pub fn attachment(spec: &Value, problems: &mut Problems) -> Attachment {
    let selector = match_labels("spec.selector", &spec["selector"], problems);
    let mut refs: Vec<(String, &Value)> = Vec::new();
    if spec["targetRef"].is_object() {
        refs.push(("spec.targetRef".into(), &spec["targetRef"]));
    }
    for (i, target) in spec["targetRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        refs.push((format!("spec.targetRefs[{i}]"), target));
    }
    if refs.is_empty() {
        return selector.map_or(Attachment::All, Attachment::Selector);
    }
    if selector.is_some() {
        problems.add(
            "spec.selector",
            "a policy takes a selector or targetRefs, not both",
        );
    }
    let mut services = Vec::new();
    for (at, target) in refs {
        let group = target["group"].as_str().unwrap_or_default();
        let kind = target["kind"].as_str().unwrap_or_default();
        match (group, kind, target["name"].as_str()) {
            ("" | "core", "Service", Some(name)) if !name.is_empty() => {
                services.push(name.to_string())
            }
            ("" | "core", "Service", _) => problems.add(&at, "a Service target needs a name"),
            _ => problems.add(
                &format!("{at}.kind"),
                format!("{group}/{kind}: only Service targets are supported"),
            ),
        }
    }
    Attachment::Services(services)
}

/// A workload selector's `matchLabels` (Istio's selectors have nothing
/// else).
pub fn match_labels(
    at: &str,
    selector: &Value,
    problems: &mut Problems,
) -> Option<BTreeMap<String, String>> {
    if selector.is_null() {
        return None;
    }
    problems.unknown_fields(at, selector, &["matchLabels"]);
    let labels: BTreeMap<String, String> = selector["matchLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect();
    Some(labels)
}

/// Whether `labels` include every label `selector` asks for. An empty
/// selector selects every workload, as in Istio.
pub fn selects(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Problems found reading one object, each with the field it is about.
#[derive(Default)]
pub struct Problems(Vec<String>);

impl Problems {
    pub fn add(&mut self, at: &str, why: impl std::fmt::Display) {
        self.0.push(format!("{at}: {why}"));
    }

    /// Names every field of `value` that is not in `known`.
    pub fn unknown_fields(&mut self, at: &str, value: &Value, known: &[&str]) {
        if let Some(object) = value.as_object() {
            for field in object.keys().filter(|f| !known.contains(&f.as_str())) {
                self.add(&format!("{at}.{field}"), "not supported by weft");
            }
        }
    }

    pub fn into_list(self) -> Vec<String> {
        self.0
    }
}

/// The `Accepted` condition as written on a policy's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub observed_generation: i64,
    pub accepted: bool,
    pub reason: String,
    pub message: String,
    /// Traffic policy's `ResolvedRefs` (status, reason, message); none for
    /// security policy.
    pub resolved: Option<(bool, String, String)>,
}

pub const CONDITION: &str = "Accepted";
pub const RESOLVED_REFS: &str = "ResolvedRefs";

/// The `Accepted` condition an object's status holds now.
pub fn written(object: &Value) -> Option<Written> {
    written_in(&object["status"]["conditions"])
}

/// The `Accepted` (and `ResolvedRefs`) conditions of a list.
pub fn written_in(conditions: &Value) -> Option<Written> {
    let find = |kind: &str| conditions.as_array()?.iter().find(|c| c["type"] == kind);
    let text = |c: &Value, field: &str| c[field].as_str().unwrap_or_default().to_string();
    let condition = find(CONDITION)?;
    Some(Written {
        observed_generation: condition["observedGeneration"].as_i64().unwrap_or(0),
        accepted: condition["status"] == "True",
        reason: text(condition, "reason"),
        message: text(condition, "message"),
        resolved: find(RESOLVED_REFS)
            .map(|c| (c["status"] == "True", text(c, "reason"), text(c, "message"))),
    })
}
