//! Traffic policy on the outbound side, compiled when it arrives: each
//! `RouteSet` (a VirtualService, HTTPRoute or GRPCRoute) and each
//! `DestinationPolicy` (a DestinationRule) becomes plain matchers, with
//! regular expressions built once. The snapshot then keeps, per service
//! host, the routes this proxy's own caller sees (exportTo, consumer
//! routes, sourceLabels and sourceNamespace are settled there, since the
//! caller is always this pod), in the order they are tried. A request is
//! matched against that list with no lock and no allocation.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use prost::Message;
use weft_xds_proto::mesh::{self, consistent_hash, path_rewrite, value_match};
use weft_xds_proto::pattern;

use crate::outlier;
use crate::resources::{Interner, InvalidResource, Name, Workload};

fn invalid(name: &str, reason: impl std::fmt::Display) -> InvalidResource {
    InvalidResource::Field {
        name: name.into(),
        reason: reason.to_string(),
    }
}

/// A string condition.
#[derive(Debug)]
enum Text {
    Any,
    Exact(Box<str>),
    Prefix(Box<str>),
    Regex(pattern::Regex),
    Present,
}

#[derive(Debug)]
pub struct ValueMatcher {
    text: Text,
    invert: bool,
}

impl ValueMatcher {
    fn compile(name: &str, value: Option<&mesh::ValueMatch>) -> Result<Self, InvalidResource> {
        let Some(value) = value else {
            return Ok(ValueMatcher {
                text: Text::Any,
                invert: false,
            });
        };
        let text = match &value.kind {
            None => Text::Any,
            Some(value_match::Kind::Exact(v)) => Text::Exact(v.as_str().into()),
            Some(value_match::Kind::Prefix(v)) => Text::Prefix(v.as_str().into()),
            Some(value_match::Kind::Present(_)) => Text::Present,
            Some(value_match::Kind::Regex(v)) => Text::Regex(
                pattern::whole_value(v).map_err(|e| invalid(name, format!("regex {v:?}: {e}")))?,
            ),
        };
        Ok(ValueMatcher {
            text,
            invert: value.invert,
        })
    }

    pub fn matches(&self, value: Option<&str>) -> bool {
        let hit = match (&self.text, value) {
            (Text::Any, _) => true,
            (_, None) => false,
            (Text::Present, Some(_)) => true,
            (Text::Exact(e), Some(v)) => **e == *v,
            (Text::Prefix(p), Some(v)) => v.starts_with(&**p),
            (Text::Regex(r), Some(v)) => r.is_match(v),
        };
        hit != self.invert
    }

    /// The literal prefix, for rewriting what a prefix match matched.
    fn prefix(&self) -> Option<&str> {
        match &self.text {
            Text::Prefix(p) => Some(p),
            _ => None,
        }
    }
}

/// What a route is matched against.
pub struct RequestView<'a> {
    pub method: &'a str,
    pub authority: &'a str,
    pub scheme: &'a str,
    /// Without the query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The service port the request was sent to.
    pub port: u16,
}

impl RequestView<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        match name {
            ":method" => Some(self.method),
            ":authority" => Some(self.authority),
            ":scheme" => Some(self.scheme),
            ":path" => Some(self.path),
            // A header sent twice, or not as text, matches as absent.
            _ => {
                let mut all = self.headers.get_all(name).iter();
                let first = all.next()?;
                if all.next().is_some() {
                    return None;
                }
                first.to_str().ok()
            }
        }
    }

    fn query_param(&self, name: &str) -> Option<&str> {
        self.query?.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (key == name).then_some(value)
        })
    }
}

/// Conditions on named values (headers, query parameters).
type Named = Box<[(Box<str>, ValueMatcher)]>;

/// Istio's distribute: per caller locality pattern, the share of each
/// destination locality pattern.
type Distribute = Box<[(Box<str>, Box<[(Box<str>, u32)]>)]>;

#[derive(Debug)]
pub struct RequestMatch {
    path: Option<ValueMatcher>,
    headers: Named,
    query: Named,
    port: u16,
    source_labels: BTreeMap<String, String>,
    source_namespace: String,
}

impl RequestMatch {
    fn compile(name: &str, m: &mesh::RouteMatch) -> Result<Self, InvalidResource> {
        let named = |list: &[mesh::NamedMatch]| -> Result<Named, InvalidResource> {
            list.iter()
                .map(|n| {
                    Ok((
                        n.name.as_str().into(),
                        ValueMatcher::compile(name, n.value.as_ref())?,
                    ))
                })
                .collect()
        };
        Ok(RequestMatch {
            path: m
                .path
                .as_ref()
                .map(|p| ValueMatcher::compile(name, Some(p)))
                .transpose()?,
            headers: named(&m.headers)?,
            query: named(&m.query_params)?,
            port: u16::try_from(m.port).map_err(|_| invalid(name, "port out of range"))?,
            source_labels: m.source_labels.clone().into_iter().collect(),
            source_namespace: m.source_namespace.clone(),
        })
    }

    pub fn matches(&self, request: &RequestView) -> bool {
        // Cheap conditions first: a path pattern is tried only when
        // everything else already holds.
        let path = |regex: bool| {
            self.path.as_ref().is_none_or(|p| {
                matches!(p.text, Text::Regex(_)) != regex || p.matches(Some(request.path))
            })
        };
        (self.port == 0 || self.port == request.port)
            && path(false)
            && self
                .headers
                .iter()
                .all(|(n, m)| m.matches(request.header(n)))
            && self
                .query
                .iter()
                .all(|(n, m)| m.matches(request.query_param(n)))
            && path(true)
    }

    /// Whether this pod, as a caller, is one the match is for.
    fn for_caller(&self, caller: &Caller) -> bool {
        (self.source_namespace.is_empty() || *self.source_namespace == *caller.namespace)
            && self
                .source_labels
                .iter()
                .all(|(k, v)| caller.label(k) == Some(v))
    }

    /// Gateway API's precedence: exact path, then the longest prefix, then
    /// a method, then more headers, then more query parameters.
    fn precedence(
        &self,
    ) -> (
        u8,
        std::cmp::Reverse<usize>,
        bool,
        std::cmp::Reverse<usize>,
        std::cmp::Reverse<usize>,
    ) {
        use std::cmp::Reverse;
        let (rank, length) = match self.path.as_ref().map(|p| &p.text) {
            Some(Text::Exact(e)) => (0, e.len()),
            Some(Text::Prefix(p)) => (1, p.len()),
            Some(Text::Regex(r)) => (2, r.as_str().len()),
            _ => (3, 0),
        };
        let method = self.headers.iter().any(|(n, _)| &**n == ":method");
        let headers = self
            .headers
            .iter()
            .filter(|(n, _)| !n.starts_with(':'))
            .count();
        (
            rank,
            Reverse(length),
            !method,
            Reverse(headers),
            Reverse(self.query.len()),
        )
    }
}

