//! `weftctl authz check POD`: the security policy a workload is under, as
//! its control plane computes it from the cluster's objects, and, for a
//! caller described on the command line, the decision its sidecar makes
//! and the rule that makes it (like `istioctl x authz check`).
//!
//! It reads the same objects with the same code as weft-control (policy
//! reading and attachment) and decides with the sidecar's own evaluator,
//! so its answer is the mesh's, not a re-implementation's.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Args;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::{Api, DynamicObject, ListParams};
use weft_control::security::authorization::{self, AuthorizationInfo};
use weft_control::security::{self, peer_authentication};
use weft_proxy::authorization::{Attributes, Decision, HttpAttributes, InboundPolicy, Policy};
use weft_xds_proto::mesh;

#[derive(Args)]
pub struct CheckArgs {
    /// The pod whose policy to show.
    pod: String,
    #[arg(short, long, default_value = "default")]
    namespace: String,
    /// Kubeconfig of the pod's cluster.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: PathBuf,
    #[arg(long)]
    context: Option<String>,
    /// The mesh's root namespace (its policies are mesh-wide).
    #[arg(long, default_value = "weft-system")]
    root_namespace: String,
    /// The caller's principal, as Istio writes it
    /// (cluster.local/ns/NS/sa/SA); none for a plaintext caller.
    #[arg(long)]
    from: Option<String>,
    /// The caller's address.
    #[arg(long, default_value = "0.0.0.0")]
    source_ip: IpAddr,
    /// The pod's port the caller connects to.
    #[arg(long)]
    port: Option<u16>,
    /// A TCP connection rather than an HTTP request.
    #[arg(long)]
    tcp: bool,
    #[arg(long, default_value = "GET")]
    method: String,
    #[arg(long, default_value = "/")]
    path: String,
    /// The request's host (its authority).
    #[arg(long, default_value = "")]
    host: String,
    /// A request header, `name=value` (repeatable).
    #[arg(long = "header", value_parser = header)]
    headers: Vec<(String, String)>,
}

fn header(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.to_string()))
        .ok_or_else(|| format!("{text:?}: expected name=value"))
}

#[derive(clap::Subcommand)]
pub enum AuthzCommand {
    /// The policies a pod is under, and the decision for a caller.
    Check(CheckArgs),
}

pub async fn run(command: AuthzCommand) -> Result<String> {
    match command {
        AuthzCommand::Check(args) => {
            let client = crate::remote::client(&args.kubeconfig, args.context.clone()).await?;
            check(&client, &args).await
        }
    }
}

/// One policy as the pod sees it, with what its status says.
struct Found {
    key: (String, String),
    info: AuthorizationInfo,
    compiled: Arc<Policy>,
}

async fn list(
    client: &kube::Client,
    resource: &kube::api::ApiResource,
    namespaces: &[&str],
) -> Result<Vec<serde_json::Value>> {
    let mut out = Vec::new();
    for namespace in namespaces {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, resource);
        match api.list(&ListParams::default()).await {
            Ok(list) => out.extend(
                list.items
                    .into_iter()
                    .map(|o| serde_json::to_value(o).unwrap_or_default()),
            ),
            // The CRD is not installed: no policy of this kind.
            Err(kube::Error::Api(status)) if status.code == 404 => {}
            Err(err) => {
                return Err(err).context(format!("listing {} in {namespace}", resource.plural));
            }
        }
    }
    Ok(out)
}

fn key_of(object: &serde_json::Value) -> (String, String) {
    let meta = &object["metadata"];
    (
        meta["namespace"].as_str().unwrap_or_default().to_string(),
        meta["name"].as_str().unwrap_or_default().to_string(),
    )
}

