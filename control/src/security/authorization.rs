//! Istio's `AuthorizationPolicy` (security.istio.io v1 and v1beta1) read
//! into weft's `Authorization`: every string pattern, address block and
//! port parsed here, once, so the proxy compiles plain matchers.
//!
//! Anything weft cannot enforce as written is a problem, never skipped: a
//! policy with a problem is sent as a DENY of everything for its workloads
//! (fail closed), and its status says which field.

use std::net::IpAddr;

use serde_json::Value;
use weft_xds_proto::mesh::{self, condition, string_match};

use super::{Attachment, Problems};

/// What an AuthorizationPolicy says, as far as weft reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct AuthorizationInfo {
    pub generation: i64,
    /// The object's creation time (RFC 3339), for ordering in tools.
    pub created: String,
    pub attachment: Attachment,
    pub action: mesh::AuthorizationAction,
    pub dry_run: bool,
    pub rules: Vec<mesh::Rule>,
    /// Why the policy cannot be enforced as written; it then denies all.
    pub problems: Vec<String>,
    /// What its status said when last seen, to write only what changed.
    pub status: Option<super::Written>,
}

/// Istio's annotation for a policy that is evaluated but not enforced.
pub const DRY_RUN: &str = "istio.io/dry-run";

const SPEC_FIELDS: &[&str] = &[
    "selector",
    "targetRef",
    "targetRefs",
    "rules",
    "action",
    "provider",
];
const RULE_FIELDS: &[&str] = &["from", "to", "when"];
const SOURCE_FIELDS: &[&str] = &[
    "principals",
    "notPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
];
const OPERATION_FIELDS: &[&str] = &[
    "hosts",
    "notHosts",
    "ports",
    "notPorts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
];

