//! `weftctl proxy-status`: every proxy connected to a control plane, and
//! per resource type whether it holds what the control plane has (the
//! shape of `istioctl proxy-status`). `weftctl proxy-config POD KIND`:
//! what one sidecar was told, from its admin port, as tables or JSON.

use std::fmt::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::Value;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

#[derive(Args)]
pub struct ProxyStatusArgs {
    /// The control plane's monitoring address (15014).
    #[arg(long, conflicts_with = "dir")]
    monitoring: Option<SocketAddr>,
    /// A lab's directory instead: the control plane of --cluster.
    #[arg(long)]
    dir: Option<PathBuf>,
    #[arg(long, default_value = "c1")]
    cluster: String,
    #[arg(short, long, value_enum, default_value = "table")]
    output: Format,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ConfigKind {
    Workloads,
    Services,
    Routes,
    Certs,
    Policies,
}

#[derive(Args)]
pub struct ProxyConfigArgs {
    /// The pod whose sidecar to ask (in a lab, with --dir).
    pod: String,
    kind: ConfigKind,
    #[arg(short, long, default_value = "default")]
    namespace: String,
    /// A lab's directory: the pod is found there and its admin port asked
    /// from inside its network.
    #[arg(long, conflicts_with = "admin")]
    dir: Option<PathBuf>,
    /// The lab cluster the pod is in, when several have one by that name.
    #[arg(long)]
    cluster: Option<String>,
    /// The sidecar's admin address instead (15000, e.g. through
    /// `kubectl port-forward POD 15000`).
    #[arg(long)]
    admin: Option<SocketAddr>,
    #[arg(short, long, value_enum, default_value = "table")]
    output: Format,
}

/// A lab cluster's control plane monitoring address, and the network
/// namespace it is reached from (the lab's router, when pods have
/// namespaces), from the lab's state.
fn lab_monitoring(dir: &std::path::Path, cluster: &str) -> Result<(SocketAddr, Option<String>)> {
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("state.json"))
            .with_context(|| format!("no lab is running in {}", dir.display()))?,
    )?;
    let found = state["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == cluster)
        .with_context(|| format!("the lab has no cluster {cluster}"))?;
    let addr = found["monitoring"]
        .as_str()
        .context("the lab's state has no monitoring address")?
        .parse()?;
    let router = state["router"]
        .as_str()
        .filter(|r| !r.is_empty())
        .map(str::to_string);
    Ok((addr, router))
}