#[derive(Debug, Clone)]
pub struct Backend {
    pub host: Name,
    /// 0: the port the request was sent to.
    pub port: u16,
    pub subset: Name,
    pub weight: u32,
}

impl Backend {
    fn compile(
        name: &str,
        b: &mesh::Backend,
        names: &mut Interner,
    ) -> Result<Self, InvalidResource> {
        Ok(Backend {
            host: names.name(&b.host),
            port: u16::try_from(b.port).map_err(|_| invalid(name, "port out of range"))?,
            subset: names.name(&b.subset),
            weight: b.weight,
        })
    }
}

/// Picks one of `backends` by weight; none when all weigh 0.
pub fn weighted(backends: &[Backend], total: u64) -> Option<&Backend> {
    if total == 0 {
        return None;
    }
    let mut at = rand::random_range(0..total);
    for backend in backends {
        let weight = backend.weight as u64;
        if at < weight {
            return Some(backend);
        }
        at -= weight;
    }
    None
}

#[derive(Debug, Default)]
pub struct Edits {
    pub set: Box<[(http::HeaderName, http::HeaderValue)]>,
    pub add: Box<[(http::HeaderName, http::HeaderValue)]>,
    pub remove: Box<[http::HeaderName]>,
}

impl Edits {
    fn compile(name: &str, e: Option<&mesh::HeaderEdits>) -> Result<Option<Self>, InvalidResource> {
        let Some(e) = e else { return Ok(None) };
        let pairs = |list: &[mesh::HeaderValue]| -> Result<Box<[_]>, InvalidResource> {
            list.iter()
                .map(|h| {
                    Ok((
                        http::HeaderName::from_bytes(h.name.as_bytes())
                            .map_err(|e| invalid(name, e))?,
                        http::HeaderValue::from_str(&h.value).map_err(|e| invalid(name, e))?,
                    ))
                })
                .collect()
        };
        Ok(Some(Edits {
            set: pairs(&e.set)?,
            add: pairs(&e.add)?,
            remove: e
                .remove
                .iter()
                .map(|n| http::HeaderName::from_bytes(n.as_bytes()).map_err(|e| invalid(name, e)))
                .collect::<Result<_, _>>()?,
        }))
    }

    pub fn apply(&self, headers: &mut HeaderMap) {
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
        for name in &self.remove {
            headers.remove(name);
        }
    }
}

#[derive(Debug, Clone)]
pub enum PathEdit {
    Full(Box<str>),
    Prefix(Box<str>),
}

impl PathEdit {
    fn compile(p: Option<&mesh::PathRewrite>) -> Option<Self> {
        match p?.kind.as_ref()? {
            path_rewrite::Kind::Full(f) => Some(PathEdit::Full(f.as_str().into())),
            path_rewrite::Kind::Prefix(p) => Some(PathEdit::Prefix(p.as_str().into())),
        }
    }

    /// The new path for `path`, given the prefix the rule matched on.
    pub fn apply(&self, path: &str, matched_prefix: Option<&str>) -> String {
        match self {
            PathEdit::Full(full) => full.to_string(),
            PathEdit::Prefix(replacement) => {
                let rest = matched_prefix
                    .and_then(|p| path.strip_prefix(p))
                    .unwrap_or(path);
                // Gateway API: "/foo" replaced by "/" on "/foo/bar" is "/bar".
                let joined = if replacement.ends_with('/') && rest.starts_with('/') {
                    format!("{}{}", replacement.trim_end_matches('/'), rest)
                } else {
                    format!("{replacement}{rest}")
                };
                if joined.is_empty() {
                    "/".into()
                } else {
                    joined
                }
            }
        }
    }
}

#[derive(Debug)]
pub struct Rewrite {
    pub path: Option<PathEdit>,
    pub authority: Option<http::uri::Authority>,
}

#[derive(Debug)]
pub struct Redirect {
    pub scheme: Option<Box<str>>,
    pub host: Option<Box<str>>,
    pub port: u16,
    pub path: Option<PathEdit>,
    pub status: http::StatusCode,
}

#[derive(Debug)]
pub struct Mirror {
    pub backend: Backend,
    pub per_million: u32,
}

/// Retry conditions, as bits.
pub mod retry_on {
    pub const STATUS_5XX: u16 = 1;
    pub const GATEWAY_ERROR: u16 = 1 << 1;
    pub const RESET: u16 = 1 << 2;
    pub const CONNECT_FAILURE: u16 = 1 << 3;
    pub const REFUSED_STREAM: u16 = 1 << 4;
    pub const RETRIABLE_CODES: u16 = 1 << 5;
    pub const CANCELLED: u16 = 1 << 6;
    pub const DEADLINE_EXCEEDED: u16 = 1 << 7;
    pub const INTERNAL: u16 = 1 << 8;
    pub const RESOURCE_EXHAUSTED: u16 = 1 << 9;
    pub const UNAVAILABLE: u16 = 1 << 10;