/// Reads one AuthorizationPolicy object (its whole JSON).
pub fn read(object: &Value) -> AuthorizationInfo {
    let spec = &object["spec"];
    let mut problems = Problems::default();
    problems.unknown_fields("spec", spec, SPEC_FIELDS);
    let action = match spec["action"].as_str().unwrap_or("ALLOW") {
        "ALLOW" => mesh::AuthorizationAction::Allow,
        "DENY" => mesh::AuthorizationAction::Deny,
        "AUDIT" => mesh::AuthorizationAction::Audit,
        "CUSTOM" => {
            problems.add(
                "spec.action",
                "CUSTOM (external authorization) is not supported",
            );
            mesh::AuthorizationAction::Deny
        }
        other => {
            problems.add("spec.action", format!("unknown action {other:?}"));
            mesh::AuthorizationAction::Deny
        }
    };
    let attachment = super::attachment(spec, &mut problems);
    let rules = spec["rules"]
        .as_array()
        .map(|rules| {
            rules
                .iter()
                .enumerate()
                .map(|(i, rule)| read_rule(&format!("spec.rules[{i}]"), rule, &mut problems))
                .collect()
        })
        .unwrap_or_default();
    let meta = &object["metadata"];
    AuthorizationInfo {
        generation: meta["generation"].as_i64().unwrap_or(0),
        created: meta["creationTimestamp"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        attachment,
        action,
        dry_run: meta["annotations"][DRY_RUN].as_str() == Some("true"),
        rules,
        problems: problems.into_list(),
        status: super::written(object),
    }
}

fn read_rule(at: &str, rule: &Value, problems: &mut Problems) -> mesh::Rule {
    problems.unknown_fields(at, rule, RULE_FIELDS);
    let entries = |field: &str| -> Vec<(String, &Value)> {
        rule[field]
            .as_array()
            .map(|list| {
                list.iter()
                    .enumerate()
                    .map(|(i, v)| (format!("{at}.{field}[{i}]"), v))
                    .collect()
            })
            .unwrap_or_default()
    };
    let from = entries("from")
        .into_iter()
        .map(|(at, entry)| {
            problems.unknown_fields(&at, entry, &["source"]);
            read_source(&format!("{at}.source"), &entry["source"], problems)
        })
        .collect();
    let to = entries("to")
        .into_iter()
        .map(|(at, entry)| {
            problems.unknown_fields(&at, entry, &["operation"]);
            read_operation(&format!("{at}.operation"), &entry["operation"], problems)
        })
        .collect();
    let when = entries("when")
        .into_iter()
        .map(|(at, entry)| read_condition(&at, entry, problems))
        .collect();
    mesh::Rule { from, to, when }
}

fn read_source(at: &str, source: &Value, problems: &mut Problems) -> mesh::Source {
    problems.unknown_fields(at, source, SOURCE_FIELDS);
    let mut strings = |field: &str| strings(at, source, field, problems);
    let principals = strings("principals");
    let not_principals = strings("notPrincipals");
    let namespaces = strings("namespaces");
    let not_namespaces = strings("notNamespaces");
    let mut cidrs = |field: &str| parsed(at, source, field, cidr, problems);
    mesh::Source {
        principals,
        not_principals,
        namespaces,
        not_namespaces,
        ip_blocks: cidrs("ipBlocks"),
        not_ip_blocks: cidrs("notIpBlocks"),
        remote_ip_blocks: cidrs("remoteIpBlocks"),
        not_remote_ip_blocks: cidrs("notRemoteIpBlocks"),
    }
}

fn read_operation(at: &str, operation: &Value, problems: &mut Problems) -> mesh::Operation {
    problems.unknown_fields(at, operation, OPERATION_FIELDS);
    let hosts = strings(at, operation, "hosts", problems);
    let not_hosts = strings(at, operation, "notHosts", problems);
    let methods = strings(at, operation, "methods", problems);
    let not_methods = strings(at, operation, "notMethods", problems);
    let mut paths = |field: &str| {
        let list = strings(at, operation, field, problems);
        for (i, text) in texts(operation, field) {
            if text.contains('{') {
                problems.add(
                    &format!("{at}.{field}[{i}]"),
                    "path templates ({*}, {**}) are not supported",
                );
            }
        }
        list
    };
    let (paths, not_paths) = (paths("paths"), paths("notPaths"));
    let mut ports = |field: &str| parsed(at, operation, field, port, problems);
    mesh::Operation {
        hosts: hosts.into_iter().map(lower_case).collect(),
        not_hosts: not_hosts.into_iter().map(lower_case).collect(),
        ports: ports("ports"),
        not_ports: ports("notPorts"),
        methods,
        not_methods,
        paths,
        not_paths,
    }
}

fn read_condition(at: &str, entry: &Value, problems: &mut Problems) -> mesh::Condition {
    problems.unknown_fields(at, entry, &["key", "values", "notValues"]);
    let key = entry["key"].as_str().unwrap_or_default();
    let mut condition = mesh::Condition::default();
    let kind = if let Some(header) = key
        .strip_prefix("request.headers[")
        .and_then(|rest| rest.strip_suffix(']'))
        .filter(|name| !name.is_empty())
    {
        // HTTP/2 carries the host as :authority; Envoy treats both alike.
        let header = match header.to_ascii_lowercase() {
            name if name == ":authority" => "host".to_string(),
            name => name,
        };
        if http::header::HeaderName::from_bytes(header.as_bytes()).is_err() {
            problems.add(
                &format!("{at}.key"),
                format!("{header:?} is not a header name"),
            );
        }
        condition.header = header;
        condition::Key::RequestHeader
    } else {
        match key {
            "source.principal" => condition::Key::SourcePrincipal,
            "source.namespace" => condition::Key::SourceNamespace,
            "source.ip" => condition::Key::SourceIp,
            "remote.ip" => condition::Key::RemoteIp,
            "destination.port" => condition::Key::DestinationPort,
            other if other.starts_with("request.auth") => {
                problems.add(
                    &format!("{at}.key"),
                    format!("{other}: JWT (request authentication) is not supported"),
                );
                return condition;
            }
            other => {
                problems.add(
                    &format!("{at}.key"),
                    format!("{other:?} is not a supported condition key"),
                );
                return condition;
            }
        }
    };
    condition.key = kind as i32;
    for (field, not) in [("values", false), ("notValues", true)] {
        for (i, text) in texts(entry, field) {
            let here = format!("{at}.{field}[{i}]");
            match kind {
                condition::Key::SourceIp | condition::Key::RemoteIp => match cidr(text) {
                    Ok(block) if not => condition.not_ip_values.push(block),
                    Ok(block) => condition.ip_values.push(block),
                    Err(why) => problems.add(&here, why),
                },
                condition::Key::DestinationPort => match port(text) {
                    Ok(port) if not => condition.not_port_values.push(port),
                    Ok(port) => condition.port_values.push(port),
                    Err(why) => problems.add(&here, why),
                },
                _ if not => condition.not_values.push(pattern(text)),
                _ => condition.values.push(pattern(text)),
            }
        }
    }
    if entry["values"].as_array().is_none_or(|v| v.is_empty())
        && entry["notValues"].as_array().is_none_or(|v| v.is_empty())
    {
        problems.add(at, "a condition needs values or notValues");
    }
    condition
}

/// The string items of a list field, with their positions.
fn texts<'a>(parent: &'a Value, field: &str) -> impl Iterator<Item = (usize, &'a str)> {
    parent[field]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
        .filter_map(|(i, v)| v.as_str().map(|s| (i, s)))
}

