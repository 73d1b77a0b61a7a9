//! Authorization as the destination's sidecar enforces it: the control
//! plane's `Authorization` resources compiled into matchers when they
//! arrive, grouped per local workload when the snapshot is built, and
//! evaluated per connection (TCP) or per request (HTTP) without
//! allocating.
//!
//! The order is Istio's: a matching DENY denies; with no ALLOW policy the
//! request is allowed; a matching ALLOW allows; anything else is denied.
//! AUDIT and dry-run policies are evaluated and reported, never enforced.
//! On TCP, where there is no request, a rule that needs HTTP attributes
//! never matches in an ALLOW policy, and those attributes are ignored in
//! a DENY policy (so a DENY is never weaker on TCP).

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use http::HeaderMap;
use http::header::HeaderName;
use weft_xds_proto::mesh::{self, condition, string_match};

use prost::Message;

use crate::name::Name;
use crate::resources::{Interner, InvalidResource, ip_from_bytes};

/// One of Istio's string forms.
#[derive(Debug, PartialEq, Eq)]
enum Text {
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
    /// `*`: any non-empty value.
    Present,
}

impl Text {
    fn matches(&self, value: &str, ignore_case: bool) -> bool {
        let eq = |a: &str, b: &str| {
            if ignore_case {
                a.eq_ignore_ascii_case(b)
            } else {
                a == b
            }
        };
        match self {
            Text::Exact(text) => eq(value, text),
            Text::Prefix(text) => value.get(..text.len()).is_some_and(|start| eq(start, text)),
            Text::Suffix(text) => value
                .len()
                .checked_sub(text.len())
                .and_then(|at| value.get(at..))
                .is_some_and(|end| eq(end, text)),
            Text::Present => !value.is_empty(),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Cidr {
    network: IpAddr,
    prefix_len: u8,
}

impl Cidr {
    fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4 caller on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix_len))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// A value list and its negation: the first must match when not empty,
/// the second must not match at all.
#[derive(Debug, Default, PartialEq, Eq)]
struct Field<T> {
    any: Box<[T]>,
    none: Box<[T]>,
}

impl<T> Field<T> {
    fn is_empty(&self) -> bool {
        self.any.is_empty() && self.none.is_empty()
    }

    /// Whether `value` passes: `None` (the attribute is absent, such as
    /// the principal of a plaintext caller) matches no value.
    fn admits<V: Copy>(&self, value: Option<V>, matches: impl Fn(&T, V) -> bool) -> bool {
        let hit = |list: &[T]| value.is_some_and(|v| list.iter().any(|t| matches(t, v)));
        (self.any.is_empty() || hit(&self.any)) && !hit(&self.none)
    }
}

#[derive(Debug, PartialEq, Eq)]
struct Source {
    principals: Field<Text>,
    namespaces: Field<Text>,
    ip_blocks: Field<Cidr>,
    remote_ip_blocks: Field<Cidr>,
}

#[derive(Debug, PartialEq, Eq)]
struct Operation {
    hosts: Field<Text>,
    ports: Field<u16>,
    methods: Field<Text>,
    paths: Field<Text>,
}

#[derive(Debug, PartialEq, Eq)]
enum Key {
    Header(HeaderName),
    Principal,
    Namespace,
    SourceIp,
    RemoteIp,
    Port,
}

#[derive(Debug, PartialEq, Eq)]
struct Condition {
    key: Key,
    texts: Field<Text>,
    ips: Field<Cidr>,
    ports: Field<u16>,
}

#[derive(Debug, PartialEq, Eq)]
struct Rule {
    from: Box<[Source]>,
    to: Box<[Operation]>,
    when: Box<[Condition]>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    Mesh,
    Namespace,
    Workload,
}

/// One compiled `Authorization`.
#[derive(Debug, PartialEq, Eq)]
pub struct Policy {
    /// `namespace/name`, as the control plane names the resource.
    pub name: Name,
    pub namespace: Name,
    pub scope: Scope,
    pub action: Action,
    pub dry_run: bool,
    rules: Box<[Rule]>,
    /// Why the control plane sent a deny-all in the policy's place.
    pub refused: Option<Box<str>>,
}

/// What is known of a connection or request when it is checked.
#[derive(Clone, Copy, Debug)]
pub struct Attributes<'a> {
    /// `trust-domain/ns/<ns>/sa/<sa>`, as Istio writes principals; none
    /// for a plaintext caller.
    pub principal: Option<&'a str>,
    pub namespace: Option<&'a str>,
    pub source: IpAddr,
    /// The workload's port the caller asked for.
    pub port: u16,
    /// None on TCP.
    pub http: Option<HttpAttributes<'a>>,
}

#[derive(Clone, Copy, Debug)]
pub struct HttpAttributes<'a> {
    pub method: &'a str,
    pub host: &'a str,
    /// Normalized (`normalize_path`), without the query.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
}