    pub fn parse(name: &str) -> Option<u16> {
        Some(match name {
            "5xx" => STATUS_5XX,
            "gateway-error" => GATEWAY_ERROR,
            "reset" => RESET,
            "connect-failure" => CONNECT_FAILURE,
            "refused-stream" => REFUSED_STREAM,
            "retriable-status-codes" => RETRIABLE_CODES,
            "cancelled" => CANCELLED,
            "deadline-exceeded" => DEADLINE_EXCEEDED,
            "internal" => INTERNAL,
            "resource-exhausted" => RESOURCE_EXHAUSTED,
            "unavailable" => UNAVAILABLE,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone)]
pub struct Retry {
    pub attempts: u32,
    pub per_try: Option<Duration>,
    pub on: u16,
    pub codes: Box<[u16]>,
    pub backoff: Duration,
}

impl Default for Retry {
    /// Istio's default: 2 retries on connect-failure, refused-stream,
    /// unavailable, cancelled and retriable-status-codes (none listed).
    fn default() -> Self {
        use retry_on::*;
        Retry {
            attempts: 2,
            per_try: None,
            on: CONNECT_FAILURE | REFUSED_STREAM | UNAVAILABLE | CANCELLED | RETRIABLE_CODES,
            codes: Box::new([]),
            backoff: Duration::from_millis(25),
        }
    }
}

impl Retry {
    fn compile(name: &str, r: Option<&mesh::RetryPolicy>) -> Result<Self, InvalidResource> {
        let Some(r) = r else {
            return Ok(Retry::default());
        };
        let mut on = 0;
        for condition in &r.retry_on {
            on |= retry_on::parse(condition)
                .ok_or_else(|| invalid(name, format!("retry condition {condition:?}")))?;
        }
        Ok(Retry {
            attempts: r.attempts.min(10),
            per_try: (r.per_try_timeout_ms > 0)
                .then(|| Duration::from_millis(r.per_try_timeout_ms)),
            on,
            codes: r
                .codes
                .iter()
                .filter_map(|c| u16::try_from(*c).ok())
                .collect(),
            backoff: Duration::from_millis(if r.backoff_ms == 0 { 25 } else { r.backoff_ms }),
        })
    }

    /// Whether an answer with `status` (and gRPC status, if any) is
    /// retried.
    pub fn retries_answer(&self, status: u16, grpc: Option<u32>) -> bool {
        use retry_on::*;
        let on = |bit| self.on & bit != 0;
        (on(STATUS_5XX) && status >= 500)
            || (on(GATEWAY_ERROR) && matches!(status, 502..=504))
            || (on(RETRIABLE_CODES) && self.codes.contains(&status))
            || match grpc {
                Some(1) => on(CANCELLED),
                Some(4) => on(DEADLINE_EXCEEDED),
                Some(8) => on(RESOURCE_EXHAUSTED),
                Some(13) => on(INTERNAL),
                Some(14) => on(UNAVAILABLE),
                _ => false,
            }
    }

    /// Whether a request that failed before an answer is retried: not
    /// sent at all (connect-failure, refused-stream), or reset after.
    pub fn retries_failure(&self, sent: bool) -> bool {
        use retry_on::*;
        if sent {
            self.on & (RESET | STATUS_5XX | GATEWAY_ERROR) != 0
        } else {
            self.on & (CONNECT_FAILURE | REFUSED_STREAM | RESET | STATUS_5XX | GATEWAY_ERROR) != 0
        }
    }
}

#[derive(Debug)]
pub struct Fault {
    pub delay: Option<(Duration, u32)>,
    /// (HTTP status, gRPC status if a gRPC abort, share in millionths).
    pub abort: Option<(u16, Option<u32>, u32)>,
}

/// Whether a share in millionths comes up.
pub fn chance(per_million: u32) -> bool {
    per_million >= 1_000_000 || (per_million > 0 && rand::random_range(0..1_000_000) < per_million)
}

/// One rule. What few rules have is boxed: a null pointer each in the
/// common rule, instead of hundreds of bytes (`cargo bench -p weft-proxy
/// --bench snapshot`).
#[derive(Debug)]
pub struct HttpRule {
    pub name: Name,
    pub matches: Box<[RequestMatch]>,
    pub backends: Box<[Backend]>,
    pub total_weight: u64,
    pub request_headers: Option<Box<Edits>>,
    pub response_headers: Option<Box<Edits>>,
    pub rewrite: Option<Box<Rewrite>>,
    pub redirect: Option<Box<Redirect>>,
    pub mirrors: Box<[Mirror]>,
    pub timeout: Option<Duration>,
    pub retries: Retry,
    pub fault: Option<Box<Fault>>,
}

impl HttpRule {
    fn compile(
        name: &str,
        r: &mesh::HttpRoute,
        names: &mut Interner,
    ) -> Result<Self, InvalidResource> {
        let backends: Box<[Backend]> = r
            .backends
            .iter()
            .map(|b| Backend::compile(name, b, names))
            .collect::<Result<_, _>>()?;
        let rewrite = r.rewrite.as_ref().map(|w| {
            Ok::<_, InvalidResource>(Rewrite {
                path: PathEdit::compile(w.path.as_ref()),
                authority: (!w.authority.is_empty())
                    .then(|| {
                        w.authority
                            .parse()
                            .map_err(|e| invalid(name, format!("authority: {e}")))
                    })
                    .transpose()?,
            })
        });
        let redirect = r.redirect.as_ref().map(|d| {
            Ok::<_, InvalidResource>(Redirect {
                scheme: (!d.scheme.is_empty()).then(|| d.scheme.as_str().into()),
                host: (!d.host.is_empty()).then(|| d.host.as_str().into()),
                port: u16::try_from(d.port).map_err(|_| invalid(name, "redirect port"))?,
                path: PathEdit::compile(d.path.as_ref()),
                status: http::StatusCode::from_u16(d.status as u16)
                    .ok()
                    .filter(|s| s.is_redirection())
                    .ok_or_else(|| invalid(name, "redirect status"))?,
            })
        });
        let fault = r.fault.as_ref().map(|f| {
            let status = if f.abort_grpc {
                200
            } else {
                f.abort_status as u16
            };
            Fault {
                delay: (f.delay_ms > 0)
                    .then(|| (Duration::from_millis(f.delay_ms), f.delay_per_million)),
                abort: (f.abort_grpc || f.abort_status > 0).then(|| {
                    (
                        status,
                        f.abort_grpc.then_some(f.abort_grpc_status),
                        f.abort_per_million,
                    )
                }),
            }
        });
        Ok(HttpRule {
            name: names.name(&r.name),
            matches: r
                .matches
                .iter()
                .map(|m| RequestMatch::compile(name, m))
                .collect::<Result<_, _>>()?,
            total_weight: backends.iter().map(|b| b.weight as u64).sum(),
            backends,
            request_headers: Edits::compile(name, r.request_headers.as_ref())?.map(Box::new),
            response_headers: Edits::compile(name, r.response_headers.as_ref())?.map(Box::new),
            rewrite: rewrite.transpose()?.map(Box::new),
            redirect: redirect.transpose()?.map(Box::new),
            mirrors: r
                .mirrors
                .iter()
                .filter_map(|m| {
                    Some(
                        Backend::compile(name, m.backend.as_ref()?, names).map(|backend| Mirror {
                            backend,
                            per_million: m.per_million,
                        }),
                    )
                })
                .collect::<Result<_, _>>()?,
            timeout: (r.timeout_ms > 0).then(|| Duration::from_millis(r.timeout_ms)),
            retries: Retry::compile(name, r.retries.as_ref())?,
            fault: fault.map(Box::new),
        })
    }
}

#[derive(Debug, Clone)]
pub struct TcpRule {
    pub port: u16,
    pub backends: Box<[Backend]>,
    pub total_weight: u64,
}

#[derive(Debug)]
pub struct RouteSet {
    pub name: Name,
    pub namespace: Name,
    pub source: mesh::RouteSource,
    pub hosts: Box<[Name]>,
    pub ports: Arc<[u16]>,
    pub consumer_namespace: Name,
    pub created: i64,
    pub http: Box<[Arc<HttpRule>]>,
    pub tcp: Box<[TcpRule]>,
    pub export_to: Box<[Name]>,
}

pub fn decode_route_set(
    name: &str,
    bytes: &[u8],
    names: &mut Interner,
) -> Result<RouteSet, InvalidResource> {
    let r = mesh::RouteSet::decode(bytes).map_err(|e| InvalidResource::Decode {
        name: name.into(),
        reason: e.to_string(),
    })?;
    let source =
        mesh::RouteSource::try_from(r.source).map_err(|_| invalid(name, "unknown route source"))?;
    Ok(RouteSet {
        name: names.name(name),
        namespace: names.name(&r.namespace),
        source,
        hosts: r.hosts.iter().map(|h| names.name(h)).collect(),
        ports: r
            .ports
            .iter()
            .filter_map(|p| u16::try_from(*p).ok())
            .collect(),
        consumer_namespace: names.name(&r.consumer_namespace),
        created: r.created,
        http: r
            .http
            .iter()
            .map(|h| HttpRule::compile(name, h, names).map(Arc::new))
            .collect::<Result<_, _>>()?,
        tcp: r
            .tcp
            .iter()
            .map(|t| {
                let backends: Box<[Backend]> = t
                    .backends
                    .iter()
                    .map(|b| Backend::compile(name, b, names))
                    .collect::<Result<_, _>>()?;
                Ok(TcpRule {
                    port: u16::try_from(t.port).map_err(|_| invalid(name, "port out of range"))?,
                    total_weight: backends.iter().map(|b| b.weight as u64).sum(),
                    backends,
                })
            })
            .collect::<Result<_, InvalidResource>>()?,
        export_to: r.export_to.iter().map(|n| names.name(n)).collect(),
    })
}

/// This pod as a caller.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Caller {
    pub namespace: Name,
    /// Sorted by key.
    pub labels: Box<[(Name, Name)]>,
}

impl Caller {
    pub fn label(&self, key: &str) -> Option<&str> {
        crate::resources::label_in(&self.labels, key)
    }
}

/// Istio's exportTo ("." was resolved to the object's namespace by the
/// control plane).
fn exported_to(export_to: &[Name], namespace: &str) -> bool {
    export_to.is_empty() || export_to.iter().any(|n| &**n == "*" || &**n == namespace)
}

/// One route to try: a rule, restricted to one of its matches (or none:
/// every request), on some service ports.
#[derive(Debug, Clone)]
pub struct Entry {
    pub rule: Arc<HttpRule>,
    pub matcher: Option<usize>,
    pub ports: Arc<[u16]>,
    /// The object it came from, for metrics and `/config_dump`.
    pub from: Name,
}

impl Entry {
    /// The prefix its match matched on, for prefix rewrites.
    pub fn matched_prefix(&self) -> Option<&str> {
        self.rule.matches[self.matcher?].path.as_ref()?.prefix()
    }
}

/// A service host's routes as this caller sees them, in the order tried.
#[derive(Debug, Default)]
pub struct HostRoutes {
    pub http: Box<[Entry]>,
    pub tcp: Box<[TcpRule]>,
}

impl HostRoutes {
    /// The first route `request` matches.
    pub fn route(&self, request: &RequestView) -> Option<&Entry> {
        self.http.iter().find(|e| {
            (e.ports.is_empty() || e.ports.contains(&request.port))
                && e.matcher
                    .is_none_or(|at| e.rule.matches[at].matches(request))
        })
    }

