//! Traffic policy from the ecosystem's two APIs, read from the control
//! plane's own cluster (multi-primary: each cluster's routing governs its
//! own callers, as in Istio): Gateway API HTTPRoute and GRPCRoute attached
//! to a Service (`gateway_route`), Istio's VirtualService
//! (`virtual_service`) and DestinationRule (`destination_rule`). Each
//! object becomes one weft resource, its hosts resolved and its values
//! parsed. Here: what the readers share. Nothing here depends on the rest
//! of the control plane, so `weftctl analyze` reads objects the same way.
//!
//! An object with a field that would change where traffic goes and that
//! weft cannot honour is refused whole (not sent, `Accepted: False` naming
//! the field), never applied in part; a tuning field weft does without is
//! applied and named as ignored.

pub mod destination_rule;
pub mod gateway_route;
pub mod virtual_service;

use kube::api::ApiResource;
use serde_json::Value;
use weft_xds_proto::mesh::{self, value_match};

use crate::security::Problems;

pub const ISTIO_GROUP: &str = "networking.istio.io";
pub const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

fn api_resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

pub fn virtual_services() -> ApiResource {
    api_resource(ISTIO_GROUP, "v1", "VirtualService", "virtualservices")
}

pub fn destination_rules() -> ApiResource {
    api_resource(ISTIO_GROUP, "v1", "DestinationRule", "destinationrules")
}

pub fn http_routes() -> ApiResource {
    api_resource(GATEWAY_GROUP, "v1", "HTTPRoute", "httproutes")
}

pub fn grpc_routes() -> ApiResource {
    api_resource(GATEWAY_GROUP, "v1", "GRPCRoute", "grpcroutes")
}

/// The weft resource an object becomes.
#[derive(Clone, Debug, PartialEq)]
pub enum Resource {
    Routes(mesh::RouteSet),
    Destination(mesh::DestinationPolicy),
}

/// A backend an object refers to, to check that it exists.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Reference {
    /// Where in the object.
    pub at: String,
    pub host: String,
    /// A DestinationRule subset, for Istio's routes.
    pub subset: String,
}

/// What one traffic object says, as far as weft reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct TrafficInfo {
    pub generation: i64,
    pub resource: Resource,
    /// Why the object is not applied; empty when it is.
    pub problems: Vec<String>,
    /// Fields weft applies the object without (they tune, not route).
    pub ignored: Vec<String>,
    pub references: Vec<Reference>,
    /// Gateway API: the Service parents this controller answers for, as
    /// written (status.parents echoes them). Empty for Istio's kinds.
    pub parents: Vec<Value>,
    /// The object applies to no sidecar (a route for Gateways only): weft
    /// neither sends it nor writes its status.
    pub not_for_mesh: bool,
    /// What its status said when last seen.
    pub status: Option<crate::security::Written>,
}

/// Where a reader is: the object's namespace and the cluster's DNS suffix.
pub struct Context<'a> {
    pub namespace: &'a str,
    pub domain_suffix: &'a str,
}

impl<'a> Context<'a> {
    /// The context of an object: its namespace.
    pub fn of(object: &'a Value, domain_suffix: &'a str) -> Context<'a> {
        Context {
            namespace: object["metadata"]["namespace"].as_str().unwrap_or_default(),
            domain_suffix,
        }
    }

    /// A service host as Istio reads it: `name` is in the object's own
    /// namespace, `name.ns` and `name.ns.svc` are completed, anything with
    /// the suffix (or outside the cluster's names) is taken as written.
    pub fn host(&self, host: &str) -> String {
        let suffix = self.domain_suffix;
        let parts = host.split('.').count();
        if host.ends_with(suffix) || host.contains('*') {
            host.to_string()
        } else if parts == 1 {
            format!("{host}.{}.svc.{suffix}", self.namespace)
        } else if parts == 2 {
            format!("{host}.svc.{suffix}")
        } else if host.ends_with(".svc") {
            format!("{host}.{suffix}")
        } else {
            host.to_string()
        }
    }

    /// A Service name in `namespace` as a hostname.
    pub fn service(&self, name: &str, namespace: &str) -> String {
        format!("{name}.{namespace}.svc.{}", self.domain_suffix)
    }
}

/// The parts of the object every kind reads alike.
pub fn meta(object: &Value) -> (i64, i64, Option<crate::security::Written>) {
    let metadata = &object["metadata"];
    let created = metadata["creationTimestamp"]
        .as_str()
        .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
        .map_or(0, |t| t.as_second());
    // Gateway API keeps conditions per parent; weft writes one entry per
    // Service parent, all alike, so the first of ours says it.
    let ours = object["status"]["parents"].as_array().and_then(|parents| {
        parents
            .iter()
            .find(|p| p["controllerName"] == gateway_route::CONTROLLER)
    });
    let written = match ours {
        Some(parent) => crate::security::written_in(&parent["conditions"]),
        None => crate::security::written(object),
    };
    (
        metadata["generation"].as_i64().unwrap_or(0),
        created,
        written,
    )
}

