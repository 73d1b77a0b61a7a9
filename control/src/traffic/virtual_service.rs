//! Istio's `VirtualService` (networking.istio.io v1, v1beta1 and v1alpha3
//! alike) read into a `RouteSet`: `http` and `tcp` routes for sidecars.
//! Routes for gateways only are not the sidecars' business: such an object
//! is left alone. `tls` routes, `delegate`, `directResponse`,
//! `corsPolicy` and regex rewrites are refused, naming the field.

use serde_json::Value;
use weft_xds_proto::mesh::{self, path_rewrite, value_match};

use super::{
    Context, Reference, Resource, TrafficInfo, duration_ms, export_to, meta, per_million,
    string_match,
};
use crate::security::Problems;

const SPEC: &[&str] = &["hosts", "gateways", "http", "tcp", "tls", "exportTo"];
const HTTP: &[&str] = &[
    "name",
    "match",
    "route",
    "redirect",
    "rewrite",
    "timeout",
    "retries",
    "fault",
    "mirror",
    "mirrorPercentage",
    "mirror_percent",
    "mirrorPercent",
    "mirrors",
    "headers",
];
const MATCH: &[&str] = &[
    "name",
    "uri",
    "scheme",
    "method",
    "authority",
    "headers",
    "port",
    "sourceLabels",
    "gateways",
    "queryParams",
    "ignoreUriCase",
    "withoutHeaders",
    "sourceNamespace",
    "statPrefix",
];
const DESTINATION: &[&str] = &["host", "subset", "port"];

/// Whether `gateways` (of the object or a match) includes the sidecars.
fn for_mesh(gateways: &Value) -> bool {
    match gateways.as_array() {
        None => true,
        Some(list) => list.iter().any(|g| g.as_str() == Some("mesh")),
    }
}