    /// The TCP route of `port`.
    pub fn tcp(&self, port: u16) -> Option<&TcpRule> {
        self.tcp.iter().find(|t| t.port == 0 || t.port == port)
    }
}

/// Every host's routes for `caller`, sorted by host.
pub fn host_routes(sets: &[Arc<RouteSet>], caller: &Caller) -> Box<[(Name, Arc<HostRoutes>)]> {
    let mut by_host: BTreeMap<Name, Vec<&Arc<RouteSet>>> = BTreeMap::new();
    for set in sets {
        let visible = exported_to(&set.export_to, &caller.namespace)
            && (set.consumer_namespace.is_empty() || set.consumer_namespace == caller.namespace);
        if visible {
            for host in &set.hosts {
                by_host.entry(host.clone()).or_default().push(set);
            }
        }
    }
    by_host
        .into_iter()
        .map(|(host, sets)| (host, Arc::new(routes_of_host(sets, caller))))
        .collect()
}

fn routes_of_host(mut sets: Vec<&Arc<RouteSet>>, caller: &Caller) -> HostRoutes {
    // Oldest first, then by name: Istio's and Gateway API's tie-breaks.
    sets.sort_by(|a, b| {
        (a.created, &a.namespace, &a.name).cmp(&(b.created, &b.namespace, &b.name))
    });
    let gateway: Vec<&Arc<RouteSet>> = sets
        .iter()
        .copied()
        .filter(|s| s.source != mesh::RouteSource::VirtualService)
        .collect();
    if !gateway.is_empty() {
        // The mesh profile: a consumer route replaces the producer's for
        // the callers it is for.
        let consumer = gateway.iter().any(|s| !s.consumer_namespace.is_empty());
        let mut entries = Vec::new();
        for (order, set) in gateway.iter().enumerate() {
            if consumer && set.consumer_namespace.is_empty() {
                continue;
            }
            for (r, rule) in set.http.iter().enumerate() {
                let entry = |matcher| Entry {
                    rule: rule.clone(),
                    matcher,
                    ports: set.ports.clone(),
                    from: set.name.clone(),
                };
                if rule.matches.is_empty() {
                    // No match is every request, ranked as a prefix "/".
                    let rank = (
                        1,
                        std::cmp::Reverse(1),
                        true,
                        std::cmp::Reverse(0),
                        std::cmp::Reverse(0),
                    );
                    entries.push((rank, order, r, 0, entry(None)));
                }
                for (m, matcher) in rule.matches.iter().enumerate() {
                    entries.push((matcher.precedence(), order, r, m, entry(Some(m))));
                }
            }
        }
        entries.sort_by_key(|e| (e.0, e.1, e.2, e.3));
        return HostRoutes {
            http: entries.into_iter().map(|e| e.4).collect(),
            tcp: Box::new([]),
        };
    }
    // VirtualServices: the oldest for the host wins (Istio does not merge
    // them for sidecars); its rules in order, first match wins.
    let Some(set) = sets.first() else {
        return HostRoutes::default();
    };
    let mut entries = Vec::new();
    for rule in set.http.iter() {
        if rule.matches.is_empty() {
            entries.push(Entry {
                rule: rule.clone(),
                matcher: None,
                ports: set.ports.clone(),
                from: set.name.clone(),
            });
            continue;
        }
        for (m, matcher) in rule.matches.iter().enumerate() {
            if matcher.for_caller(caller) {
                entries.push(Entry {
                    rule: rule.clone(),
                    matcher: Some(m),
                    ports: set.ports.clone(),
                    from: set.name.clone(),
                });
            }
        }
    }
    HostRoutes {
        http: entries.into(),
        tcp: set.tcp.clone(),
    }
}

// ---- Destination policy ----

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Simple {
    #[default]
    LeastRequest,
    RoundRobin,
    Random,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    Header(http::HeaderName),
    Cookie(Box<str>),
    SourceIp,
    QueryParam(Box<str>),
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Locality {
    pub disabled: bool,
    /// (from region, to region).
    pub failover: Box<[(Box<str>, Box<str>)]>,
    pub failover_priority: Box<[Box<str>]>,
    /// (from "region/zone/subzone" pattern, [(to pattern, weight)]).
    pub distribute: Distribute,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolLimits {
    pub max_connections: u32,
    pub max_requests: u32,
    pub max_pending: u32,
    pub max_retries: u32,
    pub connect_timeout: Option<Duration>,
}

/// The policy in force for one destination (host, subset, port).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    pub simple: Simple,
    pub hash: Option<HashKey>,
    pub locality: Option<Locality>,
    pub pool: Option<PoolLimits>,
    pub outlier: Option<outlier::Policy>,
}

impl Policy {
    /// Takes the parts `p` sets over this one's.
    fn overlay(&mut self, name: &str, p: &mesh::TrafficPolicy) -> Result<(), InvalidResource> {
        if p.has_lb {
            self.simple = match mesh::LoadBalancerSimple::try_from(p.simple) {
                Ok(mesh::LoadBalancerSimple::RoundRobin) => Simple::RoundRobin,
                Ok(mesh::LoadBalancerSimple::Random) => Simple::Random,
                Ok(mesh::LoadBalancerSimple::Passthrough) | Err(_) => {
                    return Err(invalid(name, "load balancer not supported"));
                }
                _ => Simple::LeastRequest,
            };
            self.hash = match p.hash.as_ref().and_then(|h| h.key.as_ref()) {
                None => None,
                Some(consistent_hash::Key::Header(h)) => Some(HashKey::Header(
                    http::HeaderName::from_bytes(h.as_bytes()).map_err(|e| invalid(name, e))?,
                )),
                Some(consistent_hash::Key::Cookie(c)) => Some(HashKey::Cookie(c.as_str().into())),
                Some(consistent_hash::Key::SourceIp(_)) => Some(HashKey::SourceIp),
                Some(consistent_hash::Key::QueryParam(q)) => {
                    Some(HashKey::QueryParam(q.as_str().into()))
                }
            };
        }
        if p.has_locality
            && let Some(l) = &p.locality
        {
            self.locality = Some(Locality {
                disabled: l.disabled,
                failover: l
                    .failover
                    .iter()
                    .map(|f| (f.from.as_str().into(), f.to.as_str().into()))
                    .collect(),
                failover_priority: l
                    .failover_priority
                    .iter()
                    .map(|k| k.as_str().into())
                    .collect(),
                distribute: l
                    .distribute
                    .iter()
                    .map(|d| {
                        let mut to: Vec<(Box<str>, u32)> =
                            d.to.iter().map(|(k, v)| (k.as_str().into(), *v)).collect();
                        to.sort();
                        (d.from.as_str().into(), to.into_boxed_slice())
                    })
                    .collect(),
            });
        }
        if p.has_pool
            && let Some(pool) = &p.pool
        {
            self.pool = Some(PoolLimits {
                max_connections: pool.max_connections,
                max_requests: pool.max_requests,
                max_pending: pool.max_pending_requests,
                max_retries: pool.max_retries,
                connect_timeout: (pool.connect_timeout_ms > 0)
                    .then(|| Duration::from_millis(pool.connect_timeout_ms)),
            });
        }
        if p.has_outlier
            && let Some(o) = &p.outlier
        {
            let defaults = outlier::Policy::default();
            let consecutive = if o.consecutive_5xx > 0 {
                o.consecutive_5xx
            } else {
                o.consecutive_gateway_errors
            };
            self.outlier = Some(outlier::Policy {
                consecutive_failures: if consecutive == 0 {
                    u32::MAX
                } else {
                    consecutive
                },
                base_ejection: if o.base_ejection_ms > 0 {
                    Duration::from_millis(o.base_ejection_ms)
                } else {
                    defaults.base_ejection
                },
                max_ejection: defaults.max_ejection,
                max_ejected_share: f64::from(o.max_ejection_percent.min(100)) / 100.0,
            });
        }
        Ok(())
    }
}

#[derive(Debug)]
pub struct Subset {
    pub name: Name,
    /// Sorted by key.
    pub labels: Box<[(Name, Name)]>,
}

/// Labels that name where an endpoint runs rather than what the pod
/// carries.
const CLUSTER_LABELS: [&str; 2] = ["topology.weft.io/cluster", "topology.istio.io/cluster"];
const NETWORK_LABELS: [&str; 2] = ["topology.weft.io/network", "topology.istio.io/network"];

impl Subset {
    pub fn selects(&self, workload: &Workload) -> bool {
        selects(&self.labels, workload)
    }
}

/// Whether `workload` carries every label of `labels` (its cluster and
/// network, region and zone count as labels).
pub fn selects(labels: &[(Name, Name)], workload: &Workload) -> bool {
    labels
        .iter()
        .all(|(key, value)| label_of(key, workload) == Some(&**value))
}

/// A workload's value for a label key, topology keys included.
pub fn label_of<'a>(key: &str, workload: &'a Workload) -> Option<&'a str> {
    let profile = &workload.profile;
    if CLUSTER_LABELS.contains(&key) {
        Some(&profile.cluster_id)
    } else if NETWORK_LABELS.contains(&key) {
        Some(&profile.network)
    } else if key == "topology.kubernetes.io/region" {
        Some(&profile.locality.region)
    } else if key == "topology.kubernetes.io/zone" {
        Some(&profile.locality.zone)
    } else {
        profile.label(key)
    }
}

