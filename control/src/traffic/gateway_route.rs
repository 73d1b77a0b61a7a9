//! Gateway API `HTTPRoute` and `GRPCRoute` (v1) attached to a Service: the
//! mesh profile (GAMMA). A route in its Service's namespace is a producer
//! route, for every caller; one in another namespace is a consumer route,
//! for callers in its own namespace only. Parents that are not Services
//! (Gateways) belong to other controllers: a route with none of ours is
//! left alone. Each rule's matches keep Gateway API's precedence, which the
//! proxy applies across all routes of a host.

use serde_json::Value;
use weft_xds_proto::mesh::{self, path_rewrite, value_match};

use super::{Context, Reference, Resource, TrafficInfo, duration_ms, meta, regex_checked};
use crate::security::Problems;

/// Written as `controllerName` on the route's status.parents.
pub const CONTROLLER: &str = "weft.io/mesh-controller";

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    Http,
    Grpc,
}

const FILTERS_HTTP: &[&str] = &[
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "URLRewrite",
    "RequestRedirect",
    "RequestMirror",
];
const FILTERS_GRPC: &[&str] = &[
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestMirror",
];

/// Whether a parentRef names a Service (core group).
fn is_service(parent: &Value) -> bool {
    matches!(parent["group"].as_str(), Some("" | "core"))
        && parent["kind"].as_str() == Some("Service")
}