/// A protobuf-JSON duration ("1.5s", "100ms" from Gateway API's Go form,
/// "1m", "1h"), in milliseconds.
pub fn duration_ms(at: &str, value: &Value, problems: &mut Problems) -> u64 {
    let Some(text) = value.as_str() else {
        if !value.is_null() {
            problems.add(at, "a duration is a string such as \"1.5s\"");
        }
        return 0;
    };
    match parse_duration_ms(text) {
        Some(ms) => ms,
        None => {
            problems.add(at, format!("{text:?} is not a duration"));
            0
        }
    }
}

fn parse_duration_ms(text: &str) -> Option<u64> {
    // Gateway API's form may chain units ("1m30s"); protobuf's is one
    // number of seconds. Both are sums of number-unit pairs.
    let mut total = 0f64;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let scale = match &rest[..unit] {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1_000.0,
            "ms" => 1.0,
            "us" | "µs" => 0.001,
            "ns" => 0.000_001,
            _ => return None,
        };
        rest = &rest[unit..];
        total += number * scale;
    }
    (total.is_finite() && total < 1e15).then_some(total.round() as u64)
}

/// Istio's `Percent` ({value: 0-100, fractions allowed}) as millionths.
pub fn per_million(at: &str, value: &Value, problems: &mut Problems) -> Option<u32> {
    if value.is_null() {
        return None;
    }
    let number = value["value"].as_f64().or_else(|| value.as_f64());
    match number {
        Some(p) if (0.0..=100.0).contains(&p) => Some((p * 10_000.0).round() as u32),
        _ => {
            problems.add(at, "a percentage from 0 to 100");
            None
        }
    }
}

/// Istio's `StringMatch` ({exact|prefix|regex: ...}).
pub fn string_match(at: &str, value: &Value, problems: &mut Problems) -> mesh::ValueMatch {
    problems.unknown_fields(at, value, &["exact", "prefix", "regex"]);
    let kind = if let Some(v) = value["exact"].as_str() {
        Some(value_match::Kind::Exact(v.into()))
    } else if let Some(v) = value["prefix"].as_str() {
        Some(value_match::Kind::Prefix(v.into()))
    } else if let Some(v) = value["regex"].as_str() {
        regex_checked(&format!("{at}.regex"), v, problems).map(value_match::Kind::Regex)
    } else {
        // `{}` is Istio's "present" for headers.
        Some(value_match::Kind::Present(true))
    };
    mesh::ValueMatch {
        kind,
        invert: false,
    }
}

/// A regular expression the proxy will compile; refused here if it would
/// not, so the proxy never NACKs for it.
pub fn regex_checked(at: &str, pattern: &str, problems: &mut Problems) -> Option<String> {
    match weft_xds_proto::pattern::whole_value(pattern) {
        Ok(_) => Some(pattern.to_string()),
        Err(why) => {
            problems.add(at, why);
            None
        }
    }
}

/// `exportTo` resolved: "." is the object's own namespace; absent: all.
pub fn export_to(spec: &Value, namespace: &str) -> Vec<String> {
    let list: Vec<String> = spec["exportTo"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|n| if n == "." { namespace } else { n }.to_string())
        .collect();
    if list.is_empty() {
        vec!["*".into()]
    } else {
        list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_in_both_forms() {
        for (text, ms) in [
            ("1.5s", Some(1500)),
            ("100ms", Some(100)),
            ("1m30s", Some(90_000)),
            ("2h", Some(7_200_000)),
            ("0.001s", Some(1)),
            ("", None),
            ("10", None),
            ("1x", None),
            ("s", None),
        ] {
            assert_eq!(parse_duration_ms(text), ms, "{text:?}");
        }
    }

    #[test]
    fn hosts_are_completed_as_istio_does() {
        let ctx = Context {
            namespace: "demo",
            domain_suffix: "cluster.local",
        };
        assert_eq!(ctx.host("echo"), "echo.demo.svc.cluster.local");
        assert_eq!(ctx.host("echo.other"), "echo.other.svc.cluster.local");
        assert_eq!(ctx.host("echo.other.svc"), "echo.other.svc.cluster.local");
        assert_eq!(
            ctx.host("echo.other.svc.cluster.local"),
            "echo.other.svc.cluster.local"
        );
        assert_eq!(ctx.host("api.example.com"), "api.example.com");
    }
}