pub fn read(object: &Value, domain_suffix: &str) -> TrafficInfo {
    let ctx = Context::of(object, domain_suffix);
    let namespace = ctx.namespace;
    let spec = &object["spec"];
    let (generation, created, status) = meta(object);
    let mut problems = Problems::default();
    let mut references = Vec::new();
    problems.unknown_fields("spec", spec, SPEC);
    if spec["tls"].as_array().is_some_and(|t| !t.is_empty()) {
        problems.add("spec.tls", "TLS (SNI) routes are not supported");
    }
    let hosts: Vec<String> = spec["hosts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(|h| ctx.host(h))
        .collect();
    for (i, host) in hosts.iter().enumerate() {
        if host.contains('*') {
            problems.add(
                &format!("spec.hosts[{i}]"),
                "wildcard hosts are not supported",
            );
        }
    }
    if hosts.is_empty() {
        problems.add("spec.hosts", "at least one host is needed");
    }
    let mut http = Vec::new();
    for (i, rule) in spec["http"].as_array().into_iter().flatten().enumerate() {
        let at = format!("spec.http[{i}]");
        if let Some(route) = http_route(&ctx, &at, rule, &mut problems, &mut references) {
            http.push(route);
        }
    }
    let mut tcp = Vec::new();
    for (i, rule) in spec["tcp"].as_array().into_iter().flatten().enumerate() {
        let at = format!("spec.tcp[{i}]");
        tcp.extend(tcp_routes(&ctx, &at, rule, &mut problems, &mut references));
    }
    let routes = mesh::RouteSet {
        name: object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .into(),
        namespace: namespace.into(),
        source: mesh::RouteSource::VirtualService as i32,
        hosts,
        ports: Vec::new(),
        consumer_namespace: String::new(),
        created,
        http,
        tcp,
        export_to: export_to(spec, namespace),
    };
    let ignored = ignored_fields(spec);
    TrafficInfo {
        generation,
        resource: Resource::Routes(routes),
        problems: problems.into_list(),
        ignored,
        references,
        parents: Vec::new(),
        not_for_mesh: !for_mesh(&spec["gateways"]),
        status,
    }
}

/// Fields weft applies a VirtualService without, by path: stat prefixes
/// name Envoy's stats (weft's metrics have their own), and weft's retries
/// already prefer endpoints not yet tried, in any locality.
fn ignored_fields(spec: &Value) -> Vec<String> {
    let mut ignored = Vec::new();
    for (i, rule) in spec["http"].as_array().into_iter().flatten().enumerate() {
        for (j, m) in rule["match"].as_array().into_iter().flatten().enumerate() {
            if !m["statPrefix"].is_null() {
                ignored.push(format!("spec.http[{i}].match[{j}].statPrefix"));
            }
        }
        for field in ["retryRemoteLocalities", "retryIgnorePreviousHosts"] {
            if !rule["retries"][field].is_null() {
                ignored.push(format!("spec.http[{i}].retries.{field}"));
            }
        }
    }
    ignored
}

fn destination(
    ctx: &Context,
    at: &str,
    value: &Value,
    weight: u32,
    problems: &mut Problems,
    references: &mut Vec<Reference>,
) -> mesh::Backend {
    problems.unknown_fields(at, value, DESTINATION);
    let Some(host) = value["host"].as_str() else {
        problems.add(&format!("{at}.host"), "a destination needs a host");
        return mesh::Backend::default();
    };
    let host = ctx.host(host);
    let subset = value["subset"].as_str().unwrap_or_default().to_string();
    references.push(Reference {
        at: at.to_string(),
        host: host.clone(),
        subset: subset.clone(),
    });
    mesh::Backend {
        host,
        port: value["port"]["number"].as_u64().unwrap_or(0) as u32,
        subset,
        weight,
    }
}

fn http_route(
    ctx: &Context,
    at: &str,
    rule: &Value,
    problems: &mut Problems,
    references: &mut Vec<Reference>,
) -> Option<mesh::HttpRoute> {
    for refused in ["delegate", "directResponse", "corsPolicy"] {
        if !rule[refused].is_null() {
            problems.add(&format!("{at}.{refused}"), "not supported by weft");
        }
    }
    problems.unknown_fields(
        at,
        rule,
        &[HTTP, &["delegate", "directResponse", "corsPolicy"]].concat(),
    );
    let mut matches = Vec::new();
    let mut prefix_matched = false;
    for (j, m) in rule["match"].as_array().into_iter().flatten().enumerate() {
        let at = format!("{at}.match[{j}]");
        if !for_mesh(&m["gateways"]) {
            // Istio: a match for gateways only is not a sidecar's.
            continue;
        }
        let read = route_match(ctx, &at, m, problems);
        prefix_matched |= matches!(
            read.path.as_ref().and_then(|p| p.kind.as_ref()),
            Some(value_match::Kind::Prefix(_))
        );
        matches.push(read);
    }
    if rule["match"].as_array().is_some_and(|m| !m.is_empty()) && matches.is_empty() {
        return None;
    }
    let mut backends = Vec::new();
    for (j, route) in rule["route"].as_array().into_iter().flatten().enumerate() {
        let at = format!("{at}.route[{j}]");
        problems.unknown_fields(&at, route, &["destination", "weight", "headers"]);
        if !route["headers"].is_null() {
            problems.add(
                &format!("{at}.headers"),
                "per-destination headers are not supported; set them on the rule",
            );
        }
        backends.push(weighted(ctx, &at, route, problems, references));
    }
    let redirect = (!rule["redirect"].is_null())
        .then(|| redirect(&format!("{at}.redirect"), &rule["redirect"], problems));
    if backends.is_empty() && redirect.is_none() {
        problems.add(&format!("{at}.route"), "a rule needs a route or a redirect");
    }
    let mut mirrors = Vec::new();
    if !rule["mirror"].is_null() {
        let share = per_million(
            &format!("{at}.mirrorPercentage"),
            &rule["mirrorPercentage"],
            problems,
        )
        .or_else(|| {
            rule["mirrorPercent"]
                .as_u64()
                .or(rule["mirror_percent"].as_u64())
                .map(|p| (p.min(100) * 10_000) as u32)
        })
        .unwrap_or(1_000_000);
        mirrors.push(mesh::Mirror {
            backend: Some(destination(
                ctx,
                &format!("{at}.mirror"),
                &rule["mirror"],
                1,
                problems,
                references,
            )),
            per_million: share,
        });
    }
    for (j, mirror) in rule["mirrors"].as_array().into_iter().flatten().enumerate() {
        let at = format!("{at}.mirrors[{j}]");
        problems.unknown_fields(&at, mirror, &["destination", "percentage"]);
        mirrors.push(mesh::Mirror {
            backend: Some(destination(
                ctx,
                &format!("{at}.destination"),
                &mirror["destination"],
                1,
                problems,
                references,
            )),
            per_million: per_million(&format!("{at}.percentage"), &mirror["percentage"], problems)
                .unwrap_or(1_000_000),
        });
    }
    let (request_headers, response_headers) =
        headers(&format!("{at}.headers"), &rule["headers"], problems);
    Some(mesh::HttpRoute {
        name: rule["name"].as_str().unwrap_or_default().into(),
        matches,
        backends,
        request_headers,
        response_headers,
        rewrite: (!rule["rewrite"].is_null()).then(|| {
            rewrite(
                &format!("{at}.rewrite"),
                &rule["rewrite"],
                prefix_matched,
                problems,
            )
        }),
        redirect,
        mirrors,
        timeout_ms: duration_ms(&format!("{at}.timeout"), &rule["timeout"], problems),
        retries: (!rule["retries"].is_null())
            .then(|| retries(&format!("{at}.retries"), &rule["retries"], problems)),
        fault: (!rule["fault"].is_null())
            .then(|| fault(&format!("{at}.fault"), &rule["fault"], problems)),
    })
}

fn route_match(ctx: &Context, at: &str, m: &Value, problems: &mut Problems) -> mesh::RouteMatch {
    problems.unknown_fields(at, m, MATCH);
    if !m["scheme"].is_null() {
        problems.add(&format!("{at}.scheme"), "not supported by weft");
    }
    let ignore_case = m["ignoreUriCase"].as_bool().unwrap_or(false);
    let path = (!m["uri"].is_null()).then(|| {
        let read = string_match(&format!("{at}.uri"), &m["uri"], problems);
        if ignore_case { case_blind(read) } else { read }
    });
    let mut headers = Vec::new();
    if !m["method"].is_null() {
        headers.push(named(
            ":method",
            string_match(&format!("{at}.method"), &m["method"], problems),
        ));
    }
    if !m["authority"].is_null() {
        headers.push(named(
            ":authority",
            string_match(&format!("{at}.authority"), &m["authority"], problems),
        ));
    }
    for (key, invert) in [("headers", false), ("withoutHeaders", true)] {
        for (name, value) in m[key].as_object().into_iter().flatten() {
            let mut read = string_match(&format!("{at}.{key}.{name}"), value, problems);
            read.invert = invert;
            headers.push(named(&name.to_ascii_lowercase(), read));
        }
    }
    let query_params = m["queryParams"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, value)| {
            named(
                name,
                string_match(&format!("{at}.queryParams.{name}"), value, problems),
            )
        })
        .collect();
    let source_labels = m["sourceLabels"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
        .collect();
    let _ = ctx;
    mesh::RouteMatch {
        path,
        headers,
        query_params,
        port: m["port"].as_u64().unwrap_or(0) as u32,
        source_labels,
        source_namespace: m["sourceNamespace"].as_str().unwrap_or_default().into(),
    }
}

fn named(name: &str, value: mesh::ValueMatch) -> mesh::NamedMatch {
    mesh::NamedMatch {
        name: name.into(),
        value: Some(value),
    }
}

/// Istio's ignoreUriCase: exact and prefix become case-blind patterns.
fn case_blind(read: mesh::ValueMatch) -> mesh::ValueMatch {
    let kind = match read.kind {
        Some(value_match::Kind::Exact(v)) => Some(value_match::Kind::Regex(format!(
            "(?i){}",
            weft_xds_proto::pattern::escape(&v)
        ))),
        Some(value_match::Kind::Prefix(v)) => Some(value_match::Kind::Regex(format!(
            "(?i){}.*",
            weft_xds_proto::pattern::escape(&v)
        ))),
        Some(value_match::Kind::Regex(v)) => Some(value_match::Kind::Regex(format!("(?i){v}"))),
        other => other,
    };
    mesh::ValueMatch { kind, ..read }
}

fn headers(
    at: &str,
    value: &Value,
    problems: &mut Problems,
) -> (Option<mesh::HeaderEdits>, Option<mesh::HeaderEdits>) {
    problems.unknown_fields(at, value, &["request", "response"]);
    let edits = |which: &str, problems: &mut Problems| {
        let v = &value[which];
        if v.is_null() {
            return None;
        }
        let at = format!("{at}.{which}");
        problems.unknown_fields(&at, v, &["set", "add", "remove"]);
        let pairs = |key: &str| -> Vec<mesh::HeaderValue> {
            v[key]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| {
                    Some(mesh::HeaderValue {
                        name: k.to_ascii_lowercase(),
                        value: v.as_str()?.to_string(),
                    })
                })
                .collect()
        };
        let edits = mesh::HeaderEdits {
            set: pairs("set"),
            add: pairs("add"),
            remove: v["remove"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_ascii_lowercase)
                .collect(),
        };
        super::gateway_route::check_header_edits(&at, &edits, problems);
        Some(edits)
    };
    (edits("request", problems), edits("response", problems))
}