#[derive(Debug)]
pub struct Destination {
    pub name: Name,
    pub namespace: Name,
    pub host: Name,
    pub created: i64,
    pub export_to: Box<[Name]>,
    pub caller_labels: BTreeMap<String, String>,
    pub subsets: Box<[Subset]>,
    /// Every (subset, port) combination's policy that is not the default,
    /// compiled on arrival (equal ones shared); port 0 stands for the
    /// ports without settings of their own.
    compiled: Box<[(Name, u16, Arc<Policy>)]>,
}

pub fn decode_destination(
    name: &str,
    bytes: &[u8],
    names: &mut Interner,
) -> Result<Destination, InvalidResource> {
    let d = mesh::DestinationPolicy::decode(bytes).map_err(|e| InvalidResource::Decode {
        name: name.into(),
        reason: e.to_string(),
    })?;
    // Every combination is compiled once here, so a bad one is refused
    // on arrival and a request only looks its policy up.
    let mut ports: Vec<u16> = d.ports.iter().map(|p| p.port as u16).collect();
    for subset in &d.subsets {
        ports.extend(subset.ports.iter().map(|p| p.port as u16));
    }
    ports.push(0);
    ports.sort_unstable();
    ports.dedup();
    let default = Policy::default();
    let mut compiled: Vec<(Name, u16, Arc<Policy>)> = Vec::new();
    let subsets = std::iter::once(None).chain(d.subsets.iter().map(Some));
    for subset in subsets {
        for &port in &ports {
            let policy = policy_for(name, &d, subset, port)?;
            if policy == default {
                continue;
            }
            let shared = compiled
                .iter()
                .find(|(_, _, p)| **p == policy)
                .map(|(_, _, p)| p.clone())
                .unwrap_or_else(|| Arc::new(policy));
            let subset = names.name(subset.map_or("", |s| s.name.as_str()));
            compiled.push((subset, port, shared));
        }
    }
    Ok(Destination {
        name: names.name(name),
        namespace: names.name(&d.namespace),
        host: names.name(&d.host),
        created: d.created,
        export_to: d.export_to.iter().map(|n| names.name(n)).collect(),
        caller_labels: d.caller_labels.into_iter().collect(),
        subsets: d
            .subsets
            .iter()
            .map(|s| {
                let mut labels: Vec<(Name, Name)> = s
                    .labels
                    .iter()
                    .map(|(k, v)| (names.name(k), names.name(v)))
                    .collect();
                labels.sort();
                Subset {
                    name: names.name(&s.name),
                    labels: labels.into(),
                }
            })
            .collect(),
        compiled: compiled.into(),
    })
}

