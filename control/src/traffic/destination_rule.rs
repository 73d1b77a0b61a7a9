//! Istio's `DestinationRule` read into a `DestinationPolicy`: subsets,
//! load balancing (simple and consistent hash), locality settings,
//! connection-pool limits and outlier detection, for the whole host, per
//! port and per subset. TLS settings other than Istio's own mTLS are
//! refused (weft's transport between sidecars is always mTLS); tuning
//! fields weft does without are applied as ignored, by name.

use serde_json::Value;
use weft_xds_proto::mesh::{self, consistent_hash};

use super::{Context, Resource, TrafficInfo, duration_ms, export_to, meta};
use crate::security::{Problems, match_labels};

const SPEC: &[&str] = &[
    "host",
    "trafficPolicy",
    "subsets",
    "exportTo",
    "workloadSelector",
];
const POLICY: &[&str] = &[
    "loadBalancer",
    "connectionPool",
    "outlierDetection",
    "tls",
    "portLevelSettings",
    "tunnel",
    "proxyProtocol",
];

pub fn read(object: &Value, domain_suffix: &str) -> TrafficInfo {
    let ctx = Context::of(object, domain_suffix);
    let namespace = ctx.namespace;
    let spec = &object["spec"];
    let (generation, created, status) = meta(object);
    let mut problems = Problems::default();
    let mut ignored = Vec::new();
    problems.unknown_fields("spec", spec, SPEC);
    let host = match spec["host"].as_str() {
        Some(host) if !host.contains('*') => ctx.host(host),
        Some(_) => {
            problems.add("spec.host", "wildcard hosts are not supported");
            String::new()
        }
        None => {
            problems.add("spec.host", "a host is needed");
            String::new()
        }
    };
    let (policy, ports) = traffic_policy(
        "spec.trafficPolicy",
        &spec["trafficPolicy"],
        &mut problems,
        &mut ignored,
    );
    let mut subsets = Vec::new();
    for (i, subset) in spec["subsets"].as_array().into_iter().flatten().enumerate() {
        let at = format!("spec.subsets[{i}]");
        problems.unknown_fields(&at, subset, &["name", "labels", "trafficPolicy"]);
        let Some(name) = subset["name"].as_str().filter(|n| !n.is_empty()) else {
            problems.add(&format!("{at}.name"), "a subset needs a name");
            continue;
        };
        if subsets.iter().any(|s: &mesh::Subset| s.name == name) {
            problems.add(
                &format!("{at}.name"),
                format!("subset {name:?} is defined twice"),
            );
        }
        let (policy, ports) = traffic_policy(
            &format!("{at}.trafficPolicy"),
            &subset["trafficPolicy"],
            &mut problems,
            &mut ignored,
        );
        subsets.push(mesh::Subset {
            name: name.into(),
            labels: subset["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect(),
            policy,
            ports,
        });
    }
    let caller_labels = match_labels(
        "spec.workloadSelector",
        &spec["workloadSelector"],
        &mut problems,
    )
    .unwrap_or_default()
    .into_iter()
    .collect();
    TrafficInfo {
        generation,
        resource: Resource::Destination(mesh::DestinationPolicy {
            name: object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .into(),
            namespace: namespace.into(),
            host,
            policy,
            ports,
            subsets,
            created,
            export_to: export_to(spec, namespace),
            caller_labels,
        }),
        problems: problems.into_list(),
        ignored,
        references: Vec::new(),
        parents: Vec::new(),
        not_for_mesh: false,
        status,
    }
}

/// A `trafficPolicy` (whole host or subset) with its port-level settings.
fn traffic_policy(
    at: &str,
    value: &Value,
    problems: &mut Problems,
    ignored: &mut Vec<String>,
) -> (Option<mesh::TrafficPolicy>, Vec<mesh::PortPolicy>) {
    if value.is_null() {
        return (None, Vec::new());
    }
    problems.unknown_fields(at, value, POLICY);
    for refused in ["tunnel", "proxyProtocol"] {
        if !value[refused].is_null() {
            problems.add(&format!("{at}.{refused}"), "not supported by weft");
        }
    }
    let policy = settings(at, value, problems, ignored);
    let mut ports = Vec::new();
    for (i, level) in value["portLevelSettings"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        let at = format!("{at}.portLevelSettings[{i}]");
        problems.unknown_fields(
            &at,
            level,
            &[
                "port",
                "loadBalancer",
                "connectionPool",
                "outlierDetection",
                "tls",
            ],
        );
        let Some(port) = level["port"]["number"]
            .as_u64()
            .filter(|p| (1..=65535).contains(p))
        else {
            problems.add(&format!("{at}.port"), "a port number is needed");
            continue;
        };
        ports.push(mesh::PortPolicy {
            port: port as u32,
            policy: Some(settings(&at, level, problems, ignored)),
        });
    }
    (Some(policy), ports)
}

/// The settings a policy and a port level share.
fn settings(
    at: &str,
    value: &Value,
    problems: &mut Problems,
    ignored: &mut Vec<String>,
) -> mesh::TrafficPolicy {
    let mut policy = mesh::TrafficPolicy::default();
    tls(&format!("{at}.tls"), &value["tls"], problems, ignored);
    let lb = &value["loadBalancer"];
    if !lb.is_null() {
        let at = format!("{at}.loadBalancer");
        problems.unknown_fields(
            &at,
            lb,
            &[
                "simple",
                "consistentHash",
                "localityLbSetting",
                "warmupDurationSecs",
                "warmup",
            ],
        );
        for tuning in ["warmupDurationSecs", "warmup"] {
            if !lb[tuning].is_null() {
                ignored.push(format!("{at}.{tuning}"));
            }
        }
        policy.has_lb = !lb["simple"].is_null() || !lb["consistentHash"].is_null();
        policy.simple = match lb["simple"].as_str().unwrap_or("UNSPECIFIED") {
            "UNSPECIFIED" => mesh::LoadBalancerSimple::LbDefault,
            "LEAST_REQUEST" | "LEAST_CONN" => mesh::LoadBalancerSimple::LeastRequest,
            "ROUND_ROBIN" => mesh::LoadBalancerSimple::RoundRobin,
            "RANDOM" => mesh::LoadBalancerSimple::Random,
            "PASSTHROUGH" => {
                problems.add(
                    &format!("{at}.simple"),
                    "PASSTHROUGH is not supported by weft",
                );
                mesh::LoadBalancerSimple::Passthrough
            }
            other => {
                problems.add(
                    &format!("{at}.simple"),
                    format!("{other:?} is not a load balancer"),
                );
                mesh::LoadBalancerSimple::LbDefault
            }
        } as i32;
        if !lb["consistentHash"].is_null() {
            policy.hash = Some(consistent(
                &format!("{at}.consistentHash"),
                &lb["consistentHash"],
                problems,
                ignored,
            ));
        }
        if !lb["localityLbSetting"].is_null() {
            policy.has_locality = true;
            policy.locality = Some(locality(
                &format!("{at}.localityLbSetting"),
                &lb["localityLbSetting"],
                problems,
            ));
        }
    }
    let pool = &value["connectionPool"];
    if !pool.is_null() {
        let at = format!("{at}.connectionPool");
        problems.unknown_fields(&at, pool, &["tcp", "http"]);
        policy.has_pool = true;
        let tcp = &pool["tcp"];
        let http = &pool["http"];
        problems.unknown_fields(
            &format!("{at}.tcp"),
            tcp,
            &[
                "maxConnections",
                "connectTimeout",
                "tcpKeepalive",
                "maxConnectionDuration",
                "idleTimeout",
            ],
        );
        problems.unknown_fields(
            &format!("{at}.http"),
            http,
            &[
                "http1MaxPendingRequests",
                "http2MaxRequests",
                "maxRequestsPerConnection",
                "maxRetries",
                "idleTimeout",
                "h2UpgradePolicy",
                "useClientProtocol",
                "maxConcurrentStreams",
            ],
        );
        // weft's pool keeps its own connect timeout; it queues nothing,
        // and its retry budget is proxy-wide.
        for (part, value, tuning) in [
            (
                "tcp",
                tcp,
                &[
                    "tcpKeepalive",
                    "maxConnectionDuration",
                    "idleTimeout",
                    "connectTimeout",
                ][..],
            ),
            (
                "http",
                http,
                &[
                    "maxRequestsPerConnection",
                    "idleTimeout",
                    "h2UpgradePolicy",
                    "useClientProtocol",
                    "maxConcurrentStreams",
                    "http1MaxPendingRequests",
                    "maxRetries",
                ][..],
            ),
        ] {
            for field in tuning {
                if !value[*field].is_null() {
                    ignored.push(format!("{at}.{part}.{field}"));
                }
            }
        }
        let count = |v: &Value| v.as_u64().unwrap_or(0).min(u32::MAX as u64) as u32;
        policy.pool = Some(mesh::ConnectionPool {
            max_connections: count(&tcp["maxConnections"]),
            max_pending_requests: count(&http["http1MaxPendingRequests"]),
            max_requests: count(&http["http2MaxRequests"]),
            max_retries: count(&http["maxRetries"]),
            connect_timeout_ms: duration_ms(
                &format!("{at}.tcp.connectTimeout"),
                &tcp["connectTimeout"],
                problems,
            ),
        });
    }
    let outlier = &value["outlierDetection"];
    if !outlier.is_null() {
        let at = format!("{at}.outlierDetection");
        problems.unknown_fields(
            &at,
            outlier,
            &[
                "consecutiveErrors",
                "consecutive5xxErrors",
                "consecutiveGatewayErrors",
                "splitExternalLocalOriginErrors",
                "consecutiveLocalOriginFailures",
                "interval",
                "baseEjectionTime",
                "maxEjectionPercent",
                "minHealthPercent",
            ],
        );
        // weft ejects at the failure that crosses the threshold, not on a
        // timer: `interval` has nothing to set.
        for tuning in [
            "splitExternalLocalOriginErrors",
            "consecutiveLocalOriginFailures",
            "minHealthPercent",
            "interval",
        ] {
            if !outlier[tuning].is_null() {
                ignored.push(format!("{at}.{tuning}"));
            }
        }
        policy.has_outlier = true;
        let count = |v: &Value| v.as_u64().map(|n| n.min(u32::MAX as u64) as u32);
        let consecutive_5xx = count(&outlier["consecutive5xxErrors"])
            .or(count(&outlier["consecutiveErrors"]))
            .unwrap_or(5);
        // weft counts every 5xx and connect failure alike: a gateway-error
        // threshold counts only where the 5xx one is off (0).
        if consecutive_5xx > 0 && !outlier["consecutiveGatewayErrors"].is_null() {
            ignored.push(format!("{at}.consecutiveGatewayErrors"));
        }
        policy.outlier = Some(mesh::OutlierPolicy {
            // Istio's default: 5 consecutive 5xx (consecutiveErrors is the
            // deprecated spelling of the same).
            consecutive_5xx,
            consecutive_gateway_errors: count(&outlier["consecutiveGatewayErrors"]).unwrap_or(0),
            interval_ms: duration_ms(&format!("{at}.interval"), &outlier["interval"], problems),
            base_ejection_ms: duration_ms(
                &format!("{at}.baseEjectionTime"),
                &outlier["baseEjectionTime"],
                problems,
            ),
            max_ejection_percent: count(&outlier["maxEjectionPercent"]).unwrap_or(10).min(100),
        });
    }
    policy
}

fn tls(at: &str, value: &Value, problems: &mut Problems, ignored: &mut Vec<String>) {
    if value.is_null() {
        return;
    }
    // Certificates, SNI and SANs are the mesh's own under ISTIO_MUTUAL.
    if let Some(fields) = value.as_object() {
        ignored.extend(
            fields
                .keys()
                .filter(|k| *k != "mode")
                .map(|k| format!("{at}.{k}")),
        );
    }
    // Between sidecars weft always speaks its own mTLS, which is what
    // ISTIO_MUTUAL asks for; anything else would change the transport.
    match value["mode"].as_str() {
        Some("ISTIO_MUTUAL") => {}
        Some(other) => problems.add(
            &format!("{at}.mode"),
            format!("{other}: weft's sidecars always use mesh mTLS (ISTIO_MUTUAL)"),
        ),
        None => problems.add(&format!("{at}.mode"), "a TLS mode is needed"),
    }
}

fn consistent(
    at: &str,
    value: &Value,
    problems: &mut Problems,
    ignored: &mut Vec<String>,
) -> mesh::ConsistentHash {
    problems.unknown_fields(
        at,
        value,
        &[
            "httpHeaderName",
            "httpCookie",
            "useSourceIp",
            "httpQueryParameterName",
            "ringHash",
            "maglev",
            "minimumRingSize",
        ],
    );
    // weft hashes by rendezvous (highest random weight), which needs no
    // ring: the ring's size and kind only tune Envoy's tables.
    for tuning in ["ringHash", "maglev", "minimumRingSize"] {
        if !value[tuning].is_null() {
            ignored.push(format!("{at}.{tuning}"));
        }
    }
    let key = if let Some(header) = value["httpHeaderName"].as_str() {
        Some(consistent_hash::Key::Header(header.to_ascii_lowercase()))
    } else if let Some(cookie) = value["httpCookie"]["name"].as_str() {
        if !value["httpCookie"]["ttl"].is_null() {
            problems.add(
                &format!("{at}.httpCookie.ttl"),
                "weft does not set cookies; only an existing cookie is hashed",
            );
        }
        Some(consistent_hash::Key::Cookie(cookie.into()))
    } else if value["useSourceIp"].as_bool() == Some(true) {
        Some(consistent_hash::Key::SourceIp(true))
    } else if let Some(param) = value["httpQueryParameterName"].as_str() {
        Some(consistent_hash::Key::QueryParam(param.into()))
    } else {
        problems.add(at, "a hash key is needed (httpHeaderName, httpCookie, useSourceIp or httpQueryParameterName)");
        None
    };
    mesh::ConsistentHash { key }
}

fn locality(at: &str, value: &Value, problems: &mut Problems) -> mesh::LocalityPolicy {
    problems.unknown_fields(
        at,
        value,
        &["distribute", "failover", "failoverPriority", "enabled"],
    );
    let failover = value["failover"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| {
            Some(mesh::LocalityFailover {
                from: f["from"].as_str()?.into(),
                to: f["to"].as_str()?.into(),
            })
        })
        .collect();
    let distribute: Vec<mesh::LocalityDistribute> = value["distribute"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|d| {
            Some(mesh::LocalityDistribute {
                from: d["from"].as_str()?.into(),
                to: d["to"]
                    .as_object()?
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_u64()? as u32)))
                    .collect(),
            })
        })
        .collect();
    let failover_priority: Vec<String> = value["failoverPriority"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(String::from)
        .collect();
    if !distribute.is_empty() && (!value["failover"].is_null()) {
        problems.add(at, "distribute and failover are exclusive (as in Istio)");
    }
    for (i, d) in distribute.iter().enumerate() {
        if d.to.values().sum::<u32>() != 100 {
            problems.add(
                &format!("{at}.distribute[{i}].to"),
                "weights must add up to 100",
            );
        }
    }
    mesh::LocalityPolicy {
        disabled: value["enabled"].as_bool() == Some(false),
        failover,
        failover_priority,
        distribute,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn read_spec(spec: Value) -> TrafficInfo {
        read(
            &json!({"metadata": {"name": "echo", "namespace": "demo"}, "spec": spec}),
            "cluster.local",
        )
    }

    #[test]
    fn subsets_balancing_pools_and_outliers_are_read() {
        let info = read_spec(json!({
            "host": "echo",
            "trafficPolicy": {
                "loadBalancer": {"consistentHash": {"httpHeaderName": "X-User", "minimumRingSize": 1024}},
                "connectionPool": {"tcp": {"maxConnections": 10, "tcpKeepalive": {"time": "7200s"}}, "http": {"http2MaxRequests": 100}},
                "outlierDetection": {"consecutive5xxErrors": 3, "interval": "5s", "baseEjectionTime": "30s", "maxEjectionPercent": 50},
                "portLevelSettings": [{"port": {"number": 80}, "loadBalancer": {"simple": "ROUND_ROBIN"}}],
                "tls": {"mode": "ISTIO_MUTUAL"}
            },
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {"name": "c2", "labels": {"topology.istio.io/cluster": "c2"}, "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}}}
            ]
        }));
        assert!(info.problems.is_empty(), "{:?}", info.problems);
        assert_eq!(
            info.ignored,
            [
                "spec.trafficPolicy.loadBalancer.consistentHash.minimumRingSize",
                "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive",
                "spec.trafficPolicy.outlierDetection.interval"
            ]
        );
        let Resource::Destination(d) = &info.resource else {
            panic!()
        };
        assert_eq!(d.host, "echo.demo.svc.cluster.local");
        let policy = d.policy.as_ref().unwrap();
        assert_eq!(
            policy.hash.as_ref().unwrap().key,
            Some(consistent_hash::Key::Header("x-user".into()))
        );
        assert_eq!(policy.pool.as_ref().unwrap().max_connections, 10);
        let outlier = policy.outlier.as_ref().unwrap();
        assert_eq!(
            (
                outlier.consecutive_5xx,
                outlier.interval_ms,
                outlier.base_ejection_ms,
                outlier.max_ejection_percent
            ),
            (3, 5000, 30000, 50)
        );
        assert_eq!(d.ports[0].port, 80);
        assert_eq!(d.subsets.len(), 2);
        assert_eq!(
            d.subsets[1].policy.as_ref().unwrap().simple,
            mesh::LoadBalancerSimple::Random as i32
        );
    }

    #[test]
    fn tls_details_and_shadowed_thresholds_are_named_as_ignored() {
        let info = read_spec(json!({
            "host": "echo",
            "trafficPolicy": {
                "tls": {"mode": "ISTIO_MUTUAL", "sni": "echo.example"},
                "outlierDetection": {"consecutiveGatewayErrors": 2}
            }
        }));
        assert!(info.problems.is_empty(), "{:?}", info.problems);
        assert_eq!(
            info.ignored,
            [
                "spec.trafficPolicy.tls.sni",
                "spec.trafficPolicy.outlierDetection.consecutiveGatewayErrors"
            ]
        );
        let only_gateway = read_spec(json!({
            "host": "echo",
            "trafficPolicy": {"outlierDetection": {"consecutive5xxErrors": 0, "consecutiveGatewayErrors": 2}}
        }));
        assert!(
            only_gateway.ignored.is_empty(),
            "{:?}",
            only_gateway.ignored
        );
    }

    #[test]
    fn what_weft_cannot_honour_is_refused_by_name() {
        for (spec, field) in [
            (
                json!({"host": "echo", "trafficPolicy": {"tls": {"mode": "SIMPLE"}}}),
                "spec.trafficPolicy.tls.mode",
            ),
            (json!({"host": "*.demo.svc.cluster.local"}), "spec.host"),
            (
                json!({"host": "echo", "subsets": [{"name": "a"}, {"name": "a"}]}),
                "spec.subsets[1].name",
            ),
            (
                json!({"host": "echo", "trafficPolicy": {"loadBalancer": {"simple": "PASSTHROUGH"}}}),
                "spec.trafficPolicy.loadBalancer.simple",
            ),
            (
                json!({"host": "echo", "trafficPolicy": {"loadBalancer": {"localityLbSetting": {"distribute": [{"from": "a/*", "to": {"a/*": 50}}]}}}}),
                "spec.trafficPolicy.loadBalancer.localityLbSetting.distribute[0].to",
            ),
            (
                json!({"host": "echo", "trafficPolicy": {"outlierDetection": {"interval": "often"}}}),
                "spec.trafficPolicy.outlierDetection.interval",
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
}