fn text(pattern: &mesh::StringMatch) -> Text {
    match &pattern.kind {
        Some(string_match::Kind::Exact(t)) => Text::Exact(t.as_str().into()),
        Some(string_match::Kind::Prefix(t)) => Text::Prefix(t.as_str().into()),
        Some(string_match::Kind::Suffix(t)) => Text::Suffix(t.as_str().into()),
        // An empty match is taken as "present": it is never written by
        // weft's control plane, and must not match nothing silently.
        Some(string_match::Kind::Present(_)) | None => Text::Present,
    }
}

fn texts(any: &[mesh::StringMatch], none: &[mesh::StringMatch]) -> Field<Text> {
    Field {
        any: any.iter().map(text).collect(),
        none: none.iter().map(text).collect(),
    }
}

fn cidrs(
    name: &str,
    any: &[mesh::Cidr],
    none: &[mesh::Cidr],
) -> Result<Field<Cidr>, InvalidResource> {
    let one = |c: &mesh::Cidr| {
        let network = ip_from_bytes(&c.address).ok_or_else(|| InvalidResource::Address {
            name: name.to_string(),
            len: c.address.len(),
        })?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        if c.prefix_len > bits {
            return Err(InvalidResource::Field {
                name: name.to_string(),
                reason: format!("prefix length {} over {bits}", c.prefix_len),
            });
        }
        Ok(Cidr {
            network,
            prefix_len: c.prefix_len as u8,
        })
    };
    Ok(Field {
        any: any.iter().map(one).collect::<Result<_, _>>()?,
        none: none.iter().map(one).collect::<Result<_, _>>()?,
    })
}

fn ports(name: &str, any: &[u32], none: &[u32]) -> Result<Field<u16>, InvalidResource> {
    let one = |p: &u32| {
        u16::try_from(*p).map_err(|_| InvalidResource::Field {
            name: name.to_string(),
            reason: format!("port {p} out of range"),
        })
    };
    Ok(Field {
        any: any.iter().map(one).collect::<Result<_, _>>()?,
        none: none.iter().map(one).collect::<Result<_, _>>()?,
    })
}

impl Policy {
    /// Compiles one resource; a malformed one is refused (NACKed).
    pub fn compile(name: &str, resource: &mesh::Authorization) -> Result<Policy, InvalidResource> {
        let expected = format!("{}/{}", resource.namespace, resource.name);
        if name != expected {
            return Err(InvalidResource::Name {
                name: name.to_string(),
                expected,
            });
        }
        let invalid = |reason: &str| InvalidResource::Field {
            name: name.to_string(),
            reason: reason.to_string(),
        };
        let scope = match mesh::AuthorizationScope::try_from(resource.scope) {
            Ok(mesh::AuthorizationScope::Mesh) => Scope::Mesh,
            Ok(mesh::AuthorizationScope::Namespace) => Scope::Namespace,
            Ok(mesh::AuthorizationScope::Workload) => Scope::Workload,
            Err(_) => return Err(invalid("unknown scope")),
        };
        let action = match mesh::AuthorizationAction::try_from(resource.action) {
            Ok(mesh::AuthorizationAction::Allow) => Action::Allow,
            Ok(mesh::AuthorizationAction::Deny) => Action::Deny,
            Ok(mesh::AuthorizationAction::Audit) => Action::Audit,
            Err(_) => return Err(invalid("unknown action")),
        };
        let rules = resource
            .rules
            .iter()
            .map(|rule| compile_rule(name, rule))
            .collect::<Result<_, _>>()?;
        Ok(Policy {
            name: name.into(),
            namespace: resource.namespace.as_str().into(),
            scope,
            action,
            dry_run: resource.dry_run,
            rules,
            refused: (!resource.refused.is_empty()).then(|| resource.refused.as_str().into()),
        })
    }

    /// A DENY of everything under `name`, saying why.
    pub fn deny_all(name: &str, why: &str) -> Policy {
        Policy {
            name: name.into(),
            namespace: name.split('/').next().unwrap_or_default().into(),
            scope: Scope::Workload,
            action: Action::Deny,
            dry_run: false,
            rules: Box::new([Rule {
                from: Box::default(),
                to: Box::default(),
                when: Box::default(),
            }]),
            refused: Some(why.into()),
        }
    }

    /// The first rule that matches, by position.
    pub fn matching_rule(&self, request: &Attributes) -> Option<usize> {
        let deny = self.action == Action::Deny;
        self.rules
            .iter()
            .position(|rule| rule.matches(request, deny))
    }

    pub fn rules(&self) -> usize {
        self.rules.len()
    }
}