fn rewrite(
    at: &str,
    value: &Value,
    prefix_matched: bool,
    problems: &mut Problems,
) -> mesh::Rewrite {
    problems.unknown_fields(at, value, &["uri", "authority", "uriRegexRewrite"]);
    if !value["uriRegexRewrite"].is_null() {
        problems.add(&format!("{at}.uriRegexRewrite"), "not supported by weft");
    }
    // Istio replaces what a prefix match matched, else the whole path.
    let path = value["uri"].as_str().map(|uri| mesh::PathRewrite {
        kind: Some(if prefix_matched {
            path_rewrite::Kind::Prefix(uri.into())
        } else {
            path_rewrite::Kind::Full(uri.into())
        }),
    });
    mesh::Rewrite {
        path,
        authority: value["authority"].as_str().unwrap_or_default().into(),
    }
}

fn redirect(at: &str, value: &Value, problems: &mut Problems) -> mesh::Redirect {
    problems.unknown_fields(
        at,
        value,
        &[
            "uri",
            "authority",
            "port",
            "scheme",
            "redirectCode",
            "derivePort",
        ],
    );
    if !value["derivePort"].is_null() {
        problems.add(&format!("{at}.derivePort"), "not supported by weft");
    }
    let status = value["redirectCode"].as_u64().unwrap_or(301) as u32;
    if !matches!(status, 301 | 302 | 303 | 307 | 308) {
        problems.add(&format!("{at}.redirectCode"), "301, 302, 303, 307 or 308");
    }
    mesh::Redirect {
        scheme: value["scheme"].as_str().unwrap_or_default().into(),
        host: value["authority"].as_str().unwrap_or_default().into(),
        port: value["port"].as_u64().unwrap_or(0) as u32,
        path: value["uri"].as_str().map(|uri| mesh::PathRewrite {
            kind: Some(path_rewrite::Kind::Full(uri.into())),
        }),
        status,
    }
}