/// A list field's items parsed by `parse`; each one that fails is a
/// problem naming its position.
fn parsed<T>(
    at: &str,
    parent: &Value,
    field: &str,
    parse: fn(&str) -> Result<T, String>,
    problems: &mut Problems,
) -> Vec<T> {
    texts(parent, field)
        .filter_map(|(i, text)| {
            parse(text)
                .map_err(|why| problems.add(&format!("{at}.{field}[{i}]"), why))
                .ok()
        })
        .collect()
}

fn strings(
    at: &str,
    parent: &Value,
    field: &str,
    problems: &mut Problems,
) -> Vec<mesh::StringMatch> {
    if let Some(list) = parent[field].as_array()
        && let Some(i) = list.iter().position(|v| !v.is_string())
    {
        problems.add(&format!("{at}.{field}[{i}]"), "not a string");
    }
    texts(parent, field)
        .map(|(_, text)| pattern(text))
        .collect()
}

/// Istio's string forms: `*` any non-empty value, `abc*` a prefix, `*abc`
/// a suffix, anything else exactly.
pub fn pattern(text: &str) -> mesh::StringMatch {
    let kind = if text == "*" {
        string_match::Kind::Present(true)
    } else if let Some(suffix) = text.strip_prefix('*') {
        string_match::Kind::Suffix(suffix.to_string())
    } else if let Some(prefix) = text.strip_suffix('*') {
        string_match::Kind::Prefix(prefix.to_string())
    } else {
        string_match::Kind::Exact(text.to_string())
    };
    mesh::StringMatch { kind: Some(kind) }
}

fn lower_case(mut pattern: mesh::StringMatch) -> mesh::StringMatch {
    if let Some(
        string_match::Kind::Exact(text)
        | string_match::Kind::Prefix(text)
        | string_match::Kind::Suffix(text),
    ) = &mut pattern.kind
    {
        text.make_ascii_lowercase();
    }
    pattern
}

/// `1.2.3.4`, `1.2.3.0/24`, `fd00::/8`.
pub fn cidr(text: &str) -> Result<mesh::Cidr, String> {
    let (address, prefix) = match text.split_once('/') {
        Some((address, prefix)) => (address, Some(prefix)),
        None => (text, None),
    };
    let address: IpAddr = address
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not an IP address or CIDR block"))?;
    let bits = if address.is_ipv4() { 32 } else { 128 };
    let prefix_len = match prefix {
        None => bits,
        Some(prefix) => prefix
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|p| *p <= bits)
            .ok_or_else(|| format!("{text:?}: the prefix length must be 0 to {bits}"))?,
    };
    let address = match address {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    Ok(mesh::Cidr {
        address,
        prefix_len,
    })
}

fn port(text: &str) -> Result<u32, String> {
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|p| (1..=65535).contains(p))
        .ok_or_else(|| format!("{text:?} is not a port (1 to 65535)"))
}

