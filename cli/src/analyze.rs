//! `weftctl analyze`: what weft makes of a cluster's traffic policy
//! (VirtualService, DestinationRule, HTTPRoute, GRPCRoute), read with the
//! control plane's own readers. It names each field weft refuses (the
//! object is then not applied) or ignores, each reference that resolves to
//! nothing (a Service that does not exist, a subset no DestinationRule
//! defines: Istio's "add the subset before the route that uses it"), and
//! which of several routes for one host is in force. It also names the
//! Service scope annotations (`weft.io/global`, `shared`, `affinity`)
//! whose values mean nothing, and the MCS ServiceExports whose status
//! (written by weft-control, which sees every cluster) says they are not
//! valid or conflict with another cluster's.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use k8s_openapi::api::core::v1::Service;
use kube::api::{Api, ApiResource, DynamicObject, ListParams};
use weft_control::cluster::{Kind, read_traffic};
use weft_control::model::traffic::dangling;
use weft_control::traffic::{self, Resource, TrafficInfo};

#[derive(Args)]
pub struct AnalyzeArgs {
    /// Kubeconfig of the cluster to analyze.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    #[arg(long)]
    context: Option<String>,
    /// Only this namespace's objects (references are resolved against
    /// the whole cluster either way).
    #[arg(short, long)]
    namespace: Option<String>,
    /// The cluster's DNS suffix.
    #[arg(long, default_value = "cluster.local")]
    domain_suffix: String,
}

/// One finding, as printed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    pub level: Level,
    pub object: String,
    pub message: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Error,
    Warning,
    Info,
}

fn resource(kind: Kind) -> ApiResource {
    // Only traffic kinds are analyzed: each has a resource.
    weft_control::cluster::policy_resource(kind).unwrap_or_else(traffic::http_routes)
}

/// An object as read: its kind, namespace/name and what weft makes of it.
pub struct Read {
    pub kind: Kind,
    pub key: (String, String),
    pub created: String,
    pub info: TrafficInfo,
}

/// The findings for `objects`, given the cluster's service hostnames.
pub fn analyze(objects: &[Read], services: &BTreeSet<String>) -> Vec<Finding> {
    let mut findings = Vec::new();
    let name = |r: &Read| format!("{} {}/{}", resource(r.kind).kind, r.key.0, r.key.1);
    let mut subsets: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for r in objects.iter().filter(|r| r.info.problems.is_empty()) {
        if let Resource::Destination(d) = &r.info.resource {
            subsets
                .entry(&d.host)
                .or_default()
                .extend(d.subsets.iter().map(|s| s.name.as_str()));
        }
    }
    // Which route objects are in force per host: Gateway API routes over
    // VirtualServices, the oldest VirtualService over newer ones.
    let mut routing: BTreeMap<String, Vec<&Read>> = BTreeMap::new();
    for r in objects {
        let f = |level, message: String| Finding {
            level,
            object: name(r),
            message,
        };
        if r.info.not_for_mesh {
            findings.push(f(
                Level::Info,
                "for gateways only (no Service parent, or gateways without \"mesh\"): not applied by sidecars".into(),
            ));
            continue;
        }
        for problem in &r.info.problems {
            findings.push(f(
                Level::Error,
                format!("{problem} (the object is not applied)"),
            ));
        }
        for field in &r.info.ignored {
            findings.push(f(
                Level::Warning,
                format!("{field}: ignored (tuning weft does without)"),
            ));
        }
        for d in dangling(
            &r.info,
            |h| services.contains(h),
            |h| subsets.get(h).cloned().unwrap_or_default(),
        ) {
            findings.push(f(Level::Error, d.to_string()));
        }
        if let Resource::Routes(routes) = &r.info.resource
            && r.info.problems.is_empty()
        {
            for host in &routes.hosts {
                routing.entry(host.clone()).or_default().push(r);
            }
        }
    }
    for (host, mut routes) in routing {
        routes.sort_by(|a, b| (&a.created, &a.key).cmp(&(&b.created, &b.key)));
        let gateway: Vec<&&Read> = routes
            .iter()
            .filter(|r| r.kind != Kind::VirtualService)
            .collect();
        let services_first = routes.iter().filter(|r| r.kind == Kind::VirtualService);
        for (i, vs) in services_first.enumerate() {
            let shadowed_by = if let Some(g) = gateway.first() {
                Some(format!("{} (Gateway API routes take precedence)", name(g)))
            } else if i > 0 {
                let oldest = routes
                    .iter()
                    .find(|r| r.kind == Kind::VirtualService)
                    .map(|r| name(r));
                oldest.map(|o| format!("{o}, which is older (only the oldest VirtualService for a host applies to sidecars)"))
            } else {
                None
            };
            if let Some(by) = shadowed_by {
                findings.push(Finding {
                    level: Level::Warning,
                    object: name(vs),
                    message: format!("not in force for {host}: routed by {by}"),
                });
            }
        }
    }
    findings.sort();
    findings
}