pub async fn check(client: &kube::Client, args: &CheckArgs) -> Result<String> {
    let pod = Api::<Pod>::namespaced(client.clone(), &args.namespace)
        .get_opt(&args.pod)
        .await?
        .with_context(|| format!("no pod {}/{}", args.namespace, args.pod))?;
    let labels: BTreeMap<String, String> = pod.metadata.labels.clone().unwrap_or_default();
    let services: Vec<String> = Api::<Service>::namespaced(client.clone(), &args.namespace)
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter(|s| {
            s.spec
                .as_ref()
                .and_then(|spec| spec.selector.as_ref())
                .is_some_and(|selector| {
                    !selector.is_empty() && security::selects(selector, &labels)
                })
        })
        .filter_map(|s| s.metadata.name)
        .collect();
    let namespaces = [args.root_namespace.as_str(), args.namespace.as_str()];
    let namespaces = if namespaces[0] == namespaces[1] {
        &namespaces[..1]
    } else {
        &namespaces[..]
    };
    let root = args.root_namespace.as_str();

    let mut found = Vec::new();
    for object in list(client, &security::authorization_policies(), namespaces).await? {
        let key = key_of(&object);
        let info = authorization::read(&object);
        let backs = |service: &str| services.iter().any(|s| s == service);
        if !security::applies(
            &key.0,
            &info.attachment,
            root,
            &args.namespace,
            &labels,
            backs,
        ) {
            continue;
        }
        let scope = security::scope(&key.0, &info.attachment, root);
        let resource = authorization::resource(&key.0, &key.1, scope, &info);
        let compiled = Policy::compile(&format!("{}/{}", key.0, key.1), &resource)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        found.push(Found {
            key,
            info,
            compiled: Arc::new(compiled),
        });
    }
    found.sort_by(|a, b| a.key.cmp(&b.key));
    let peers: Vec<(
        (String, String),
        peer_authentication::PeerAuthenticationInfo,
    )> = list(client, &security::peer_authentications(), namespaces)
        .await?
        .iter()
        .map(|o| (key_of(o), peer_authentication::read(o)))
        .collect();
    let mtls = peer_authentication::effective(
        &args.namespace,
        &labels,
        root,
        peers.iter().map(|(k, v)| (k, v)),
    );

    let mut out = String::new();
    let shown: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    writeln!(
        out,
        "Pod {}/{} [{}], backing: {}",
        args.namespace,
        args.pod,
        shown.join(","),
        if services.is_empty() {
            "-".to_string()
        } else {
            services.join(", ")
        }
    )?;
    let mode = |m: i32| {
        mesh::MtlsMode::try_from(m).map_or("?", |m| match m {
            mesh::MtlsMode::MtlsUnset => "UNSET (the sidecar's own: PERMISSIVE unless annotated)",
            mesh::MtlsMode::Permissive => "PERMISSIVE",
            mesh::MtlsMode::Strict => "STRICT",
            mesh::MtlsMode::Disable => "DISABLE",
        })
    };
    write!(out, "mTLS: {}", mode(mtls.mode))?;
    for (port, m) in &mtls.ports {
        write!(out, "; port {port}: {}", mode(*m))?;
    }
    writeln!(out)?;
    for (key, info) in &peers {
        for problem in &info.problems {
            writeln!(out, "  PeerAuthentication {}/{}: {problem}", key.0, key.1)?;
        }
    }
    if found.is_empty() {
        writeln!(
            out,
            "No AuthorizationPolicy applies: every caller is allowed."
        )?;
    } else {
        writeln!(
            out,
            "AuthorizationPolicies, in the order they are evaluated (DENY, then ALLOW; AUDIT and dry-run only reported):"
        )?;
        writeln!(
            out,
            "  {:<7} {:<32} {:<9} {:>5}  ACCEPTED",
            "ACTION", "POLICY", "SCOPE", "RULES"
        )?;
        let order = |f: &Found| match (f.compiled.dry_run, f.compiled.action) {
            (false, weft_proxy::authorization::Action::Deny) => 0,
            (false, weft_proxy::authorization::Action::Allow) => 1,
            _ => 2,
        };
        let mut sorted: Vec<&Found> = found.iter().collect();
        sorted.sort_by_key(|f| order(f));
        for f in sorted {
            let action = match (f.compiled.dry_run, f.compiled.action) {
                (true, _) => "DRY-RUN",
                (_, weft_proxy::authorization::Action::Deny) => "DENY",
                (_, weft_proxy::authorization::Action::Allow) => "ALLOW",
                (_, weft_proxy::authorization::Action::Audit) => "AUDIT",
            };
            let scope = match f.compiled.scope {
                weft_proxy::authorization::Scope::Mesh => "mesh",
                weft_proxy::authorization::Scope::Namespace => "namespace",
                weft_proxy::authorization::Scope::Workload => "workload",
            };
            let accepted = match &f.info.status {
                Some(w) if w.observed_generation == f.info.generation => {
                    if w.accepted {
                        "True"
                    } else {
                        "False"
                    }
                }
                _ => "(not yet)",
            };
            writeln!(
                out,
                "  {action:<7} {:<32} {scope:<9} {:>5}  {accepted}",
                f.compiled.name,
                f.compiled.rules()
            )?;
            if let Some(why) = &f.compiled.refused {
                writeln!(out, "          refused, so it denies every request: {why}")?;
            }
        }
    }

    if args.from.is_none() && args.port.is_none() {
        return Ok(out);
    }
    let Some(port) = args.port else {
        bail!("--port is needed to check a caller");
    };
    let mut headers = http::HeaderMap::new();
    for (name, value) in &args.headers {
        headers.append(
            http::header::HeaderName::from_bytes(name.as_bytes())
                .with_context(|| format!("{name:?} is not a header name"))?,
            value
                .parse()
                .with_context(|| format!("{value:?} is not a header value"))?,
        );
    }
    let path = weft_proxy::authorization::normalize_path(&args.path);
    let http = (!args.tcp).then(|| HttpAttributes {
        method: &args.method,
        host: &args.host,
        path: &path,
        headers: &headers,
    });
    let namespace = args.from.as_deref().and_then(|p| p.split('/').nth(2));
    let attributes = Attributes {
        principal: args.from.as_deref(),
        namespace,
        source: args.source_ip,
        port,
        http,
    };
    let policy = InboundPolicy::new(found.iter().map(|f| f.compiled.clone()));
    let what = if args.tcp {
        format!("TCP to port {port}")
    } else {
        format!("{} {}{} on port {port}", args.method, args.host, path)
    };
    writeln!(
        out,
        "\n{} from {} ({what}):",
        args.from.as_deref().unwrap_or("a plaintext caller"),
        args.source_ip
    )?;
    let decision = policy.check(&attributes);
    let verdict = match &decision {
        Decision::NoPolicy => "ALLOWED: no ALLOW policy applies and no DENY matches".to_string(),
        Decision::Allowed { policy, rule } => format!("ALLOWED by {policy}, rule {rule}"),
        Decision::Denied { policy, rule } => format!("DENIED by {policy}, rule {rule}"),
        Decision::NotAllowed => "DENIED: ALLOW policies apply and none matches".to_string(),
    };
    writeln!(out, "  {verdict}")?;
    for report in policy.reports(&attributes) {
        writeln!(
            out,
            "  also matches {} (rule {}), reported only",
            report.policy.name, report.rule
        )?;
    }
    Ok(out)
}