/// Decodes and compiles an `Authorization` as it arrives.
pub fn decode(name: &str, bytes: &[u8], _: &mut Interner) -> Result<Policy, InvalidResource> {
    let resource = mesh::Authorization::decode(bytes).map_err(|e| InvalidResource::Decode {
        name: name.into(),
        reason: e.to_string(),
    })?;
    Policy::compile(name, &resource)
}

fn compile_rule(name: &str, rule: &mesh::Rule) -> Result<Rule, InvalidResource> {
    let from = rule
        .from
        .iter()
        .map(|s| {
            Ok(Source {
                principals: texts(&s.principals, &s.not_principals),
                namespaces: texts(&s.namespaces, &s.not_namespaces),
                ip_blocks: cidrs(name, &s.ip_blocks, &s.not_ip_blocks)?,
                remote_ip_blocks: cidrs(name, &s.remote_ip_blocks, &s.not_remote_ip_blocks)?,
            })
        })
        .collect::<Result<_, InvalidResource>>()?;
    let to = rule
        .to
        .iter()
        .map(|o| {
            Ok(Operation {
                hosts: texts(&o.hosts, &o.not_hosts),
                ports: ports(name, &o.ports, &o.not_ports)?,
                methods: texts(&o.methods, &o.not_methods),
                paths: texts(&o.paths, &o.not_paths),
            })
        })
        .collect::<Result<_, InvalidResource>>()?;
    let when = rule
        .when
        .iter()
        .map(|c| {
            let key = match condition::Key::try_from(c.key) {
                Ok(condition::Key::RequestHeader) => {
                    Key::Header(HeaderName::from_bytes(c.header.as_bytes()).map_err(|_| {
                        InvalidResource::Field {
                            name: name.to_string(),
                            reason: format!("{:?} is not a header name", c.header),
                        }
                    })?)
                }
                Ok(condition::Key::SourcePrincipal) => Key::Principal,
                Ok(condition::Key::SourceNamespace) => Key::Namespace,
                Ok(condition::Key::SourceIp) => Key::SourceIp,
                Ok(condition::Key::RemoteIp) => Key::RemoteIp,
                Ok(condition::Key::DestinationPort) => Key::Port,
                Err(_) => {
                    return Err(InvalidResource::Field {
                        name: name.to_string(),
                        reason: "unknown condition key".into(),
                    });
                }
            };
            Ok(Condition {
                key,
                texts: texts(&c.values, &c.not_values),
                ips: cidrs(name, &c.ip_values, &c.not_ip_values)?,
                ports: ports(name, &c.port_values, &c.not_port_values)?,
            })
        })
        .collect::<Result<_, InvalidResource>>()?;
    Ok(Rule { from, to, when })
}

impl Rule {
    /// `deny`: on TCP, HTTP-only attributes are ignored (a DENY) rather
    /// than failing the rule (an ALLOW or AUDIT).
    fn matches(&self, request: &Attributes, deny: bool) -> bool {
        let from = self.from.is_empty() || self.from.iter().any(|s| s.matches(request));
        let to = self.to.is_empty() || self.to.iter().any(|o| o.matches(request, deny));
        from && to && self.when.iter().all(|c| c.holds(request, deny))
    }
}

impl Source {
    fn matches(&self, request: &Attributes) -> bool {
        let text = |t: &Text, v: &str| t.matches(v, false);
        let ip = |c: &Cidr, ip: IpAddr| c.contains(ip);
        self.principals.admits(request.principal, text)
            && self.namespaces.admits(request.namespace, text)
            && self.ip_blocks.admits(Some(request.source), ip)
            && self.remote_ip_blocks.admits(Some(request.source), ip)
    }
}

/// An HTTP-only field on TCP: it holds for a DENY, fails an ALLOW.
fn without_http(field_empty: bool, deny: bool) -> bool {
    field_empty || deny
}

impl Operation {
    fn matches(&self, request: &Attributes, deny: bool) -> bool {
        let ports = self
            .ports
            .admits(Some(request.port), |p: &u16, v: u16| *p == v);
        let Some(http) = &request.http else {
            return ports
                && [&self.hosts, &self.methods, &self.paths]
                    .iter()
                    .all(|field| without_http(field.is_empty(), deny));
        };
        ports
            && self.hosts.admits(Some(http.host), host_matches)
            && self
                .methods
                .admits(Some(http.method), |t: &Text, v| t.matches(v, false))
            && self
                .paths
                .admits(Some(http.path), |t: &Text, v| t.matches(v, false))
    }
}

/// Hosts match without regard to case, and with or without the port the
/// authority carries.
fn host_matches(pattern: &Text, host: &str) -> bool {
    pattern.matches(host, true)
        || host
            .rsplit_once(':')
            .filter(|(_, port)| !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()))
            .is_some_and(|(name, _)| pattern.matches(name, true))
}