/// The resource sent for this policy: as written, or, when it has a
/// problem, a DENY of everything (fail closed) that says why.
pub fn resource(
    namespace: &str,
    name: &str,
    scope: mesh::AuthorizationScope,
    info: &AuthorizationInfo,
) -> mesh::Authorization {
    let mut resource = mesh::Authorization {
        name: name.to_string(),
        namespace: namespace.to_string(),
        scope: scope as i32,
        action: info.action as i32,
        dry_run: info.dry_run,
        rules: info.rules.clone(),
        refused: String::new(),
    };
    if !info.problems.is_empty() {
        resource.action = mesh::AuthorizationAction::Deny as i32;
        resource.rules = vec![mesh::Rule::default()];
        resource.refused = info.problems.join("; ");
    }
    resource
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(spec: Value) -> AuthorizationInfo {
        read(
            &json!({"metadata": {"name": "p", "namespace": "demo", "generation": 2}, "spec": spec}),
        )
    }

    #[test]
    fn every_supported_field_is_read_and_parsed() {
        let info = policy(json!({
            "selector": {"matchLabels": {"app": "echo"}},
            "action": "DENY",
            "rules": [{
                "from": [{"source": {
                    "principals": ["cluster.local/ns/demo/sa/client"],
                    "notNamespaces": ["prod*"],
                    "ipBlocks": ["10.1.0.0/16", "10.2.0.7"],
                }}],
                "to": [{"operation": {"hosts": ["Echo.Demo*"], "ports": ["8080"], "methods": ["GET"], "notPaths": ["*/admin"]}}],
                "when": [
                    {"key": "request.headers[X-Canary]", "values": ["*"]},
                    {"key": "request.headers[:authority]", "values": ["echo*"]},
                    {"key": "destination.port", "notValues": ["9000"]},
                    {"key": "source.ip", "values": ["fd00::/8"]},
                ],
            }],
        }));
        assert!(info.problems.is_empty(), "{:?}", info.problems);
        assert_eq!(info.action, mesh::AuthorizationAction::Deny);
        assert_eq!(info.generation, 2);
        let mut rules = info.rules.clone();
        let rule = &mut rules[0];
        let source = &rule.from[0];
        assert_eq!(
            source.principals[0].kind,
            Some(string_match::Kind::Exact(
                "cluster.local/ns/demo/sa/client".into()
            ))
        );
        assert_eq!(
            source.not_namespaces[0].kind,
            Some(string_match::Kind::Prefix("prod".into()))
        );
        assert_eq!(source.ip_blocks[0].prefix_len, 16);
        assert_eq!(source.ip_blocks[1].prefix_len, 32);
        let operation = &rule.to[0];
        assert_eq!(
            operation.hosts[0].kind,
            Some(string_match::Kind::Prefix("echo.demo".into())),
            "hosts match without regard to case"
        );
        assert_eq!(operation.ports, [8080]);
        assert_eq!(
            operation.not_paths[0].kind,
            Some(string_match::Kind::Suffix("/admin".into()))
        );
        assert_eq!(rule.when[0].header, "x-canary");
        assert_eq!(rule.when.remove(1).header, "host");
        assert_eq!(
            rule.when[0].values[0].kind,
            Some(string_match::Kind::Present(true))
        );
        assert_eq!(rule.when[1].not_port_values, [9000]);
        assert_eq!(rule.when[2].ip_values[0].address.len(), 16);
    }

    #[test]
    fn what_cannot_be_enforced_is_named_and_the_policy_fails_closed() {
        let cases = [
            (
                json!({"action": "CUSTOM", "provider": {"name": "ext"}}),
                "spec.action",
            ),
            (
                json!({"rules": [{"when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}]}),
                "spec.rules[0].when[0].key",
            ),
            (
                json!({"rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}),
                "spec.rules[0].from[0].source.requestPrincipals",
            ),
            (
                json!({"rules": [{"to": [{"operation": {"ports": ["http"]}}]}]}),
                "spec.rules[0].to[0].operation.ports[0]",
            ),
            (
                json!({"rules": [{"to": [{"operation": {"paths": ["/api/{*}/x"]}}]}]}),
                "spec.rules[0].to[0].operation.paths[0]",
            ),
            (
                json!({"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]}),
                "spec.rules[0].from[0].source.ipBlocks[0]",
            ),
            (json!({"actions": "DENY"}), "spec.actions"),
            (
                json!({"rules": [{"when": [{"key": "request.headers[bad header]", "values": ["x"]}]}]}),
                "spec.rules[0].when[0].key",
            ),
        ];
        for (spec, field) in cases {
            let info = policy(spec.clone());
            assert!(
                info.problems.iter().any(|p| p.starts_with(field)),
                "{spec}: {:?}",
                info.problems
            );
            let sent = resource("demo", "p", mesh::AuthorizationScope::Namespace, &info);
            assert_eq!(sent.action, mesh::AuthorizationAction::Deny as i32);
            assert_eq!(
                sent.rules,
                vec![mesh::Rule::default()],
                "matches everything"
            );
            assert!(sent.refused.contains(field));
        }
    }

    #[test]
    fn an_allow_without_rules_stays_empty_and_match_all_is_one_empty_rule() {
        let none = policy(json!({}));
        assert_eq!(none.action, mesh::AuthorizationAction::Allow);
        assert!(none.rules.is_empty());
        let all = policy(json!({"rules": [{}]}));
        assert_eq!(all.rules, vec![mesh::Rule::default()]);
    }

    #[test]
    fn the_dry_run_annotation_is_read() {
        let info = read(&json!({
            "metadata": {"name": "p", "namespace": "demo", "annotations": {DRY_RUN: "true"}},
            "spec": {"action": "DENY", "rules": [{}]},
        }));
        assert!(info.dry_run);
    }
}