/// GETs `path` of `addr` from inside `netns` (none: from here), as JSON.
async fn get_json(netns: Option<String>, addr: SocketAddr, path: &str) -> Result<Value> {
    let answer = weft_lab::traffic::send_from_netns(
        netns,
        addr,
        &format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n"),
    )
    .await
    .map_err(anyhow::Error::msg)
    .with_context(|| format!("connecting to {addr}"))?;
    let (head, body) = answer
        .split_once("\r\n\r\n")
        .with_context(|| format!("{addr} sent no HTTP answer"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!(
            "{addr} answered {}",
            head.lines().next().unwrap_or_default()
        );
    }
    serde_json::from_str(body).with_context(|| format!("the answer to {path} is not JSON"))
}

pub async fn proxy_status(args: ProxyStatusArgs) -> Result<String> {
    let (monitoring, netns) = match (&args.dir, args.monitoring) {
        (Some(dir), _) => lab_monitoring(dir, &args.cluster)?,
        (None, Some(addr)) => (addr, None),
        (None, None) => bail!("give the control plane: --monitoring ADDR, or --dir for a lab"),
    };
    let view = get_json(netns, monitoring, "/debug/proxies").await?;
    Ok(match args.output {
        Format::Json => serde_json::to_string_pretty(&view)? + "\n",
        Format::Table => render_status(&view),
    })
}

/// The columns of `proxy-status`: each resource type by its short name.
const TYPES: [(&str, &str); 6] = [
    ("Service", "SERVICES"),
    ("Workload", "WORKLOADS"),
    ("Authorization", "AUTHZ"),
    ("RouteSet", "ROUTES"),
    ("DestinationPolicy", "DESTINATIONS"),
    ("NetworkGateway", "GATEWAYS"),
];

fn render_status(view: &Value) -> String {
    let mut out = String::new();
    let _ = write!(out, "{:<36} {:<52}", "NAME", "IDENTITY");
    for (_, column) in TYPES {
        let _ = write!(out, " {column:<14}");
    }
    out.push('\n');
    for proxy in view["proxies"].as_array().into_iter().flatten() {
        let _ = write!(
            out,
            "{:<36} {:<52}",
            proxy["node"].as_str().unwrap_or("?"),
            proxy["identity"].as_str().unwrap_or("-")
        );
        for (name, _) in TYPES {
            let t = &proxy["types"][name];
            let state = t["state"].as_str().unwrap_or("?");
            let cell = match (state, t["seconds_since_push"].as_f64()) {
                ("STALE", Some(age)) => format!("STALE ({age:.0}s)"),
                _ => state.to_string(),
            };
            let _ = write!(out, " {cell:<14}");
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "control plane at version {}; SYNCED: holds that version, STALE: a push unanswered (for that long) or behind, NACKED: refused the last push",
        view["version"]
    );
    out
}

pub async fn proxy_config(args: ProxyConfigArgs) -> Result<String> {
    let path = match args.kind {
        ConfigKind::Certs => "/certs",
        _ => "/config_dump",
    };
    let dump = match (&args.dir, args.admin) {
        (_, Some(admin)) => get_json(None, admin, path)
            .await
            .context("asking the sidecar's admin port")?,
        (Some(dir), None) => {
            let pod =
                crate::lab::find_pod(dir, args.cluster.as_deref(), &args.namespace, &args.pod)?;
            admin_in_lab(&pod, path).await?
        }
        (None, None) => bail!("give the sidecar: --admin ADDR, or --dir for a lab pod"),
    };
    Ok(match args.output {
        Format::Json => {
            let part = match args.kind {
                ConfigKind::Workloads => dump["workloads"].clone(),
                ConfigKind::Services => dump["services"].clone(),
                ConfigKind::Routes => serde_json::json!({
                    "route_sets": dump["route_sets"],
                    "routes_in_force": dump["routes_in_force"],
                    "destination_policies": dump["destination_policies"],
                }),
                ConfigKind::Certs => dump,
                ConfigKind::Policies => dump["authorizations"].clone(),
            };
            serde_json::to_string_pretty(&part)? + "\n"
        }
        Format::Table => render_config(args.kind, &dump),
    })
}

/// GETs `path` of a lab pod's admin port, from inside its network (or
/// at its address, where pods share loopback).
async fn admin_in_lab(pod: &std::path::Path, path: &str) -> Result<Value> {
    let netns = std::fs::read_to_string(pod.join("netns")).unwrap_or_default();
    let admin = weft_lab::traffic::sidecar_port(pod, 15000).map_err(anyhow::Error::msg)?;
    get_json(
        Some(netns.trim().to_string()).filter(|n| !n.is_empty()),
        admin,
        path,
    )
    .await
}

/// Rows under a header, each column as wide as its widest cell.
fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &mut dyn Iterator<Item = String>| {
        let cells: Vec<String> = cells
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", cells.join("  ").trim_end());
    };
    line(&mut out, &mut header.iter().map(|h| h.to_string()));
    for row in rows {
        line(&mut out, &mut row.into_iter());
    }
    out
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn joined(values: &Value, each: impl Fn(&Value) -> String) -> String {
    let parts: Vec<String> = values.as_array().into_iter().flatten().map(each).collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(",")
    }
}

fn render_config(kind: ConfigKind, dump: &Value) -> String {
    let list = |key: &str| dump[key].as_array().cloned().unwrap_or_default();
    match kind {
        ConfigKind::Workloads => table(
            &[
                "NAME",
                "NAMESPACE",
                "CLUSTER",
                "ADDRESSES",
                "IDENTITY",
                "STATUS",
                "SERVICES",
            ],
            list("workloads")
                .iter()
                .map(|w| {
                    vec![
                        text(&w["uid"]),
                        text(&w["namespace"]),
                        text(&w["cluster"]),
                        joined(&w["addresses"], text),
                        text(&w["identity"]),
                        text(&w["status"]),
                        joined(&w["services"], |b| text(&b["hostname"])),
                    ]
                })
                .collect(),
        ),
        ConfigKind::Services => table(
            &["HOSTNAME", "VIPS", "PORTS", "CLUSTERS"],
            list("services")
                .iter()
                .map(|s| {
                    vec![
                        text(&s["hostname"]),
                        joined(&s["vips"], |v| {
                            format!("{}@{}", text(&v["address"]), text(&v["cluster"]))
                        }),
                        joined(&s["ports"], |p| {
                            format!("{}/{}", p["port"], text(&p["protocol"]))
                        }),
                        joined(&s["clusters"], text),
                    ]
                })
                .collect(),
        ),
        ConfigKind::Routes => {
            let mut rows = Vec::new();
            for (host, entries) in dump["routes_in_force"].as_object().into_iter().flatten() {
                for entry in entries.as_array().into_iter().flatten() {
                    rows.push(vec![
                        host.clone(),
                        text(&entry["from"]),
                        text(&entry["rule"]),
                    ]);
                }
            }
            let mut out = table(&["HOST", "FROM", "RULE"], rows);
            out.push('\n');
            out.push_str(&table(
                &["DESTINATION POLICY", "HOST", "SUBSETS"],
                list("destination_policies")
                    .iter()
                    .map(|d| {
                        vec![
                            text(&d["name"]),
                            text(&d["host"]),
                            joined(&d["subsets"], |s| text(&s["name"])),
                        ]
                    })
                    .collect(),
            ));
            out
        }
        ConfigKind::Certs => {
            let when = |v: &Value| {
                v.as_i64()
                    .and_then(|s| k8s_openapi::jiff::Timestamp::from_second(s).ok())
                    .map_or("-".into(), |t| t.to_string())
            };
            table(
                &[
                    "IDENTITY",
                    "VALID FROM",
                    "VALID UNTIL",
                    "RENEWED AT",
                    "CHAIN",
                ],
                list("certificates")
                    .iter()
                    .map(|c| {
                        vec![
                            text(&c["identity"]),
                            when(&c["not_before"]),
                            when(&c["not_after"]),
                            when(&c["rotate_at"]),
                            text(&c["chain_length"]),
                        ]
                    })
                    .collect(),
            )
        }
        ConfigKind::Policies => table(
            &["NAME", "SCOPE", "ACTION", "DRY RUN", "REFUSED"],
            list("authorizations")
                .iter()
                .map(|a| {
                    vec![
                        text(&a["name"]),
                        text(&a["scope"]),
                        text(&a["action"]),
                        text(&a["dry_run"]),
                        text(&a["refused"]),
                    ]
                })
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_table_says_each_type_s_state() {
        let view = serde_json::json!({"version": 9, "proxies": [{
            "node": "client.demo", "identity": "spiffe://cluster.local/ns/demo/sa/client",
            "types": {
                "Service": {"state": "SYNCED"},
                "Workload": {"state": "STALE", "seconds_since_push": 12.4},
                "Authorization": {"state": "NACKED"},
                "RouteSet": {"state": "NOT SENT"},
            },
        }]});
        let out = render_status(&view);
        let row = out.lines().nth(1).unwrap();
        assert!(row.starts_with("client.demo"), "{out}");
        for cell in ["SYNCED", "STALE (12s)", "NACKED", "NOT SENT"] {
            assert!(row.contains(cell), "{cell}: {out}");
        }
        assert!(out.contains("control plane at version 9"), "{out}");
    }

    #[test]
    fn config_tables_have_a_row_per_object() {
        let dump = serde_json::json!({
            "workloads": [{"uid": "c1/demo/a", "namespace": "demo", "cluster": "c1", "addresses": ["10.1.0.5"], "identity": "spiffe://x/ns/demo/sa/a", "status": "HEALTHY", "services": [{"hostname": "echo.demo.svc.cluster.local"}]}],
            "services": [{"hostname": "echo.demo.svc.cluster.local", "vips": [{"address": "10.96.0.10", "cluster": "c1"}], "ports": [{"port": 80, "protocol": "HTTP"}], "clusters": ["c1", "c2"]}],
            "certificates": [{"identity": "spiffe://x/ns/demo/sa/a", "not_before": 0, "not_after": 86400, "rotate_at": 43200, "chain_length": 3}],
        });
        let workloads = render_config(ConfigKind::Workloads, &dump);
        assert!(
            workloads
                .lines()
                .nth(1)
                .unwrap()
                .contains("echo.demo.svc.cluster.local"),
            "{workloads}"
        );
        let services = render_config(ConfigKind::Services, &dump);
        assert!(
            services.contains("10.96.0.10@c1")
                && services.contains("80/HTTP")
                && services.contains("c1,c2"),
            "{services}"
        );
        let certs = render_config(ConfigKind::Certs, &dump);
        assert!(certs.contains("1970-01-02T00:00:00Z"), "{certs}");
        assert_eq!(
            render_config(ConfigKind::Policies, &dump).lines().count(),
            1
        );
    }
}