impl Condition {
    fn holds(&self, request: &Attributes, deny: bool) -> bool {
        let text = |t: &Text, v: &str| t.matches(v, false);
        match &self.key {
            Key::Principal => self.texts.admits(request.principal, text),
            Key::Namespace => self.texts.admits(request.namespace, text),
            Key::SourceIp | Key::RemoteIp => self
                .ips
                .admits(Some(request.source), |c: &Cidr, ip| c.contains(ip)),
            Key::Port => self
                .ports
                .admits(Some(request.port), |p: &u16, v: u16| *p == v),
            Key::Header(name) => match &request.http {
                None => without_http(false, deny),
                // HTTP/2 has no Host header: its host is the authority.
                Some(http) if name == http::header::HOST => self
                    .texts
                    .admits(Some(http.host), |t: &Text, v| t.matches(v, true)),
                Some(http) => {
                    let values = http.headers.get_all(name);
                    let hit = |list: &[Text]| {
                        // Any bytes, not only visible ASCII: a value a
                        // caller writes in obs-text must not slip past a
                        // DENY. Borrowed, so free, for valid UTF-8.
                        values.iter().any(|v| {
                            let v = String::from_utf8_lossy(v.as_bytes());
                            list.iter().any(|t| t.matches(&v, false))
                        })
                    };
                    (self.texts.any.is_empty() || hit(&self.texts.any)) && !hit(&self.texts.none)
                }
            },
        }
    }
}

/// The policies one local workload is subject to, split by how they act.
#[derive(Debug, Default)]
pub struct InboundPolicy {
    deny: Box<[Arc<Policy>]>,
    allow: Box<[Arc<Policy>]>,
    /// AUDIT policies and every dry-run policy: reported, not enforced.
    report: Box<[Arc<Policy>]>,
}

/// Why a request was let in or not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No ALLOW policy applies, and no DENY matched.
    NoPolicy,
    Allowed {
        policy: Name,
        rule: usize,
    },
    Denied {
        policy: Name,
        rule: usize,
    },
    /// ALLOW policies apply and none matched.
    NotAllowed,
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::NoPolicy | Decision::Allowed { .. })
    }

    /// The policy that decided, for metrics and logs: empty when no
    /// ALLOW applies, `-` when none matched. Never allocates.
    pub fn policy(&self) -> Name {
        match self {
            Decision::Allowed { policy, .. } | Decision::Denied { policy, .. } => policy.clone(),
            Decision::NoPolicy => Name::default(),
            Decision::NotAllowed => Name::NONE,
        }
    }
}

/// An AUDIT or dry-run policy that matched.
#[derive(Clone, Copy, Debug)]
pub struct Report<'p> {
    pub policy: &'p Policy,
    pub rule: usize,
}

impl InboundPolicy {
    /// Sorts a workload's policies by action; order within is by name.
    pub fn new(policies: impl IntoIterator<Item = Arc<Policy>>) -> Self {
        let (mut deny, mut allow, mut report) = (Vec::new(), Vec::new(), Vec::new());
        for policy in policies {
            match (policy.dry_run, policy.action) {
                (true, _) | (false, Action::Audit) => report.push(policy),
                (false, Action::Deny) => deny.push(policy),
                (false, Action::Allow) => allow.push(policy),
            }
        }
        InboundPolicy {
            deny: deny.into(),
            allow: allow.into(),
            report: report.into(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.deny.is_empty() && self.allow.is_empty() && self.report.is_empty()
    }

    /// Every policy, for `weftctl authz check` and the admin page.
    pub fn policies(&self) -> impl Iterator<Item = &Arc<Policy>> {
        self.deny.iter().chain(&self.allow).chain(&self.report)
    }

    /// Istio's order: DENY, then (if any ALLOW applies) ALLOW.
    pub fn check(&self, request: &Attributes) -> Decision {
        for policy in self.deny.iter() {
            if let Some(rule) = policy.matching_rule(request) {
                return Decision::Denied {
                    policy: policy.name.clone(),
                    rule,
                };
            }
        }
        if self.allow.is_empty() {
            return Decision::NoPolicy;
        }
        for policy in self.allow.iter() {
            if let Some(rule) = policy.matching_rule(request) {
                return Decision::Allowed {
                    policy: policy.name.clone(),
                    rule,
                };
            }
        }
        Decision::NotAllowed
    }

    /// The AUDIT and dry-run policies that match, to log and count.
    pub fn reports<'p>(&'p self, request: &'p Attributes<'p>) -> impl Iterator<Item = Report<'p>> {
        self.report.iter().filter_map(move |policy| {
            policy
                .matching_rule(request)
                .map(|rule| Report { policy, rule })
        })
    }
}