/// Envoy's retry conditions weft honours (Istio passes retryOn to Envoy).
pub const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "refused-stream",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

fn retries(at: &str, value: &Value, problems: &mut Problems) -> mesh::RetryPolicy {
    problems.unknown_fields(
        at,
        value,
        &[
            "attempts",
            "perTryTimeout",
            "retryOn",
            "retryRemoteLocalities",
            "retryIgnorePreviousHosts",
            "backoff",
        ],
    );
    let mut retry_on = Vec::new();
    let mut codes = Vec::new();
    for condition in value["retryOn"].as_str().unwrap_or_default().split(',') {
        let condition = condition.trim();
        if condition.is_empty() {
            continue;
        }
        if let Ok(code) = condition.parse::<u32>() {
            // Istio: a bare status code is a retriable status code.
            codes.push(code);
            retry_on.push("retriable-status-codes".to_string());
        } else if RETRY_ON.contains(&condition) {
            retry_on.push(condition.to_string());
        } else {
            problems.add(
                &format!("{at}.retryOn"),
                format!("{condition:?} is not a retry condition weft knows"),
            );
        }
    }
    if value["retryOn"].is_null() {
        retry_on = [
            "connect-failure",
            "refused-stream",
            "unavailable",
            "cancelled",
            "retriable-status-codes",
        ]
        .map(String::from)
        .to_vec();
    }
    mesh::RetryPolicy {
        attempts: value["attempts"].as_u64().unwrap_or(2).min(10) as u32,
        per_try_timeout_ms: duration_ms(
            &format!("{at}.perTryTimeout"),
            &value["perTryTimeout"],
            problems,
        ),
        retry_on,
        codes,
        backoff_ms: duration_ms(&format!("{at}.backoff"), &value["backoff"], problems),
        set: true,
    }
}

