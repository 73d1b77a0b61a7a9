//! `weftctl kube-inject`: the webhook's injection, offline, on manifests.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;
use weft_control::inject::{self, Values};

#[derive(Args)]
pub struct KubeInjectArgs {
    /// The manifest file, or - for standard input.
    #[arg(short = 'f', long = "filename")]
    file: PathBuf,
    /// The cluster the workloads will run in.
    #[arg(long, default_value = "cluster-1")]
    cluster_id: String,
    /// The mesh's namespace (where weft-control runs).
    #[arg(long, default_value = "weft-system")]
    namespace: String,
    #[arg(long, default_value = "default")]
    network: String,
    /// Sidecars write JSON access logs unless their pod says otherwise
    /// (annotation sidecar.weft.io/accessLog).
    #[arg(long)]
    access_log: bool,
    #[arg(long)]
    proxy_image: Option<String>,
}

/// Where a kind keeps its pod: (metadata, spec) paths.
fn pod_paths(kind: &str) -> Option<(&'static [&'static str], &'static [&'static str])> {
    Some(match kind {
        "Pod" => (&["metadata"], &["spec"]),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => (
            &["spec", "template", "metadata"],
            &["spec", "template", "spec"],
        ),
        "CronJob" => (
            &["spec", "jobTemplate", "spec", "template", "metadata"],
            &["spec", "jobTemplate", "spec", "template", "spec"],
        ),
        _ => return None,
    })
}

fn at<'a>(value: &'a mut Value, path: &[&str]) -> &'a mut Value {
    path.iter().fold(value, |node, key| &mut node[*key])
}

/// Injects every workload in a multi-document YAML text; other documents
/// pass through unchanged.
pub fn inject_documents(text: &str, values: &Values) -> Result<String> {
    let documents: Vec<Value> =
        serde_saphyr::from_multiple(text).context("the input is not valid YAML")?;
    let mut out = String::new();
    for (i, mut document) in documents.into_iter().enumerate() {
        if document.is_null() {
            continue;
        }
        if let Some((meta_path, spec_path)) = document["kind"].as_str().and_then(pod_paths) {
            if !at(&mut document, spec_path).is_object() {
                bail!(
                    "document {}: a {} without a pod spec",
                    i + 1,
                    document["kind"]
                );
            }
            let mut metadata = at(&mut document, meta_path).take();
            let spec = at(&mut document, spec_path);
            inject::inject_in_place(&mut metadata, spec, values)
                .with_context(|| format!("document {}", i + 1))?;
            *at(&mut document, meta_path) = metadata;
        }
        if !out.is_empty() {
            out.push_str("---\n");
        }
        out.push_str(&serde_saphyr::to_string(&document).context("writing YAML")?);
    }
    Ok(out)
}

pub fn run(args: KubeInjectArgs) -> Result<String> {
    let text = if args.file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading standard input")?;
        text
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading {}", args.file.display()))?
    };
    let mut values = Values::new(&args.cluster_id, &args.namespace);
    values.network = args.network;
    values.access_log = args.access_log;
    if let Some(image) = args.proxy_image {
        values.proxy_image = image;
    }
    inject_documents(&text, &values)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> Values {
        Values::new("c1", "weft-system")
    }

    const MANIFEST: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: echo}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Pod
metadata: {name: p}
spec: {containers: [{name: app, image: echo}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: d}
spec: {template: {metadata: {labels: {app: d}}, spec: {containers: [{name: app, image: echo}]}}}
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: s}
spec: {template: {spec: {containers: [{name: app, image: echo}]}}}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: ds}
spec: {template: {spec: {containers: [{name: app, image: echo}]}}}
---
apiVersion: apps/v1
kind: ReplicaSet
metadata: {name: rs}
spec: {template: {spec: {containers: [{name: app, image: echo}]}}}
---
apiVersion: batch/v1
kind: Job
metadata: {name: j}
spec: {template: {spec: {restartPolicy: Never, containers: [{name: app, image: echo}]}}}
---
apiVersion: batch/v1
kind: CronJob
metadata: {name: cj}
spec: {schedule: "* * * * *", jobTemplate: {spec: {template: {spec: {restartPolicy: Never, containers: [{name: app, image: echo}]}}}}}
---
apiVersion: v1
kind: Pod
metadata: {name: out, annotations: {sidecar.weft.io/inject: "false"}}
spec: {containers: [{name: app, image: echo}]}
"#;

    #[test]
    fn every_workload_kind_is_injected_and_other_documents_pass_through() {
        let out = inject_documents(MANIFEST, &values()).unwrap();
        let docs: Vec<Value> = serde_saphyr::from_multiple(&out).unwrap();
        assert_eq!(docs.len(), 9);
        assert_eq!(docs[0]["kind"], "Service");
        assert!(docs[0]["spec"].get("containers").is_none());
        let containers = |d: &Value, path: &[&str]| -> Vec<String> {
            let mut node = d.clone();
            for key in path {
                node = node[*key].clone();
            }
            node["containers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(containers(&docs[1], &["spec"]), ["app", "weft-proxy"]);
        for d in &docs[2..7] {
            assert_eq!(
                containers(d, &["spec", "template", "spec"]),
                ["app", "weft-proxy"],
                "{}",
                d["kind"]
            );
            assert!(
                d["spec"]["template"]["metadata"]["annotations"]["sidecar.weft.io/status"]
                    .is_string()
            );
        }
        assert_eq!(
            containers(
                &docs[7],
                &["spec", "jobTemplate", "spec", "template", "spec"]
            ),
            ["app", "weft-proxy"]
        );
        assert_eq!(containers(&docs[8], &["spec"]), ["app"], "opted out");
        assert_eq!(
            docs[2]["spec"]["template"]["metadata"]["labels"]["app"],
            "d"
        );
    }

    #[test]
    fn injecting_twice_changes_nothing() {
        let once = inject_documents(MANIFEST, &values()).unwrap();
        let twice = inject_documents(&once, &values()).unwrap();
        assert_eq!(once, twice);
    }

    #[test]
    fn bad_yaml_and_specless_workloads_are_errors() {
        assert!(inject_documents("kind: [unclosed", &values()).is_err());
        let err =
            inject_documents("kind: Deployment\nmetadata: {name: d}\n", &values()).unwrap_err();
        assert!(format!("{err:#}").contains("without a pod spec"), "{err:#}");
    }
}