/// A request path as authorization sees it, per RFC 3986: the query
/// dropped, percent-encoded unreserved characters decoded, `.` and `..`
/// segments resolved. Borrowed when already normal, which is the usual
/// case. A caller must not reach `/admin` as `/a/../admin` or `/%61dmin`
/// past a policy that names `/admin`, so the app is sent this form too.
pub fn normalize_path(path_and_query: &str) -> Cow<'_, str> {
    let path = path_and_query
        .split_once('?')
        .map_or(path_and_query, |(path, _)| path);
    let dotted = path
        .split('/')
        .any(|segment| segment == "." || segment == "..");
    if !dotted && !path.contains('%') && !path.contains('\\') {
        return Cow::Borrowed(path);
    }
    let decoded = decode_unreserved(&path.replace('\\', "/"));
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').collect();
    let last = segments.len().saturating_sub(1);
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." => {
                if i == last {
                    out.push("");
                }
            }
            ".." => {
                if out.len() > 1 {
                    out.pop();
                }
                if i == last {
                    out.push("");
                }
            }
            other => out.push(other),
        }
    }
    let mut joined = out.join("/");
    if !joined.starts_with('/') {
        joined.insert(0, '/');
    }
    Cow::Owned(joined)
}

/// Decodes `%XX` of unreserved characters (letters, digits, `-._~`);
/// other escapes stay, with upper-case hex, as RFC 3986 says.
fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = path.get(i + 1..i + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
                out.push(byte as char);
            } else {
                out.push('%');
                out.push_str(&hex.to_ascii_uppercase());
            }
            i += 3;
            continue;
        }
        // Not an escape: copied as it is (UTF-8 stays whole).
        let width = path[i..].chars().next().map_or(1, char::len_utf8);
        out.push_str(&path[i..i + width]);
        i += width;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> mesh::StringMatch {
        let kind = if text == "*" {
            string_match::Kind::Present(true)
        } else if let Some(t) = text.strip_prefix('*') {
            string_match::Kind::Suffix(t.into())
        } else if let Some(t) = text.strip_suffix('*') {
            string_match::Kind::Prefix(t.into())
        } else {
            string_match::Kind::Exact(text.into())
        };
        mesh::StringMatch { kind: Some(kind) }
    }

    fn cidr(text: &str) -> mesh::Cidr {
        let (ip, len) = text.split_once('/').unwrap();
        let ip: IpAddr = ip.parse().unwrap();
        mesh::Cidr {
            address: match ip {
                IpAddr::V4(v4) => v4.octets().to_vec(),
                IpAddr::V6(v6) => v6.octets().to_vec(),
            },
            prefix_len: len.parse().unwrap(),
        }
    }

    fn policy(
        name: &str,
        action: mesh::AuthorizationAction,
        rules: Vec<mesh::Rule>,
    ) -> Arc<Policy> {
        let resource = mesh::Authorization {
            name: name.into(),
            namespace: "demo".into(),
            scope: mesh::AuthorizationScope::Namespace as i32,
            action: action as i32,
            rules,
            ..Default::default()
        };
        Arc::new(Policy::compile(&format!("demo/{name}"), &resource).unwrap())
    }

    fn allow(rules: Vec<mesh::Rule>) -> Arc<Policy> {
        policy("allow", mesh::AuthorizationAction::Allow, rules)
    }

    fn from(source: mesh::Source) -> mesh::Rule {
        mesh::Rule {
            from: vec![source],
            ..Default::default()
        }
    }

    fn to(operation: mesh::Operation) -> mesh::Rule {
        mesh::Rule {
            to: vec![operation],
            ..Default::default()
        }
    }

    fn when(condition: mesh::Condition) -> mesh::Rule {
        mesh::Rule {
            when: vec![condition],
            ..Default::default()
        }
    }

    /// A caller and request, from their parts.
    struct Call {
        principal: Option<&'static str>,
        source: &'static str,
        port: u16,
        http: Option<(&'static str, &'static str, &'static str, HeaderMap)>,
    }

    const CLIENT: &str = "cluster.local/ns/demo/sa/client";

    fn get(path: &'static str) -> Call {
        Call {
            principal: Some(CLIENT),
            source: "10.1.0.7",
            port: 8080,
            http: Some(("GET", "echo.demo:80", path, HeaderMap::new())),
        }
    }

    fn tcp() -> Call {
        Call {
            http: None,
            ..get("/")
        }
    }

    impl Call {
        fn check(&self, policy: &InboundPolicy) -> Decision {
            let namespace = self.principal.map(|p| p.split('/').nth(2).unwrap());
            let http = self
                .http
                .as_ref()
                .map(|(method, host, path, headers)| HttpAttributes {
                    method,
                    host,
                    path,
                    headers,
                });
            policy.check(&Attributes {
                principal: self.principal,
                namespace,
                source: self.source.parse().unwrap(),
                port: self.port,
                http,
            })
        }

        fn allowed_by(&self, policies: &[Arc<Policy>]) -> bool {
            self.check(&InboundPolicy::new(policies.iter().cloned()))
                .allowed()
        }
    }

    #[test]
    fn each_rule_kind_allows_one_caller_and_not_another() {
        let header = |name: &str, value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
            headers
        };
        let other = Some("cluster.local/ns/prod/sa/batch");
        // (what the rule says, a call it admits, a call it refuses)
        let cases: Vec<(&str, mesh::Rule, Call, Call)> = vec![
            (
                "principals",
                from(mesh::Source {
                    principals: vec![s(CLIENT)],
                    ..Default::default()
                }),
                get("/"),
                Call {
                    principal: other,
                    ..get("/")
                },
            ),
            (
                "notPrincipals: * admits plaintext only",
                from(mesh::Source {
                    not_principals: vec![s("*")],
                    ..Default::default()
                }),
                Call {
                    principal: None,
                    ..get("/")
                },
                get("/"),
            ),
            (
                "namespaces (prefix)",
                from(mesh::Source {
                    namespaces: vec![s("de*")],
                    ..Default::default()
                }),
                get("/"),
                Call {
                    principal: other,
                    ..get("/")
                },
            ),
            (
                "namespaces need an identity",
                from(mesh::Source {
                    namespaces: vec![s("*")],
                    ..Default::default()
                }),
                get("/"),
                Call {
                    principal: None,
                    ..get("/")
                },
            ),
            (
                "notNamespaces",
                from(mesh::Source {
                    not_namespaces: vec![s("prod")],
                    ..Default::default()
                }),
                get("/"),
                Call {
                    principal: other,
                    ..get("/")
                },
            ),
            (
                "ipBlocks",
                from(mesh::Source {
                    ip_blocks: vec![cidr("10.1.0.0/16")],
                    ..Default::default()
                }),
                get("/"),
                Call {
                    source: "10.2.0.7",
                    ..get("/")
                },
            ),
            (
                "notIpBlocks",
                from(mesh::Source {
                    not_ip_blocks: vec![cidr("10.2.0.0/16")],
                    ..Default::default()
                }),
                get("/"),
                Call {
                    source: "10.2.0.7",
                    ..get("/")
                },
            ),
            (
                "remoteIpBlocks",
                from(mesh::Source {
                    remote_ip_blocks: vec![cidr("10.1.0.7/32")],
                    ..Default::default()
                }),
                get("/"),
                Call {
                    source: "10.1.0.8",
                    ..get("/")
                },
            ),
            (
                "notRemoteIpBlocks (IPv6)",
                from(mesh::Source {
                    not_remote_ip_blocks: vec![cidr("fd00::/8")],
                    ..Default::default()
                }),
                get("/"),
                Call {
                    source: "fd00::1",
                    ..get("/")
                },
            ),
            (
                "hosts, any case, with or without the port",
                to(mesh::Operation {
                    hosts: vec![s("echo.demo")],
                    ..Default::default()
                }),
                Call {
                    http: Some(("GET", "Echo.Demo:80", "/", HeaderMap::new())),
                    ..get("/")
                },
                Call {
                    http: Some(("GET", "other.demo", "/", HeaderMap::new())),
                    ..get("/")
                },
            ),
            (
                "notHosts (suffix)",
                to(mesh::Operation {
                    not_hosts: vec![s("*.internal")],
                    ..Default::default()
                }),
                get("/"),
                Call {
                    http: Some(("GET", "db.internal", "/", HeaderMap::new())),
                    ..get("/")
                },
            ),
            (
                "ports",
                to(mesh::Operation {
                    ports: vec![8080],
                    ..Default::default()
                }),
                get("/"),
                Call {
                    port: 9000,
                    ..get("/")
                },
            ),
            (
                "notPorts",
                to(mesh::Operation {
                    not_ports: vec![9000],
                    ..Default::default()
                }),
                get("/"),
                Call {
                    port: 9000,
                    ..get("/")
                },
            ),
            (
                "methods",
                to(mesh::Operation {
                    methods: vec![s("GET")],
                    ..Default::default()
                }),
                get("/"),
                Call {
                    http: Some(("POST", "echo.demo", "/", HeaderMap::new())),
                    ..get("/")
                },
            ),
            (
                "notMethods",
                to(mesh::Operation {
                    not_methods: vec![s("DELETE")],
                    ..Default::default()
                }),
                get("/"),
                Call {
                    http: Some(("DELETE", "echo.demo", "/", HeaderMap::new())),
                    ..get("/")
                },
            ),
            (
                "paths (prefix)",
                to(mesh::Operation {
                    paths: vec![s("/api/*")],
                    ..Default::default()
                }),
                get("/api/users"),
                get("/admin"),
            ),
            (
                "notPaths (exact)",
                to(mesh::Operation {
                    not_paths: vec![s("/admin")],
                    ..Default::default()
                }),
                get("/api"),
                get("/admin"),
            ),
            (
                "request.headers presence",
                when(mesh::Condition {
                    key: condition::Key::RequestHeader as i32,
                    header: "x-canary".into(),
                    values: vec![s("*")],
                    ..Default::default()
                }),
                Call {
                    http: Some(("GET", "echo.demo", "/", header("x-canary", "yes"))),
                    ..get("/")
                },
                get("/"),
            ),
            (
                "request.headers notValues",
                when(mesh::Condition {
                    key: condition::Key::RequestHeader as i32,
                    header: "x-env".into(),
                    not_values: vec![s("prod")],
                    ..Default::default()
                }),
                Call {
                    http: Some(("GET", "echo.demo", "/", header("x-env", "dev"))),
                    ..get("/")
                },
                Call {
                    http: Some(("GET", "echo.demo", "/", header("x-env", "prod"))),
                    ..get("/")
                },
            ),
            (
                "request.headers[host] is the authority",
                when(mesh::Condition {
                    key: condition::Key::RequestHeader as i32,
                    header: "host".into(),
                    values: vec![s("echo.*")],
                    ..Default::default()
                }),
                get("/"),
                Call {
                    http: Some(("GET", "other.demo", "/", HeaderMap::new())),
                    ..get("/")
                },
            ),
            (
                "source.principal",
                when(mesh::Condition {
                    key: condition::Key::SourcePrincipal as i32,
                    values: vec![s("*/sa/client")],
                    ..Default::default()
                }),
                get("/"),
                Call {
                    principal: other,
                    ..get("/")
                },
            ),
            (
                "source.namespace",
                when(mesh::Condition {
                    key: condition::Key::SourceNamespace as i32,
                    not_values: vec![s("prod")],
                    ..Default::default()
                }),
                get("/"),
                Call {
                    principal: other,
                    ..get("/")
                },
            ),
            (
                "source.ip",
                when(mesh::Condition {
                    key: condition::Key::SourceIp as i32,
                    ip_values: vec![cidr("10.1.0.0/24")],
                    ..Default::default()
                }),
                get("/"),
                Call {
                    source: "10.1.1.7",
                    ..get("/")
                },
            ),
            (
                "destination.port",
                when(mesh::Condition {
                    key: condition::Key::DestinationPort as i32,
                    port_values: vec![8080],
                    ..Default::default()
                }),
                get("/"),
                Call {
                    port: 9090,
                    ..get("/")
                },
            ),
        ];
        for (what, rule, admitted, refused) in cases {
            let policies = [allow(vec![rule])];
            assert!(admitted.allowed_by(&policies), "{what}: should admit");
            assert!(!refused.allowed_by(&policies), "{what}: should refuse");
        }
    }

    #[test]
    fn deny_comes_first_then_allow_then_default_deny() {
        let deny_admin = policy(
            "deny-admin",
            mesh::AuthorizationAction::Deny,
            vec![to(mesh::Operation {
                paths: vec![s("/admin*")],
                ..Default::default()
            })],
        );
        let allow_all = allow(vec![mesh::Rule::default()]);
        // DENY before ALLOW.
        let both = InboundPolicy::new([deny_admin.clone(), allow_all.clone()]);
        assert_eq!(
            get("/admin").check(&both),
            Decision::Denied {
                policy: "demo/deny-admin".into(),
                rule: 0
            }
        );
        assert_eq!(
            get("/").check(&both),
            Decision::Allowed {
                policy: "demo/allow".into(),
                rule: 0
            }
        );
        // Only DENY policies: what they do not match is allowed.
        let deny_only = InboundPolicy::new([deny_admin]);
        assert_eq!(get("/").check(&deny_only), Decision::NoPolicy);
        // An ALLOW without rules matches nothing: everything is denied.
        let empty = InboundPolicy::new([allow(vec![])]);
        assert_eq!(get("/").check(&empty), Decision::NotAllowed);
        assert!(!tcp().check(&empty).allowed());
        // `rules: [{}]` matches everything.
        assert!(tcp().allowed_by(&[allow_all]));
        // No policy at all: allowed.
        assert_eq!(
            get("/").check(&InboundPolicy::default()),
            Decision::NoPolicy
        );
    }

    #[test]
    fn on_tcp_http_fields_fail_an_allow_and_are_ignored_by_a_deny() {
        let by_method = || {
            to(mesh::Operation {
                methods: vec![s("GET")],
                ports: vec![8080],
                ..Default::default()
            })
        };
        assert!(get("/").allowed_by(&[allow(vec![by_method()])]));
        assert!(
            !tcp().allowed_by(&[allow(vec![by_method()])]),
            "an ALLOW that needs HTTP never matches TCP"
        );
        let deny = policy("deny", mesh::AuthorizationAction::Deny, vec![by_method()]);
        assert!(
            !tcp().allowed_by(std::slice::from_ref(&deny)),
            "a DENY ignores what TCP cannot have"
        );
        assert!(
            Call {
                port: 9000,
                ..tcp()
            }
            .allowed_by(std::slice::from_ref(&deny)),
            "and keeps the rest"
        );
        let header = when(mesh::Condition {
            key: condition::Key::RequestHeader as i32,
            header: "x-a".into(),
            values: vec![s("*")],
            ..Default::default()
        });
        assert!(!tcp().allowed_by(&[allow(vec![header.clone()])]));
        let deny_header = policy("deny", mesh::AuthorizationAction::Deny, vec![header]);
        assert!(!tcp().allowed_by(&[deny_header]));
    }

    #[test]
    fn a_header_value_outside_ascii_cannot_slip_past_a_deny() {
        let deny = policy(
            "deny",
            mesh::AuthorizationAction::Deny,
            vec![when(mesh::Condition {
                key: condition::Key::RequestHeader as i32,
                header: "x-block".into(),
                values: vec![s("*")],
                ..Default::default()
            })],
        );
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-block",
            http::HeaderValue::from_bytes(&[0xff, b'a']).unwrap(),
        );
        let call = Call {
            http: Some(("GET", "echo.demo", "/", headers)),
            ..get("/")
        };
        assert!(!call.allowed_by(&[deny]));
    }

    #[test]
    fn audit_and_dry_run_report_without_deciding() {
        let audit = policy(
            "audit",
            mesh::AuthorizationAction::Audit,
            vec![mesh::Rule::default()],
        );
        let mut resource = mesh::Authorization {
            name: "trial".into(),
            namespace: "demo".into(),
            action: mesh::AuthorizationAction::Deny as i32,
            dry_run: true,
            rules: vec![mesh::Rule::default()],
            ..Default::default()
        };
        let trial = Arc::new(Policy::compile("demo/trial", &resource).unwrap());
        let policy = InboundPolicy::new([audit, trial]);
        let call = get("/");
        let namespace = Some("demo");
        let attributes = Attributes {
            principal: call.principal,
            namespace,
            source: "10.1.0.7".parse().unwrap(),
            port: 8080,
            http: None,
        };
        assert_eq!(policy.check(&attributes), Decision::NoPolicy);
        let reported: Vec<&str> = policy
            .reports(&attributes)
            .map(|r| &*r.policy.name)
            .collect();
        assert_eq!(reported, ["demo/audit", "demo/trial"]);
        resource.name = "other".into();
        assert!(
            Policy::compile("demo/trial", &resource).is_err(),
            "the name must match the content"
        );
    }

    #[test]
    fn paths_are_normalized_before_they_are_matched() {
        for (raw, normal) in [
            ("/api/users?id=1", "/api/users"),
            ("/a/../admin", "/admin"),
            ("/./admin/.", "/admin/"),
            ("/%61dmin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/a%2fb", "/a%2Fb"),
            ("/../../etc", "/etc"),
            ("\\admin", "/admin"),
        ] {
            assert_eq!(normalize_path(raw), normal, "{raw}");
        }
        assert!(matches!(normalize_path("/plain/path"), Cow::Borrowed(_)));
    }

    #[test]
    fn malformed_resources_are_refused() {
        let bad_cidr = mesh::Authorization {
            name: "p".into(),
            namespace: "demo".into(),
            rules: vec![from(mesh::Source {
                ip_blocks: vec![mesh::Cidr {
                    address: vec![10, 0, 0],
                    prefix_len: 8,
                }],
                ..Default::default()
            })],
            ..Default::default()
        };
        assert!(Policy::compile("demo/p", &bad_cidr).is_err());
        let bad_port = mesh::Authorization {
            rules: vec![to(mesh::Operation {
                ports: vec![70000],
                ..Default::default()
            })],
            ..bad_cidr.clone()
        };
        assert!(Policy::compile("demo/p", &bad_port).is_err());
        let bad_action = mesh::Authorization {
            action: 9,
            ..bad_cidr.clone()
        };
        assert!(Policy::compile("demo/p", &bad_action).is_err());
    }
}