/// Scope annotations on Services (docs/services.md) whose values mean
/// nothing: each is ignored, and said so here.
fn scope_findings(services: &[Service], namespace: Option<&str>) -> Vec<Finding> {
    services
        .iter()
        .filter(|s| namespace.is_none_or(|ns| s.metadata.namespace.as_deref() == Some(ns)))
        .flat_map(|s| {
            let object = format!(
                "Service {}/{}",
                s.metadata.namespace.as_deref().unwrap_or_default(),
                s.metadata.name.as_deref().unwrap_or_default()
            );
            weft_control::cluster::service_info(s)
                .map(|info| info.scope_problems)
                .unwrap_or_default()
                .into_iter()
                .map(move |problem| Finding {
                    level: Level::Warning,
                    object: object.clone(),
                    message: format!("{problem}: ignored"),
                })
        })
        .collect()
}

/// ServiceExports (as JSON) whose conditions say they are not exported
/// or disagree with another cluster's export.
fn export_findings(exports: &[serde_json::Value]) -> Vec<Finding> {
    use weft_control::mcs::{CONDITION_CONFLICT, CONDITION_VALID};
    let mut findings = Vec::new();
    for export in exports {
        let object = format!(
            "ServiceExport {}/{}",
            export["metadata"]["namespace"].as_str().unwrap_or_default(),
            export["metadata"]["name"].as_str().unwrap_or_default()
        );
        let conditions = export["status"]["conditions"].as_array();
        let condition = |kind: &str| conditions.into_iter().flatten().find(|c| c["type"] == kind);
        let message = |c: &serde_json::Value| c["message"].as_str().unwrap_or_default().to_string();
        match condition(CONDITION_VALID) {
            None => findings.push(Finding {
                level: Level::Info,
                object: object.clone(),
                message: "no Valid condition yet (is weft-control running here?)".into(),
            }),
            Some(c) if c["status"] != "True" => findings.push(Finding {
                level: Level::Error,
                object: object.clone(),
                message: format!("not exported: {}", message(c)),
            }),
            Some(c) if message(c).ends_with(weft_control::mcs::IGNORED) => findings.push(Finding {
                level: Level::Warning,
                object: object.clone(),
                message: message(c),
            }),
            Some(_) => {}
        }
        if let Some(c) = condition(CONDITION_CONFLICT).filter(|c| c["status"] == "True") {
            findings.push(Finding {
                level: Level::Warning,
                object,
                message: format!("conflicts with another cluster's export: {}", message(c)),
            });
        }
    }
    findings
}