/// gRPC's status names, as Istio's abort.grpcStatus takes them.
const GRPC_CODES: &[&str] = &[
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

fn fault(at: &str, value: &Value, problems: &mut Problems) -> mesh::Fault {
    problems.unknown_fields(at, value, &["delay", "abort"]);
    let mut fault = mesh::Fault::default();
    let share = |at: &str, v: &Value, problems: &mut Problems| {
        per_million(&format!("{at}.percentage"), &v["percentage"], problems)
            .or_else(|| v["percent"].as_u64().map(|p| (p.min(100) * 10_000) as u32))
            .unwrap_or(1_000_000)
    };
    let delay = &value["delay"];
    if !delay.is_null() {
        let at = format!("{at}.delay");
        problems.unknown_fields(
            &at,
            delay,
            &["fixedDelay", "percentage", "percent", "exponentialDelay"],
        );
        if !delay["exponentialDelay"].is_null() {
            problems.add(&format!("{at}.exponentialDelay"), "not supported by weft");
        }
        fault.delay_ms = duration_ms(&format!("{at}.fixedDelay"), &delay["fixedDelay"], problems);
        fault.delay_per_million = share(&at, delay, problems);
    }
    let abort = &value["abort"];
    if !abort.is_null() {
        let at = format!("{at}.abort");
        problems.unknown_fields(
            &at,
            abort,
            &["httpStatus", "grpcStatus", "http2Error", "percentage"],
        );
        if !abort["http2Error"].is_null() {
            problems.add(&format!("{at}.http2Error"), "not supported by weft");
        }
        if let Some(code) = abort["httpStatus"].as_u64() {
            if !(200..600).contains(&code) {
                problems.add(
                    &format!("{at}.httpStatus"),
                    "an HTTP status from 200 to 599",
                );
            }
            fault.abort_status = code as u32;
        } else if let Some(name) = abort["grpcStatus"].as_str() {
            match GRPC_CODES.iter().position(|c| *c == name) {
                Some(code) => {
                    fault.abort_grpc = true;
                    fault.abort_grpc_status = code as u32;
                }
                None => problems.add(
                    &format!("{at}.grpcStatus"),
                    format!("{name:?} is not a gRPC status"),
                ),
            }
        } else {
            problems.add(&at, "an abort needs httpStatus or grpcStatus");
        }
        fault.abort_per_million = share(&at, abort, problems);
    }
    fault
}

/// A `route` entry's destination with its weight: a destination without
/// one takes everything (Istio's single-destination form).
fn weighted(
    ctx: &Context,
    at: &str,
    route: &Value,
    problems: &mut Problems,
    references: &mut Vec<Reference>,
) -> mesh::Backend {
    let weight = match route["weight"].as_u64() {
        None => 100,
        Some(w) => w.min(u32::MAX as u64) as u32,
    };
    destination(
        ctx,
        &format!("{at}.destination"),
        &route["destination"],
        weight,
        problems,
        references,
    )
}

fn tcp_routes(
    ctx: &Context,
    at: &str,
    rule: &Value,
    problems: &mut Problems,
    references: &mut Vec<Reference>,
) -> Vec<mesh::TcpRoute> {
    problems.unknown_fields(at, rule, &["match", "route"]);
    let mut backends = Vec::new();
    for (j, route) in rule["route"].as_array().into_iter().flatten().enumerate() {
        let at = format!("{at}.route[{j}]");
        problems.unknown_fields(&at, route, &["destination", "weight"]);
        backends.push(weighted(ctx, &at, route, problems, references));
    }
    let mut ports = Vec::new();
    for (j, m) in rule["match"].as_array().into_iter().flatten().enumerate() {
        let at = format!("{at}.match[{j}]");
        problems.unknown_fields(
            &at,
            m,
            &[
                "port",
                "gateways",
                "sourceLabels",
                "sourceNamespace",
                "destinationSubnets",
                "sourceSubnet",
            ],
        );
        for unsupported in [
            "sourceLabels",
            "sourceNamespace",
            "destinationSubnets",
            "sourceSubnet",
        ] {
            if !m[unsupported].is_null() {
                problems.add(
                    &format!("{at}.{unsupported}"),
                    "not supported by weft for TCP routes",
                );
            }
        }
        if for_mesh(&m["gateways"]) {
            ports.push(m["port"].as_u64().unwrap_or(0) as u32);
        }
    }
    if ports.is_empty() {
        ports.push(0);
    }
    ports
        .into_iter()
        .map(|port| mesh::TcpRoute {
            port,
            backends: backends.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read_spec(spec: Value) -> TrafficInfo {
        read(
            &json!({"metadata": {"name": "echo", "namespace": "demo", "generation": 3}, "spec": spec}),
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
    fn a_canary_with_matches_retries_faults_and_mirrors_is_read_whole() {
        let info = read_spec(json!({
            "hosts": ["echo"],
            "http": [{
                "match": [{"headers": {"x-canary": {"exact": "yes"}}, "uri": {"prefix": "/api"}, "method": {"exact": "GET"}}],
                "route": [{"destination": {"host": "echo", "subset": "v2"}}],
                "rewrite": {"uri": "/v2"},
                "retries": {"attempts": 3, "perTryTimeout": "200ms", "retryOn": "5xx,503"},
                "timeout": "1s",
                "fault": {"abort": {"httpStatus": 418, "percentage": {"value": 12.5}}},
                "mirror": {"host": "echo", "subset": "v3"},
                "mirrorPercentage": {"value": 50},
                "headers": {"request": {"set": {"X-Who": "weft"}}, "response": {"remove": ["x-internal"]}}
            }, {
                "route": [
                    {"destination": {"host": "echo", "subset": "v1"}, "weight": 90},
                    {"destination": {"host": "echo.demo.svc.cluster.local", "subset": "v2"}, "weight": 10}
                ]
            }],
            "tcp": [{"match": [{"port": 9000}], "route": [{"destination": {"host": "echo", "subset": "v2"}}]}]
        }));
        assert!(info.problems.is_empty(), "{:?}", info.problems);
        let r = routes(&info);
        assert_eq!(r.hosts, ["echo.demo.svc.cluster.local"]);
        let first = &r.http[0];
        assert_eq!(first.matches[0].headers.len(), 2);
        assert_eq!(first.matches[0].headers[0].name, ":method");
        assert_eq!(first.timeout_ms, 1000);
        let retries = first.retries.as_ref().unwrap();
        assert_eq!((retries.attempts, retries.per_try_timeout_ms), (3, 200));
        assert_eq!(retries.codes, [503]);
        assert_eq!(first.fault.as_ref().unwrap().abort_per_million, 125_000);
        assert_eq!(first.mirrors[0].per_million, 500_000);
        assert_eq!(
            first.rewrite.as_ref().unwrap().path.as_ref().unwrap().kind,
            Some(path_rewrite::Kind::Prefix("/v2".into())),
            "a prefix match's rewrite replaces the prefix"
        );
        let split: Vec<(String, u32)> = r.http[1]
            .backends
            .iter()
            .map(|b| (b.subset.clone(), b.weight))
            .collect();
        assert_eq!(split, [("v1".into(), 90), ("v2".into(), 10)]);
        assert_eq!(r.tcp[0].port, 9000);
        assert_eq!(info.references.len(), 5);
    }

    #[test]
    fn what_would_change_routing_is_refused_by_name() {
        for (spec, field) in [
            (
                json!({"hosts": ["echo"], "tls": [{"route": []}]}),
                "spec.tls",
            ),
            (
                json!({"hosts": ["*.demo.svc.cluster.local"], "http": []}),
                "spec.hosts[0]",
            ),
            (
                json!({"hosts": ["echo"], "http": [{"delegate": {"name": "x"}, "route": [{"destination": {"host": "echo"}}]}]}),
                "spec.http[0].delegate",
            ),
            (
                json!({"hosts": ["echo"], "http": [{"route": [{"destination": {"host": "echo"}}], "retries": {"retryOn": "sometimes"}}]}),
                "spec.http[0].retries.retryOn",
            ),
            (
                json!({"hosts": ["echo"], "http": [{"route": [{"destination": {"host": "echo"}}], "fault": {"abort": {"grpcStatus": "NOPE"}}}]}),
                "spec.http[0].fault.abort.grpcStatus",
            ),
            (
                json!({"hosts": ["echo"], "http": [{"match": [{"uri": {"regex": "(["}}], "route": [{"destination": {"host": "echo"}}]}]}),
                "spec.http[0].match[0].uri.regex",
            ),
            (
                // RE2 has Unicode classes; the sidecars' engine does not.
                json!({"hosts": ["echo"], "http": [{"match": [{"headers": {"x-name": {"regex": "\\p{Greek}+"}}}], "route": [{"destination": {"host": "echo"}}]}]}),
                "spec.http[0].match[0].headers.x-name.regex: not a regular expression weft supports",
            ),
            (
                json!({"hosts": ["echo"], "http": [{"route": [{"destination": {"host": "echo"}}], "timeout": "soon"}]}),
                "spec.http[0].timeout",
            ),
            (
                json!({"hosts": ["echo"], "http": [{"route": [{"destination": {"host": "echo"}}], "unknownField": 1}]}),
                "spec.http[0].unknownField",
            ),
        ] {
            let info = read_spec(spec.clone());
            assert!(
                info.problems.iter().any(|p| p.starts_with(field)),
                "{spec}: {:?}",
                info.problems
            );
        }
    }

    #[test]
    fn fields_weft_does_without_are_named_as_ignored() {
        let info = read_spec(json!({"hosts": ["echo"], "http": [{
            "match": [{"uri": {"prefix": "/"}, "statPrefix": "echo"}],
            "route": [{"destination": {"host": "echo"}}],
            "retries": {"attempts": 1, "retryRemoteLocalities": true},
            "fault": {"abort": {"http2Error": "REFUSED_STREAM", "percentage": {"value": 1}}}
        }]}));
        assert_eq!(
            info.ignored,
            [
                "spec.http[0].match[0].statPrefix",
                "spec.http[0].retries.retryRemoteLocalities"
            ]
        );
        assert!(
            info.problems
                .iter()
                .any(|p| p.starts_with("spec.http[0].fault.abort.http2Error")),
            "{:?}",
            info.problems
        );
    }

    #[test]
    fn gateway_only_routes_are_not_the_sidecars() {
        let info = read_spec(
            json!({"hosts": ["echo"], "gateways": ["istio-system/ingress"], "http": [{"route": [{"destination": {"host": "echo"}}]}]}),
        );
        assert!(info.not_for_mesh);
        let info = read_spec(
            json!({"hosts": ["echo"], "gateways": ["mesh", "ingress"], "http": [{"route": [{"destination": {"host": "echo"}}]}]}),
        );
        assert!(!info.not_for_mesh);
    }
}