/// The policy for `subset` on `port`: the host's, its port level, the
/// subset's, then the subset's port level, each overriding the parts it
/// sets.
fn policy_for(
    name: &str,
    d: &mesh::DestinationPolicy,
    subset: Option<&mesh::Subset>,
    port: u16,
) -> Result<Policy, InvalidResource> {
    fn at_port(list: &[mesh::PortPolicy], port: u16) -> Option<&mesh::TrafficPolicy> {
        list.iter()
            .find(|p| p.port == u32::from(port))
            .and_then(|p| p.policy.as_ref())
    }
    let mut layers = vec![d.policy.as_ref(), at_port(&d.ports, port)];
    if let Some(subset) = subset {
        layers.push(subset.policy.as_ref());
        layers.push(at_port(&subset.ports, port));
    }
    let mut policy = Policy::default();
    for layer in layers.into_iter().flatten() {
        policy.overlay(name, layer)?;
    }
    Ok(policy)
}

impl Destination {
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| &*s.name == name)
    }
}

/// Every host's destination policy for `caller`: among several for one
/// host, Istio's lookup order (the caller's namespace, then the host's own
/// service namespace, then any other), oldest first.
pub fn destinations(all: &[Arc<Destination>], caller: &Caller) -> Box<[(Name, Arc<Destination>)]> {
    let mut by_host: BTreeMap<Name, Vec<&Arc<Destination>>> = BTreeMap::new();
    for d in all {
        let selected = d
            .caller_labels
            .iter()
            .all(|(k, v)| caller.label(k) == Some(v.as_str()));
        if selected && exported_to(&d.export_to, &caller.namespace) {
            by_host.entry(d.host.clone()).or_default().push(d);
        }
    }
    by_host
        .into_iter()
        .filter_map(|(host, mut list)| {
            let service_namespace = host.split('.').nth(1).unwrap_or_default().to_string();
            list.sort_by_key(|d| {
                let rank = if d.namespace == caller.namespace {
                    0
                } else if *d.namespace == *service_namespace {
                    1
                } else {
                    2
                };
                (rank, d.created, d.name.clone())
            });
            Some((host, (*list.first()?).clone()))
        })
        .collect()
}