pub async fn run(args: AnalyzeArgs) -> Result<()> {
    let client = crate::remote::client(&args.kubeconfig, args.context.clone()).await?;
    let mut objects = Vec::new();
    for kind in weft_control::cluster::TRAFFIC_KINDS {
        let api: Api<DynamicObject> = match &args.namespace {
            Some(ns) => Api::namespaced_with(client.clone(), ns, &resource(kind)),
            None => Api::all_with(client.clone(), &resource(kind)),
        };
        let list = match api.list(&ListParams::default()).await {
            Ok(list) => list,
            // The kind's CRD is not installed: there is none of it.
            Err(kube::Error::Api(status)) if status.code == 404 => continue,
            Err(err) => return Err(err.into()),
        };
        for object in list.items {
            let json = serde_json::to_value(&object)?;
            objects.push(Read {
                kind,
                key: (
                    object.metadata.namespace.clone().unwrap_or_default(),
                    object.metadata.name.clone().unwrap_or_default(),
                ),
                created: json["metadata"]["creationTimestamp"]
                    .as_str()
                    .unwrap_or_default()
                    .into(),
                info: read_traffic(kind, &json, &args.domain_suffix),
            });
        }
    }
    let listed = Api::<Service>::all(client.clone())
        .list(&ListParams::default())
        .await?
        .items;
    let services: BTreeSet<String> = listed
        .iter()
        .map(|s| {
            format!(
                "{}.{}.svc.{}",
                s.metadata.name.as_deref().unwrap_or_default(),
                s.metadata.namespace.as_deref().unwrap_or_default(),
                args.domain_suffix
            )
        })
        .collect();
    let mut findings = analyze(&objects, &services);
    findings.extend(scope_findings(&listed, args.namespace.as_deref()));
    let exports: Api<DynamicObject> = match &args.namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &weft_control::mcs::service_exports()),
        None => Api::all_with(client.clone(), &weft_control::mcs::service_exports()),
    };
    match exports.list(&ListParams::default()).await {
        Ok(list) => {
            let exports: Vec<serde_json::Value> = list
                .items
                .iter()
                .map(serde_json::to_value)
                .collect::<Result<_, _>>()?;
            findings.extend(export_findings(&exports));
        }
        // The MCS API is not installed: there are no exports.
        Err(kube::Error::Api(status)) if status.code == 404 => {}
        Err(err) => return Err(err.into()),
    }
    findings.sort();
    let mut out = String::new();
    for f in &findings {
        let level = match f.level {
            Level::Error => "Error",
            Level::Warning => "Warning",
            Level::Info => "Info",
        };
        let _ = writeln!(out, "{level:<8} {:<40} {}", f.object, f.message);
    }
    let errors = findings.iter().filter(|f| f.level == Level::Error).count();
    let warnings = findings
        .iter()
        .filter(|f| f.level == Level::Warning)
        .count();
    let _ = writeln!(
        out,
        "{} traffic objects, {} Services: {errors} errors, {warnings} warnings{}",
        objects.len(),
        listed.len(),
        if findings.is_empty() {
            " (no issues found)"
        } else {
            ""
        }
    );
    print!("{out}");
    if errors > 0 {
        anyhow::bail!("{errors} objects or references weft cannot apply as written");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_not_valid_or_in_conflict_are_named() {
        let export = |name: &str, conditions: serde_json::Value| {
            serde_json::json!({
                "metadata": {"name": name, "namespace": "demo"},
                "status": {"conditions": conditions},
            })
        };
        let findings = export_findings(&[
            export(
                "fine",
                serde_json::json!([{"type": "Valid", "status": "True"}, {"type": "Conflict", "status": "False"}]),
            ),
            export(
                "ghost",
                serde_json::json!([{"type": "Valid", "status": "False", "message": "there is no Service demo/ghost in this cluster to export"}]),
            ),
            export(
                "labelled",
                serde_json::json!([{"type": "Valid", "status": "True", "message": "demo/labelled is served …; spec.exportedLabels not supported by weft: ignored"}]),
            ),
            export(
                "split",
                serde_json::json!([{"type": "Valid", "status": "True"}, {"type": "Conflict", "status": "True", "message": "port http: c2 has ..."}]),
            ),
            serde_json::json!({"metadata": {"name": "new", "namespace": "demo"}}),
        ]);
        let seen: Vec<(Level, &str, &str)> = findings
            .iter()
            .map(|f| (f.level, f.object.as_str(), f.message.as_str()))
            .collect();
        assert_eq!(
            seen,
            [
                (
                    Level::Error,
                    "ServiceExport demo/ghost",
                    "not exported: there is no Service demo/ghost in this cluster to export"
                ),
                (
                    Level::Warning,
                    "ServiceExport demo/labelled",
                    "demo/labelled is served …; spec.exportedLabels not supported by weft: ignored"
                ),
                (
                    Level::Warning,
                    "ServiceExport demo/split",
                    "conflicts with another cluster's export: port http: c2 has ..."
                ),
                (
                    Level::Info,
                    "ServiceExport demo/new",
                    "no Valid condition yet (is weft-control running here?)"
                ),
            ]
        );
    }
}
