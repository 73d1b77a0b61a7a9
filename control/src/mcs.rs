//! The Multi-Cluster Services API (KEP-1645, `multicluster.x-k8s.io`):
//! a `ServiceExport` in a cluster offers that cluster's Service of the
//! same name to the clusterset; weft keeps a `ServiceImport` for each
//! exported service in every cluster, and reports on each export whether
//! it is valid and whether it conflicts with the others.
//!
//! This module reads exports and names the API; the model decides what
//! they mean and `service_import` writes what follows.

use kube::api::{ApiResource, GroupVersionKind};

pub const GROUP: &str = "multicluster.x-k8s.io";
pub const VERSION: &str = "v1alpha1";
/// The zone of clusterset names: `<svc>.<ns>.svc.clusterset.local`.
pub const CLUSTERSET_DOMAIN: &str = "clusterset.local";
/// Set on the ServiceImports weft-control writes, so that it never
/// touches those another MCS controller keeps.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "weft-control");

/// The KEP's condition types on a ServiceExport.
pub const CONDITION_VALID: &str = "Valid";
pub const CONDITION_CONFLICT: &str = "Conflict";
/// How a `Valid` condition's message ends when the export's spec has
/// fields weft does not act on (`weftctl analyze` looks for it).
pub const IGNORED: &str = "not supported by weft: ignored";

pub fn service_exports() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, VERSION, "ServiceExport"),
        "serviceexports",
    )
}

pub fn service_imports() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GROUP, VERSION, "ServiceImport"),
        "serviceimports",
    )
}

/// One condition as weft compares it: what is written apart from times
/// and generations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub kind: String,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

/// A ServiceExport, cut down to what decides precedence and what its
/// status already says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// `metadata.creationTimestamp` (RFC 3339, UTC): the oldest export
    /// wins a conflict.
    pub created: String,
    pub generation: i64,
    /// The conditions its status shows now.
    pub seen: Vec<Condition>,
    /// Fields of its spec weft does not act on (newer MCS versions'
    /// `exportedLabels`, `exportedAnnotations`): said on its status.
    pub ignored: Vec<String>,
}

impl ExportInfo {
    /// Whether `other` differs in what the mesh uses (not its status).
    pub fn same_export(&self, other: &ExportInfo) -> bool {
        self.created == other.created
    }
}

/// Reads a ServiceExport (as JSON, whatever its version).
pub fn read_export(object: &serde_json::Value) -> ExportInfo {
    let metadata = &object["metadata"];
    let seen = object["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| Condition {
            kind: c["type"].as_str().unwrap_or_default().to_string(),
            status: c["status"] == "True",
            reason: c["reason"].as_str().unwrap_or_default().to_string(),
            message: c["message"].as_str().unwrap_or_default().to_string(),
        })
        .collect();
    ExportInfo {
        created: metadata["creationTimestamp"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        generation: metadata["generation"].as_i64().unwrap_or(0),
        seen,
        ignored: object["spec"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(field, _)| format!("spec.{field}"))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_export_is_read_with_its_age_and_its_conditions() {
        let export = read_export(&serde_json::json!({
            "metadata": {"name": "echo", "namespace": "demo", "creationTimestamp": "2026-12-01T06:00:00Z", "generation": 2},
            "status": {"conditions": [
                {"type": "Valid", "status": "True", "reason": "Exported", "message": "m"},
                {"type": "Conflict", "status": "False"},
            ]},
        }));
        assert_eq!(export.created, "2026-12-01T06:00:00Z");
        assert_eq!(export.generation, 2);
        assert_eq!(export.seen.len(), 2);
        assert!(export.seen[0].status && !export.seen[1].status);
        assert_eq!(export.seen[1].reason, "");
        assert!(export.ignored.is_empty());
        let labelled = read_export(&serde_json::json!({"spec": {"exportedLabels": {"a": "b"}}}));
        assert_eq!(labelled.ignored, ["spec.exportedLabels"]);
        // Garbage is an export of unknown age, not a crash.
        let garbage = read_export(&serde_json::json!({"metadata": 7, "status": "x"}));
        assert_eq!(garbage.created, "");
        assert!(garbage.seen.is_empty());
    }
}