impl Destination {
    /// The policy for `subset` ("" for none) on `port`.
    pub fn policy(&self, subset: &str, port: u16) -> Option<&Arc<Policy>> {
        let find = |port| {
            self.compiled
                .iter()
                .find(|(s, p, _)| **s == *subset && *p == port)
                .map(|(_, _, policy)| policy)
        };
        find(port).or_else(|| find(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::fixtures::{self, workload_message};

    fn exact(v: &str) -> Option<mesh::ValueMatch> {
        Some(mesh::ValueMatch {
            kind: Some(value_match::Kind::Exact(v.into())),
            invert: false,
        })
    }

    fn prefix(v: &str) -> Option<mesh::ValueMatch> {
        Some(mesh::ValueMatch {
            kind: Some(value_match::Kind::Prefix(v.into())),
            invert: false,
        })
    }

    fn rule(name: &str, matches: Vec<mesh::RouteMatch>) -> mesh::HttpRoute {
        mesh::HttpRoute {
            name: name.into(),
            matches,
            backends: vec![mesh::Backend {
                host: "echo.demo.svc.cluster.local".into(),
                weight: 1,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn path(m: Option<mesh::ValueMatch>) -> mesh::RouteMatch {
        mesh::RouteMatch {
            path: m,
            ..Default::default()
        }
    }

    fn set(
        name: &str,
        source: mesh::RouteSource,
        created: i64,
        http: Vec<mesh::HttpRoute>,
    ) -> Arc<RouteSet> {
        Arc::new(
            decode_route_set(
                name,
                &mesh::RouteSet {
                    name: name.into(),
                    namespace: "demo".into(),
                    source: source as i32,
                    hosts: vec!["echo.demo.svc.cluster.local".into()],
                    created,
                    http,
                    export_to: vec!["*".into()],
                    ..Default::default()
                }
                .encode_to_vec(),
                &mut Interner::default(),
            )
            .unwrap(),
        )
    }

    fn request<'a>(
        path: &'a str,
        query: Option<&'a str>,
        headers: &'a HeaderMap,
    ) -> RequestView<'a> {
        RequestView {
            method: "GET",
            authority: "echo.demo",
            scheme: "http",
            path,
            query,
            headers,
            port: 80,
        }
    }

    fn chosen(routes: &HostRoutes, path: &str, headers: &HeaderMap) -> Option<String> {
        routes
            .route(&request(path, None, headers))
            .map(|e| e.rule.name.to_string())
    }

    #[test]
    fn gateway_routes_follow_precedence_across_objects_and_vs_the_oldest_wins() {
        use mesh::RouteSource::{HttpRoute, VirtualService};
        let older = set(
            "httproute/demo/a",
            HttpRoute,
            1,
            vec![rule("prefix-a", vec![path(prefix("/a"))])],
        );
        let newer = set(
            "httproute/demo/b",
            HttpRoute,
            2,
            vec![
                rule("prefix-a-b", vec![path(prefix("/a/b"))]),
                rule("exact-a-b-c", vec![path(exact("/a/b/c"))]),
            ],
        );
        let routes = host_routes(&[older, newer], &Caller::default());
        let routes = &routes[0].1;
        let none = HeaderMap::new();
        // Exact beats any prefix, the longer prefix beats the shorter,
        // whatever the objects' ages and the rules' order.
        assert_eq!(
            chosen(routes, "/a/b/c", &none).as_deref(),
            Some("exact-a-b-c")
        );
        assert_eq!(
            chosen(routes, "/a/b/d", &none).as_deref(),
            Some("prefix-a-b")
        );
        assert_eq!(chosen(routes, "/a/x", &none).as_deref(), Some("prefix-a"));
        assert_eq!(chosen(routes, "/z", &none), None);

        let old_vs = set(
            "virtualservice/demo/old",
            VirtualService,
            1,
            vec![rule("old", vec![])],
        );
        let new_vs = set(
            "virtualservice/demo/new",
            VirtualService,
            5,
            vec![rule("new", vec![])],
        );
        let routes = host_routes(&[new_vs, old_vs], &Caller::default());
        assert_eq!(chosen(&routes[0].1, "/", &none).as_deref(), Some("old"));
    }

    #[test]
    fn headers_queries_inversion_and_the_caller_settle_a_match() {
        let mut canary = rule(
            "canary",
            vec![mesh::RouteMatch {
                headers: vec![mesh::NamedMatch {
                    name: "x-canary".into(),
                    value: exact("yes"),
                }],
                query_params: vec![mesh::NamedMatch {
                    name: "v".into(),
                    value: Some(mesh::ValueMatch {
                        kind: Some(value_match::Kind::Regex("[0-9]+".into())),
                        invert: false,
                    }),
                }],
                ..Default::default()
            }],
        );
        canary.name = "canary".into();
        let not_internal = rule(
            "public",
            vec![mesh::RouteMatch {
                headers: vec![mesh::NamedMatch {
                    name: "x-internal".into(),
                    value: Some(mesh::ValueMatch {
                        kind: Some(value_match::Kind::Present(true)),
                        invert: true,
                    }),
                }],
                ..Default::default()
            }],
        );
        let only_v2_callers = rule(
            "from-v2",
            vec![mesh::RouteMatch {
                source_labels: [("version".to_string(), "v2".to_string())].into(),
                ..Default::default()
            }],
        );
        let vs = set(
            "virtualservice/demo/echo",
            mesh::RouteSource::VirtualService,
            1,
            vec![only_v2_callers, canary, not_internal],
        );
        let caller = Caller {
            namespace: "demo".into(),
            labels: Box::new([(Name::from("version"), Name::from("v1"))]),
        };
        let routes = host_routes(std::slice::from_ref(&vs), &caller);
        let routes = &routes[0].1;
        let mut headers = HeaderMap::new();
        headers.insert("x-canary", "yes".parse().unwrap());
        let pick = |query| {
            routes
                .route(&request("/", query, &headers))
                .map(|e| e.rule.name.to_string())
        };
        assert_eq!(pick(Some("v=12")).as_deref(), Some("canary"));
        assert_eq!(
            pick(Some("v=x")).as_deref(),
            Some("public"),
            "the regex is whole-value"
        );
        headers.insert("x-internal", "1".parse().unwrap());
        let pick = |query| {
            routes
                .route(&request("/", query, &headers))
                .map(|e| e.rule.name.to_string())
        };
        assert_eq!(pick(None), None, "withoutHeaders: present means no match");
        // A caller with version v2 sees the sourceLabels rule first.
        let v2 = Caller {
            namespace: "demo".into(),
            labels: Box::new([(Name::from("version"), Name::from("v2"))]),
        };
        let routes = host_routes(&[vs], &v2);
        assert_eq!(
            chosen(&routes[0].1, "/", &HeaderMap::new()).as_deref(),
            Some("from-v2")
        );
    }

    #[test]
    fn a_consumer_route_replaces_the_producers_for_its_namespace_only() {
        let producer = set(
            "httproute/demo/p",
            mesh::RouteSource::HttpRoute,
            1,
            vec![rule("producer", vec![])],
        );
        let mut consumer = mesh::RouteSet {
            name: "httproute/client/c".into(),
            namespace: "client".into(),
            source: mesh::RouteSource::HttpRoute as i32,
            hosts: vec!["echo.demo.svc.cluster.local".into()],
            consumer_namespace: "client".into(),
            http: vec![rule("consumer", vec![path(prefix("/"))])],
            ..Default::default()
        };
        consumer.export_to = vec!["*".into()];
        let consumer = Arc::new(
            decode_route_set("c", &consumer.encode_to_vec(), &mut Interner::default()).unwrap(),
        );
        let all = [producer, consumer];
        let route_for = |namespace: &str| {
            let caller = Caller {
                namespace: namespace.into(),
                labels: Box::new([]),
            };
            let routes = host_routes(&all, &caller);
            routes[0]
                .1
                .http
                .iter()
                .map(|e| e.rule.name.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(route_for("client"), ["consumer"]);
        assert_eq!(route_for("other"), ["producer"]);
    }

    #[test]
    fn garbage_and_patterns_that_do_not_build_are_refused_on_arrival() {
        let names = &mut Interner::default();
        assert!(decode_route_set("x", b"\xff\xff\xff garbage", names).is_err());
        assert!(decode_destination("x", b"\x0a\xff", names).is_err());
        let with_regex = |pattern: String| mesh::RouteSet {
            http: vec![rule(
                "r",
                vec![path(Some(mesh::ValueMatch {
                    kind: Some(value_match::Kind::Regex(pattern)),
                    invert: false,
                }))],
            )],
            ..Default::default()
        };
        for pattern in ["([".to_string(), "(a{1000}){1000}".to_string()] {
            let sent = with_regex(pattern.clone()).encode_to_vec();
            assert!(decode_route_set("x", &sent, names).is_err(), "{pattern}");
        }
        let bad_header = mesh::RouteSet {
            http: vec![mesh::HttpRoute {
                request_headers: Some(mesh::HeaderEdits {
                    set: vec![mesh::HeaderValue {
                        name: "bad name".into(),
                        value: "v".into(),
                    }],
                    ..Default::default()
                }),
                ..rule("r", vec![])
            }],
            ..Default::default()
        };
        assert!(decode_route_set("x", &bad_header.encode_to_vec(), names).is_err());
    }

    #[test]
    fn weights_split_traffic_in_proportion() {
        let backends = [
            Backend {
                host: "a".into(),
                port: 0,
                subset: "v1".into(),
                weight: 90,
            },
            Backend {
                host: "a".into(),
                port: 0,
                subset: "v2".into(),
                weight: 10,
            },
        ];
        let v2 = (0..20_000)
            .filter(|_| &*weighted(&backends, 100).unwrap().subset == "v2")
            .count();
        assert!(
            (1_600..2_400).contains(&v2),
            "{v2} of 20000 to the 10% backend"
        );
        let zero = [Backend {
            weight: 0,
            ..backends[0].clone()
        }];
        assert!(weighted(&zero, 0).is_none());
    }

    #[test]
    fn rewrites_replace_the_matched_prefix_or_the_whole_path() {
        let p = PathEdit::Prefix("/v2".into());
        assert_eq!(p.apply("/api/users", Some("/api")), "/v2/users");
        assert_eq!(
            PathEdit::Prefix("/".into()).apply("/api/users", Some("/api")),
            "/users"
        );
        assert_eq!(PathEdit::Prefix("".into()).apply("/api", Some("/api")), "/");
        assert_eq!(
            PathEdit::Full("/x".into()).apply("/api/users", Some("/api")),
            "/x"
        );
    }

    #[test]
    fn retry_conditions_follow_envoys_names() {
        let r = Retry::compile(
            "r",
            Some(&mesh::RetryPolicy {
                attempts: 3,
                retry_on: vec![
                    "gateway-error".into(),
                    "retriable-status-codes".into(),
                    "unavailable".into(),
                ],
                codes: vec![409],
                set: true,
                ..Default::default()
            }),
        )
        .unwrap();
        assert!(r.retries_answer(503, None));
        assert!(r.retries_answer(409, None));
        assert!(!r.retries_answer(500, None), "500 is not a gateway error");
        assert!(r.retries_answer(200, Some(14)), "gRPC UNAVAILABLE");
        let default = Retry::default();
        assert_eq!(default.attempts, 2);
        assert!(
            !default.retries_answer(503, None),
            "Istio's default does not retry 503s"
        );
        assert!(default.retries_failure(false));
    }

    #[test]
    fn subsets_select_by_labels_and_cluster_and_policies_layer() {
        let policy = |simple: mesh::LoadBalancerSimple| mesh::TrafficPolicy {
            simple: simple as i32,
            has_lb: true,
            ..Default::default()
        };
        let message = mesh::DestinationPolicy {
            name: "demo/echo".into(),
            namespace: "demo".into(),
            host: "echo.demo.svc.cluster.local".into(),
            policy: Some(mesh::TrafficPolicy {
                pool: Some(mesh::ConnectionPool {
                    max_requests: 7,
                    ..Default::default()
                }),
                has_pool: true,
                ..policy(mesh::LoadBalancerSimple::RoundRobin)
            }),
            ports: vec![mesh::PortPolicy {
                port: 90,
                policy: Some(policy(mesh::LoadBalancerSimple::Random)),
            }],
            subsets: vec![
                mesh::Subset {
                    name: "c2".into(),
                    labels: [("topology.istio.io/cluster".to_string(), "c2".to_string())].into(),
                    policy: Some(mesh::TrafficPolicy {
                        hash: Some(mesh::ConsistentHash {
                            key: Some(consistent_hash::Key::Header("x-user".into())),
                        }),
                        ..policy(mesh::LoadBalancerSimple::LbDefault)
                    }),
                    ports: vec![],
                },
                mesh::Subset {
                    name: "v1".into(),
                    labels: [("version".to_string(), "v1".to_string())].into(),
                    policy: None,
                    ports: vec![],
                },
            ],
            export_to: vec!["*".into()],
            ..Default::default()
        };
        let d = decode_destination(
            "demo/echo",
            &message.encode_to_vec(),
            &mut Interner::default(),
        )
        .unwrap();
        let host = d.policy("", 80).unwrap();
        assert_eq!(
            (host.simple, host.pool.as_ref().unwrap().max_requests),
            (Simple::RoundRobin, 7)
        );
        assert_eq!(
            d.policy("", 90).unwrap().simple,
            Simple::Random,
            "port level"
        );
        let c2 = d.policy("c2", 80).unwrap();
        assert_eq!(c2.hash, Some(HashKey::Header("x-user".parse().unwrap())));
        assert_eq!(
            c2.pool.as_ref().unwrap().max_requests,
            7,
            "the pool is inherited"
        );
        let mut in_c2 = workload_message("c2/demo/echo", [10, 2, 0, 1]);
        in_c2.cluster_id = "c2".into();
        in_c2.labels = [("version".to_string(), "v2".to_string())].into();
        let in_c2 = fixtures::workload(in_c2, &mut Interner::default());
        let mut v1 = workload_message("c1/demo/echo", [10, 1, 0, 1]);
        v1.labels = [("version".to_string(), "v1".to_string())].into();
        let v1 = fixtures::workload(v1, &mut Interner::default());
        assert!(d.subset("c2").unwrap().selects(&in_c2));
        assert!(!d.subset("c2").unwrap().selects(&v1));
        assert!(d.subset("v1").unwrap().selects(&v1));
        assert!(!d.subset("v1").unwrap().selects(&in_c2));
    }
}