pub fn read(object: &Value, flavor: Flavor, domain_suffix: &str) -> TrafficInfo {
    let ctx = Context::of(object, domain_suffix);
    let namespace = ctx.namespace;
    let spec = &object["spec"];
    let (generation, created, status) = meta(object);
    let mut problems = Problems::default();
    let mut ignored = Vec::new();
    let mut references = Vec::new();
    problems.unknown_fields("spec", spec, &["parentRefs", "hostnames", "rules"]);
    let parents: Vec<Value> = spec["parentRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| is_service(p))
        .cloned()
        .collect();
    let mut hosts = Vec::new();
    let mut ports = Vec::new();
    let mut consumer_namespace = String::new();
    for (i, parent) in parents.iter().enumerate() {
        let at = format!("spec.parentRefs[{i}]");
        let Some(name) = parent["name"].as_str() else {
            problems.add(&format!("{at}.name"), "a parent Service needs a name");
            continue;
        };
        let service_namespace = parent["namespace"].as_str().unwrap_or(namespace);
        if service_namespace != namespace {
            // A consumer route: the route's namespace calls another's
            // Service and shapes only its own calls.
            consumer_namespace = namespace.to_string();
        }
        if !parent["sectionName"].is_null() {
            problems.add(
                &format!("{at}.sectionName"),
                "use port to pick a Service port",
            );
        }
        hosts.push(ctx.service(name, service_namespace));
        if let Some(port) = parent["port"].as_u64() {
            ports.push(port as u32);
        }
    }
    if spec["hostnames"].as_array().is_some_and(|h| !h.is_empty()) {
        // The mesh profile: a Service parent's hostnames have no meaning.
        ignored.push("spec.hostnames".to_string());
    }
    let mut http = Vec::new();
    for (i, rule) in spec["rules"].as_array().into_iter().flatten().enumerate() {
        let at = format!("spec.rules[{i}]");
        http.push(rule_of(
            &ctx,
            &at,
            i,
            rule,
            flavor,
            &mut problems,
            &mut references,
        ));
    }
    let source = match flavor {
        Flavor::Http => mesh::RouteSource::HttpRoute,
        Flavor::Grpc => mesh::RouteSource::GrpcRoute,
    };
    TrafficInfo {
        generation,
        resource: Resource::Routes(mesh::RouteSet {
            name: object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .into(),
            namespace: namespace.into(),
            source: source as i32,
            hosts,
            ports,
            consumer_namespace,
            created,
            http,
            tcp: Vec::new(),
            export_to: vec!["*".into()],
        }),
        problems: problems.into_list(),
        ignored,
        references,
        not_for_mesh: parents.is_empty(),
        parents,
        status,
    }
}

fn rule_of(
    ctx: &Context,
    at: &str,
    index: usize,
    rule: &Value,
    flavor: Flavor,
    problems: &mut Problems,
    references: &mut Vec<Reference>,
) -> mesh::HttpRoute {
    let known: &[&str] = match flavor {
        Flavor::Http => &[
            "name",
            "matches",
            "filters",
            "backendRefs",
            "timeouts",
            "retry",
            "sessionPersistence",
        ],
        Flavor::Grpc => &[
            "name",
            "matches",
            "filters",
            "backendRefs",
            "sessionPersistence",
        ],
    };
    problems.unknown_fields(at, rule, known);
    if !rule["sessionPersistence"].is_null() {
        problems.add(&format!("{at}.sessionPersistence"), "not supported by weft; a DestinationRule's consistentHash keeps callers on one endpoint");
    }
    let mut matches = Vec::new();
    let mut prefix = None;
    for (j, m) in rule["matches"].as_array().into_iter().flatten().enumerate() {
        let at = format!("{at}.matches[{j}]");
        let read = match flavor {
            Flavor::Http => http_match(&at, m, problems),
            Flavor::Grpc => grpc_match(&at, m, problems),
        };
        if let Some(value_match::Kind::Prefix(p)) = read.path.as_ref().and_then(|p| p.kind.as_ref())
        {
            prefix = Some(p.clone());
        }
        matches.push(read);
    }
    if matches.is_empty() {
        // Gateway API: no match is a prefix match on "/".
        matches.push(mesh::RouteMatch {
            path: Some(mesh::ValueMatch {
                kind: Some(value_match::Kind::Prefix("/".into())),
                invert: false,
            }),
            ..Default::default()
        });
    }
    let mut route = mesh::HttpRoute {
        name: rule["name"]
            .as_str()
            .map_or_else(|| format!("rule-{index}"), String::from),
        matches,
        ..Default::default()
    };
    for (j, backend) in rule["backendRefs"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let at = format!("{at}.backendRefs[{j}]");
        route
            .backends
            .push(backend_ref(ctx, &at, backend, problems, references));
    }
    let allowed = match flavor {
        Flavor::Http => FILTERS_HTTP,
        Flavor::Grpc => FILTERS_GRPC,
    };
    for (j, filter) in rule["filters"].as_array().into_iter().flatten().enumerate() {
        let at = format!("{at}.filters[{j}]");
        let kind = filter["type"].as_str().unwrap_or_default();
        if !allowed.contains(&kind) {
            problems.add(
                &format!("{at}.type"),
                format!("{kind:?} is not supported by weft"),
            );
            continue;
        }
        match kind {
            "RequestHeaderModifier" => {
                route.request_headers = Some(header_modifier(
                    &format!("{at}.requestHeaderModifier"),
                    &filter["requestHeaderModifier"],
                    problems,
                ))
            }
            "ResponseHeaderModifier" => {
                route.response_headers = Some(header_modifier(
                    &format!("{at}.responseHeaderModifier"),
                    &filter["responseHeaderModifier"],
                    problems,
                ))
            }
            "URLRewrite" => {
                let v = &filter["urlRewrite"];
                problems.unknown_fields(&format!("{at}.urlRewrite"), v, &["hostname", "path"]);
                route.rewrite = Some(mesh::Rewrite {
                    path: path_modifier(
                        &format!("{at}.urlRewrite.path"),
                        &v["path"],
                        prefix.is_some(),
                        problems,
                    ),
                    authority: v["hostname"].as_str().unwrap_or_default().into(),
                });
            }
            "RequestRedirect" => {
                let v = &filter["requestRedirect"];
                problems.unknown_fields(
                    &format!("{at}.requestRedirect"),
                    v,
                    &["scheme", "hostname", "path", "port", "statusCode"],
                );
                route.redirect = Some(mesh::Redirect {
                    scheme: v["scheme"].as_str().unwrap_or_default().into(),
                    host: v["hostname"].as_str().unwrap_or_default().into(),
                    port: v["port"].as_u64().unwrap_or(0) as u32,
                    path: path_modifier(
                        &format!("{at}.requestRedirect.path"),
                        &v["path"],
                        prefix.is_some(),
                        problems,
                    ),
                    // Gateway API's default is 302.
                    status: v["statusCode"].as_u64().unwrap_or(302) as u32,
                });
            }
            _ => {
                let v = &filter["requestMirror"];
                problems.unknown_fields(
                    &format!("{at}.requestMirror"),
                    v,
                    &["backendRef", "percent", "fraction"],
                );
                let per_million = if let Some(p) = v["percent"].as_u64() {
                    (p.min(100) * 10_000) as u32
                } else if let Some(n) = v["fraction"]["numerator"].as_u64() {
                    let d = v["fraction"]["denominator"].as_u64().unwrap_or(100).max(1);
                    ((n.min(d) * 1_000_000) / d) as u32
                } else {
                    1_000_000
                };
                let mut backend = backend_ref(
                    ctx,
                    &format!("{at}.requestMirror.backendRef"),
                    &v["backendRef"],
                    problems,
                    references,
                );
                backend.weight = 1;
                route.mirrors.push(mesh::Mirror {
                    backend: Some(backend),
                    per_million,
                });
            }
        }
    }
    if route.redirect.is_some() && !route.backends.is_empty() {
        problems.add(
            &format!("{at}.filters"),
            "a redirect and backendRefs cannot be combined",
        );
    }
    if flavor == Flavor::Http {
        let timeouts = &rule["timeouts"];
        problems.unknown_fields(
            &format!("{at}.timeouts"),
            timeouts,
            &["request", "backendRequest"],
        );
        route.timeout_ms = duration_ms(
            &format!("{at}.timeouts.request"),
            &timeouts["request"],
            problems,
        );
        let per_try = duration_ms(
            &format!("{at}.timeouts.backendRequest"),
            &timeouts["backendRequest"],
            problems,
        );
        let retry = &rule["retry"];
        if !retry.is_null() || per_try > 0 {
            problems.unknown_fields(
                &format!("{at}.retry"),
                retry,
                &["codes", "attempts", "backoff"],
            );
            let codes: Vec<u32> = retry["codes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_u64)
                .map(|c| c as u32)
                .collect();
            let mut retry_on: Vec<String> = ["connect-failure", "refused-stream", "reset"]
                .map(String::from)
                .to_vec();
            if !codes.is_empty() {
                retry_on.push("retriable-status-codes".into());
            }
            route.retries = Some(mesh::RetryPolicy {
                attempts: retry["attempts"]
                    .as_u64()
                    .unwrap_or(if retry.is_null() { 2 } else { 1 })
                    .min(10) as u32,
                per_try_timeout_ms: per_try,
                retry_on,
                codes,
                backoff_ms: duration_ms(
                    &format!("{at}.retry.backoff"),
                    &retry["backoff"],
                    problems,
                ),
                set: !retry.is_null(),
            });
        }
    }
    route
}

fn backend_ref(
    ctx: &Context,
    at: &str,
    backend: &Value,
    problems: &mut Problems,
    references: &mut Vec<Reference>,
) -> mesh::Backend {
    problems.unknown_fields(
        at,
        backend,
        &[
            "group",
            "kind",
            "name",
            "namespace",
            "port",
            "weight",
            "filters",
        ],
    );
    if backend["filters"].as_array().is_some_and(|f| !f.is_empty()) {
        problems.add(
            &format!("{at}.filters"),
            "per-backend filters are not supported by weft",
        );
    }
    let group = backend["group"].as_str().unwrap_or("");
    let kind = backend["kind"].as_str().unwrap_or("Service");
    if !matches!(group, "" | "core") || kind != "Service" {
        problems.add(
            &format!("{at}.kind"),
            format!("{group}/{kind}: only Service backends are supported"),
        );
    }
    let name = backend["name"].as_str().unwrap_or_default();
    let namespace = backend["namespace"].as_str().unwrap_or(ctx.namespace);
    if namespace != ctx.namespace {
        problems.add(
            &format!("{at}.namespace"),
            "a backend in another namespace needs a ReferenceGrant, which weft does not read yet",
        );
    }
    let port = backend["port"].as_u64().unwrap_or(0) as u32;
    if port == 0 {
        problems.add(&format!("{at}.port"), "a Service backend needs a port");
    }
    let host = ctx.service(name, namespace);
    references.push(Reference {
        at: at.to_string(),
        host: host.clone(),
        subset: String::new(),
    });
    mesh::Backend {
        host,
        port,
        subset: String::new(),
        weight: backend["weight"].as_u64().unwrap_or(1).min(1_000_000) as u32,
    }
}

fn http_match(at: &str, m: &Value, problems: &mut Problems) -> mesh::RouteMatch {
    problems.unknown_fields(at, m, &["path", "headers", "queryParams", "method"]);
    let path = &m["path"];
    // Gateway API: a match without a path matches the prefix "/", and
    // ranks as one.
    let path = if path.is_null() {
        Some(mesh::ValueMatch {
            kind: Some(value_match::Kind::Prefix("/".into())),
            invert: false,
        })
    } else {
        let value = path["value"].as_str().unwrap_or("/").to_string();
        let kind = match path["type"].as_str().unwrap_or("PathPrefix") {
            "Exact" => Some(value_match::Kind::Exact(value)),
            "PathPrefix" => Some(value_match::Kind::Prefix(value)),
            "RegularExpression" => regex_checked(&format!("{at}.path.value"), &value, problems)
                .map(value_match::Kind::Regex),
            other => {
                problems.add(
                    &format!("{at}.path.type"),
                    format!("{other:?} is not a path match"),
                );
                None
            }
        };
        Some(mesh::ValueMatch {
            kind,
            invert: false,
        })
    };
    let mut headers = Vec::new();
    if let Some(method) = m["method"].as_str() {
        headers.push(mesh::NamedMatch {
            name: ":method".into(),
            value: Some(mesh::ValueMatch {
                kind: Some(value_match::Kind::Exact(method.into())),
                invert: false,
            }),
        });
    }
    headers.extend(named_matches(
        &format!("{at}.headers"),
        &m["headers"],
        true,
        problems,
    ));
    mesh::RouteMatch {
        path,
        headers,
        query_params: named_matches(
            &format!("{at}.queryParams"),
            &m["queryParams"],
            false,
            problems,
        ),
        ..Default::default()
    }
}

/// gRPC's method match becomes a match on the request path
/// `/<service>/<method>`.
fn grpc_match(at: &str, m: &Value, problems: &mut Problems) -> mesh::RouteMatch {
    problems.unknown_fields(at, m, &["method", "headers"]);
    let method = &m["method"];
    let path = if method.is_null() {
        None
    } else {
        problems.unknown_fields(
            &format!("{at}.method"),
            method,
            &["type", "service", "method"],
        );
        let service = method["service"].as_str();
        let name = method["method"].as_str();
        let kind = match (method["type"].as_str().unwrap_or("Exact"), service, name) {
            (_, None, None) => {
                problems.add(&format!("{at}.method"), "a service or a method is needed");
                None
            }
            ("Exact", Some(s), Some(n)) => Some(value_match::Kind::Exact(format!("/{s}/{n}"))),
            ("Exact", Some(s), None) => Some(value_match::Kind::Prefix(format!("/{s}/"))),
            ("Exact", None, Some(n)) => Some(value_match::Kind::Regex(format!(
                "/[^/]+/{}",
                weft_xds_proto::pattern::escape(n)
            ))),
            ("RegularExpression", s, n) => {
                let pattern = format!("/{}/{}", s.unwrap_or("[^/]+"), n.unwrap_or("[^/]+"));
                regex_checked(&format!("{at}.method"), &pattern, problems)
                    .map(value_match::Kind::Regex)
            }
            (other, ..) => {
                problems.add(
                    &format!("{at}.method.type"),
                    format!("{other:?} is not a method match"),
                );
                None
            }
        };
        Some(mesh::ValueMatch {
            kind,
            invert: false,
        })
    };
    mesh::RouteMatch {
        path,
        headers: named_matches(&format!("{at}.headers"), &m["headers"], true, problems),
        ..Default::default()
    }
}

fn named_matches(
    at: &str,
    list: &Value,
    headers: bool,
    problems: &mut Problems,
) -> Vec<mesh::NamedMatch> {
    let mut out = Vec::new();
    for (i, h) in list.as_array().into_iter().flatten().enumerate() {
        let at = format!("{at}[{i}]");
        problems.unknown_fields(&at, h, &["type", "name", "value"]);
        let name = h["name"].as_str().unwrap_or_default();
        let name = if headers {
            name.to_ascii_lowercase()
        } else {
            name.to_string()
        };
        let value = h["value"].as_str().unwrap_or_default().to_string();
        let kind = match h["type"].as_str().unwrap_or("Exact") {
            "Exact" => Some(value_match::Kind::Exact(value)),
            "RegularExpression" => regex_checked(&format!("{at}.value"), &value, problems)
                .map(value_match::Kind::Regex),
            other => {
                problems.add(
                    &format!("{at}.type"),
                    format!("{other:?} is not a match type"),
                );
                None
            }
        };
        out.push(mesh::NamedMatch {
            name,
            value: Some(mesh::ValueMatch {
                kind,
                invert: false,
            }),
        });
    }
    out
}

fn header_modifier(at: &str, value: &Value, problems: &mut Problems) -> mesh::HeaderEdits {
    problems.unknown_fields(at, value, &["set", "add", "remove"]);
    let pairs = |key: &str| -> Vec<mesh::HeaderValue> {
        value[key]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| {
                Some(mesh::HeaderValue {
                    name: h["name"].as_str()?.to_ascii_lowercase(),
                    value: h["value"].as_str()?.to_string(),
                })
            })
            .collect()
    };
    let edits = mesh::HeaderEdits {
        set: pairs("set"),
        add: pairs("add"),
        remove: value["remove"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_ascii_lowercase)
            .collect(),
    };
    check_header_edits(at, &edits, problems);
    edits
}

/// Header names and values the proxy could not send are refused here,
/// so that it never has to drop an edit.
pub fn check_header_edits(at: &str, edits: &mesh::HeaderEdits, problems: &mut Problems) {
    let names = edits
        .set
        .iter()
        .chain(&edits.add)
        .map(|h| &h.name)
        .chain(&edits.remove);
    for name in names {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() || name.starts_with(':') {
            problems.add(at, format!("{name:?} is not a header name weft can edit"));
        }
    }
    for h in edits.set.iter().chain(&edits.add) {
        if http::HeaderValue::from_str(&h.value).is_err() {
            problems.add(
                at,
                format!("the value of {:?} is not a valid header value", h.name),
            );
        }
    }
}

fn path_modifier(
    at: &str,
    value: &Value,
    prefix_matched: bool,
    problems: &mut Problems,
) -> Option<mesh::PathRewrite> {
    if value.is_null() {
        return None;
    }
    problems.unknown_fields(
        at,
        value,
        &["type", "replaceFullPath", "replacePrefixMatch"],
    );
    let kind = match value["type"].as_str() {
        Some("ReplaceFullPath") => value["replaceFullPath"]
            .as_str()
            .map(|p| path_rewrite::Kind::Full(p.into())),
        Some("ReplacePrefixMatch") if prefix_matched => value["replacePrefixMatch"]
            .as_str()
            .map(|p| path_rewrite::Kind::Prefix(p.into())),
        Some("ReplacePrefixMatch") => {
            problems.add(at, "ReplacePrefixMatch needs a PathPrefix match");
            None
        }
        other => {
            problems.add(
                &format!("{at}.type"),
                format!("{other:?} is not a path modifier"),
            );
            None
        }
    };
    Some(mesh::PathRewrite { kind })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read_route(namespace: &str, spec: Value, flavor: Flavor) -> TrafficInfo {
        read(
            &json!({"metadata": {"name": "r", "namespace": namespace, "generation": 2}, "spec": spec}),
            flavor,
            "cluster.local",
        )
    }

    fn routes(info: &TrafficInfo) -> &mesh::RouteSet {
        match &info.resource {
            Resource::Routes(r) => r,
            _ => panic!("not routes"),
        }
    }

    #[test]
    fn a_producer_route_with_weights_filters_timeouts_and_retries() {
        let info = read_route(
            "demo",
            json!({
                "parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}, {"kind": "Gateway", "name": "ingress"}],
                "rules": [{
                    "matches": [{"path": {"type": "PathPrefix", "value": "/api"}, "headers": [{"name": "X-Canary", "value": "yes"}], "method": "GET"}],
                    "filters": [
                        {"type": "RequestHeaderModifier", "requestHeaderModifier": {"set": [{"name": "X-Who", "value": "weft"}]}},
                        {"type": "URLRewrite", "urlRewrite": {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}}},
                        {"type": "RequestMirror", "requestMirror": {"backendRef": {"name": "echo-v2", "port": 80}, "percent": 25}}
                    ],
                    "backendRefs": [{"name": "echo-v1", "port": 80, "weight": 90}, {"name": "echo-v2", "port": 80, "weight": 10}],
                    "timeouts": {"request": "2s", "backendRequest": "500ms"},
                    "retry": {"codes": [503], "attempts": 3, "backoff": "10ms"}
                }]
            }),
            Flavor::Http,
        );
        assert!(info.problems.is_empty(), "{:?}", info.problems);
        assert!(!info.not_for_mesh);
        assert_eq!(info.parents.len(), 1, "the Gateway parent is not ours");
        let r = routes(&info);
        assert_eq!(r.hosts, ["echo.demo.svc.cluster.local"]);
        assert_eq!(r.ports, [80]);
        assert_eq!(r.consumer_namespace, "");
        let rule = &r.http[0];
        assert_eq!(
            rule.backends.iter().map(|b| b.weight).collect::<Vec<_>>(),
            [90, 10]
        );
        assert_eq!(rule.backends[0].host, "echo-v1.demo.svc.cluster.local");
        assert_eq!(rule.timeout_ms, 2000);
        let retries = rule.retries.as_ref().unwrap();
        assert_eq!(
            (
                retries.attempts,
                retries.per_try_timeout_ms,
                retries.backoff_ms
            ),
            (3, 500, 10)
        );
        assert_eq!(retries.codes, [503]);
        assert_eq!(rule.mirrors[0].per_million, 250_000);
        assert_eq!(rule.matches[0].headers[0].name, ":method");
        assert_eq!(rule.matches[0].headers[1].name, "x-canary");
    }

    #[test]
    fn a_consumer_route_shapes_only_its_namespace_and_grpc_methods_become_paths() {
        let info = read_route(
            "client-ns",
            json!({
                "parentRefs": [{"kind": "Service", "group": "", "name": "echo", "namespace": "demo"}],
                "rules": [
                    {"matches": [{"method": {"service": "weft.echo.v1.Echo", "method": "Echo"}}], "backendRefs": [{"name": "echo-v2", "namespace": "demo", "port": 90}]},
                    {"matches": [{"method": {"service": "weft.echo.v1.Echo"}}], "backendRefs": [{"name": "echo-v1", "port": 90}]},
                    {"matches": [{"method": {"type": "RegularExpression", "method": "Str.*"}}]}
                ]
            }),
            Flavor::Grpc,
        );
        let r = routes(&info);
        assert_eq!(r.consumer_namespace, "client-ns");
        assert_eq!(r.hosts, ["echo.demo.svc.cluster.local"]);
        let path = |i: usize| r.http[i].matches[0].path.clone().unwrap().kind.unwrap();
        assert_eq!(
            path(0),
            value_match::Kind::Exact("/weft.echo.v1.Echo/Echo".into())
        );
        assert_eq!(
            path(1),
            value_match::Kind::Prefix("/weft.echo.v1.Echo/".into())
        );
        assert_eq!(path(2), value_match::Kind::Regex("/[^/]+/Str.*".into()));
        // A backend in another namespace is refused until ReferenceGrant;
        // one in the route's own namespace is not.
        assert!(
            info.problems
                .iter()
                .any(|p| p.contains("rules[0].backendRefs[0].namespace")),
            "{:?}",
            info.problems
        );
        assert!(
            !info.problems.iter().any(|p| p.contains("rules[1]")),
            "{:?}",
            info.problems
        );
    }

    #[test]
    fn gateway_routes_are_not_ours_and_unsupported_filters_are_named() {
        let info = read_route(
            "demo",
            json!({"parentRefs": [{"kind": "Gateway", "name": "gw"}], "rules": []}),
            Flavor::Http,
        );
        assert!(info.not_for_mesh);
        let info = read_route(
            "demo",
            json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo"}], "rules": [{"filters": [{"type": "ExtensionRef"}], "backendRefs": [{"name": "echo", "port": 80}]}]}),
            Flavor::Http,
        );
        assert!(
            info.problems
                .iter()
                .any(|p| p.starts_with("spec.rules[0].filters[0].type")),
            "{:?}",
            info.problems
        );
        let info = read_route(
            "demo",
            json!({"parentRefs": [{"group": "", "kind": "Service", "name": "echo"}], "rules": [{"filters": [{"type": "URLRewrite", "urlRewrite": {}}], "backendRefs": [{"name": "echo", "port": 80}]}]}),
            Flavor::Grpc,
        );
        assert!(
            info.problems
                .iter()
                .any(|p| p.starts_with("spec.rules[0].filters[0].type")),
            "{:?}",
            info.problems
        );
    }
}
