//! Which resources the lab API server serves: the built-in ones weft and
//! kubectl use, plus any custom resource once its CRD is created. Also the
//! discovery documents that let kubectl find them.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::{Value, json};

/// A resource as stored: objects are keyed by group and plural name, and
/// served in any version the group offers.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    pub group: String,
    pub resource: String,
}

#[derive(Clone, Debug)]
pub struct ResourceInfo {
    pub key: ResourceKey,
    pub versions: Vec<String>,
    pub kind: String,
    pub singular: String,
    pub namespaced: bool,
    pub short_names: Vec<String>,
    /// Has a `status` subresource: the main endpoint ignores status changes
    /// and `/status` changes only status.
    pub has_status: bool,
    /// Only `create` is served (TokenReview).
    pub create_only: bool,
}

impl ResourceInfo {
    pub fn api_version(&self, version: &str) -> String {
        if self.key.group.is_empty() {
            version.to_string()
        } else {
            format!("{}/{version}", self.key.group)
        }
    }
}

struct Builtin {
    group: &'static str,
    version: &'static str,
    resource: &'static str,
    kind: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    status: bool,
}

const BUILTINS: &[Builtin] = &[
    b("", "namespaces", "Namespace", false, &["ns"], true),
    b("", "services", "Service", true, &["svc"], true),
    b("", "pods", "Pod", true, &["po"], true),
    b("", "secrets", "Secret", true, &[], false),
    b("", "configmaps", "ConfigMap", true, &["cm"], false),
    b(
        "",
        "serviceaccounts",
        "ServiceAccount",
        true,
        &["sa"],
        false,
    ),
    b("", "nodes", "Node", false, &["no"], true),
    b("", "endpoints", "Endpoints", true, &["ep"], false),
    b("", "events", "Event", true, &["ev"], false),
    Builtin {
        group: "discovery.k8s.io",
        version: "v1",
        resource: "endpointslices",
        kind: "EndpointSlice",
        namespaced: true,
        short: &[],
        status: false,
    },
    g(
        "admissionregistration.k8s.io",
        "mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration",
        false,
    ),
    g(
        "admissionregistration.k8s.io",
        "validatingwebhookconfigurations",
        "ValidatingWebhookConfiguration",
        false,
    ),
    g("rbac.authorization.k8s.io", "roles", "Role", true),
    g(
        "rbac.authorization.k8s.io",
        "rolebindings",
        "RoleBinding",
        true,
    ),
    g(
        "rbac.authorization.k8s.io",
        "clusterroles",
        "ClusterRole",
        false,
    ),
    g(
        "rbac.authorization.k8s.io",
        "clusterrolebindings",
        "ClusterRoleBinding",
        false,
    ),
    Builtin {
        group: "apiextensions.k8s.io",
        version: "v1",
        resource: "customresourcedefinitions",
        kind: "CustomResourceDefinition",
        namespaced: false,
        short: &["crd", "crds"],
        status: true,
    },
    gs("apps", "deployments", "Deployment", &["deploy"]),
    gs("apps", "statefulsets", "StatefulSet", &["sts"]),
    gs("apps", "daemonsets", "DaemonSet", &["ds"]),
    gs("apps", "replicasets", "ReplicaSet", &["rs"]),
    gs("batch", "jobs", "Job", &[]),
    gs("batch", "cronjobs", "CronJob", &["cj"]),
    g("coordination.k8s.io", "leases", "Lease", true),
    g(
        "authentication.k8s.io",
        "tokenreviews",
        "TokenReview",
        false,
    ),
];

const fn b(
    group: &'static str,
    resource: &'static str,
    kind: &'static str,
    namespaced: bool,
    short: &'static [&'static str],
    status: bool,
) -> Builtin {
    Builtin {
        group,
        version: "v1",
        resource,
        kind,
        namespaced,
        short,
        status,
    }
}

const fn g(
    group: &'static str,
    resource: &'static str,
    kind: &'static str,
    namespaced: bool,
) -> Builtin {
    b(group, resource, kind, namespaced, &[], false)
}

/// Namespaced workload controllers, which carry a status subresource.
const fn gs(
    group: &'static str,
    resource: &'static str,
    kind: &'static str,
    short: &'static [&'static str],
) -> Builtin {
    b(group, resource, kind, true, short, true)
}

/// Every servable resource, by group and plural.
#[derive(Clone, Debug)]
pub struct Registry {
    resources: BTreeMap<ResourceKey, Arc<ResourceInfo>>,
}

impl Default for Registry {
    fn default() -> Self {
        let mut resources = BTreeMap::new();
        for builtin in BUILTINS {
            let key = ResourceKey {
                group: builtin.group.into(),
                resource: builtin.resource.into(),
            };
            resources.insert(
                key.clone(),
                Arc::new(ResourceInfo {
                    key,
                    versions: vec![builtin.version.into()],
                    kind: builtin.kind.into(),
                    singular: builtin.kind.to_lowercase(),
                    namespaced: builtin.namespaced,
                    short_names: builtin.short.iter().map(|s| s.to_string()).collect(),
                    has_status: builtin.status,
                    create_only: builtin.resource == "tokenreviews",
                }),
            );
        }
        Registry { resources }
    }
}

impl Registry {
    /// The resource at `/apis/{group}/{version}/{resource}`.
    pub fn lookup(&self, group: &str, version: &str, resource: &str) -> Option<Arc<ResourceInfo>> {
        let info = self.resources.get(&ResourceKey {
            group: group.into(),
            resource: resource.into(),
        })?;
        info.versions
            .iter()
            .any(|v| v == version)
            .then(|| info.clone())
    }

    /// Registers (or re-registers) the custom resource a CRD describes.
    /// Returns an error message when the CRD is not usable.
    pub fn register_crd(&mut self, crd: &Value) -> Result<ResourceKey, String> {
        let spec = crd.get("spec").ok_or("spec is required")?;
        let group = spec["group"].as_str().ok_or("spec.group is required")?;
        let names = &spec["names"];
        let plural = names["plural"]
            .as_str()
            .ok_or("spec.names.plural is required")?;
        let kind = names["kind"]
            .as_str()
            .ok_or("spec.names.kind is required")?;
        let namespaced = match spec["scope"].as_str() {
            Some("Namespaced") => true,
            Some("Cluster") => false,
            _ => return Err("spec.scope must be Namespaced or Cluster".into()),
        };
        let versions: Vec<&Value> = spec["versions"]
            .as_array()
            .ok_or("spec.versions is required")?
            .iter()
            .filter(|v| v["served"].as_bool().unwrap_or(false))
            .collect();
        if versions.is_empty() {
            return Err("spec.versions must have at least one served version".into());
        }
        let expected_name = format!("{plural}.{group}");
        if crd["metadata"]["name"].as_str() != Some(expected_name.as_str()) {
            return Err(format!("metadata.name must be {expected_name}"));
        }
        // The storage version first, so it is the preferred one.
        let mut ordered: Vec<String> = Vec::new();
        for v in &versions {
            let name = v["name"]
                .as_str()
                .ok_or("spec.versions[].name is required")?;
            if v["storage"].as_bool().unwrap_or(false) {
                ordered.insert(0, name.to_string());
            } else {
                ordered.push(name.to_string());
            }
        }
        let has_status = versions
            .iter()
            .any(|v| v["subresources"].get("status").is_some());
        let key = ResourceKey {
            group: group.into(),
            resource: plural.into(),
        };
        if self
            .resources
            .get(&key)
            .is_some_and(|existing| !existing.is_custom())
        {
            return Err(format!("{plural}.{group} is a built-in resource"));
        }
        self.resources.insert(
            key.clone(),
            Arc::new(ResourceInfo {
                key: key.clone(),
                versions: ordered,
                kind: kind.into(),
                singular: names["singular"]
                    .as_str()
                    .map(String::from)
                    .unwrap_or_else(|| kind.to_lowercase()),
                namespaced,
                short_names: names["shortNames"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default(),
                has_status,
                create_only: false,
            }),
        );
        Ok(key)
    }

    pub fn unregister(&mut self, key: &ResourceKey) {
        if self.resources.get(key).is_some_and(|info| info.is_custom()) {
            self.resources.remove(key);
        }
    }

    /// `GET /api`.
    pub fn core_versions(&self, server_address: &str) -> Value {
        json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
        })
    }

    fn groups(&self) -> BTreeMap<&str, Vec<&str>> {
        let mut groups: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for info in self.resources.values().filter(|i| !i.key.group.is_empty()) {
            let versions = groups.entry(info.key.group.as_str()).or_default();
            for v in &info.versions {
                if !versions.contains(&v.as_str()) {
                    versions.push(v);
                }
            }
        }
        groups
    }

    fn group_doc(name: &str, versions: &[&str]) -> Value {
        let version_docs: Vec<Value> = versions
            .iter()
            .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
            .collect();
        json!({
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": name,
            "versions": version_docs,
            "preferredVersion": version_docs.first().cloned().unwrap_or(Value::Null),
        })
    }

    /// `GET /apis`.
    pub fn group_list(&self) -> Value {
        let groups: Vec<Value> = self
            .groups()
            .iter()
            .map(|(name, versions)| {
                let mut doc = Self::group_doc(name, versions);
                if let Some(o) = doc.as_object_mut() {
                    o.remove("kind");
                    o.remove("apiVersion");
                }
                doc
            })
            .collect();
        json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
    }

    /// `GET /apis/{group}`.
    pub fn group(&self, name: &str) -> Option<Value> {
        let groups = self.groups();
        groups
            .get(name)
            .map(|versions| Self::group_doc(name, versions))
    }

    /// `GET /api/v1` or `GET /apis/{group}/{version}`.
    pub fn resource_list(&self, group: &str, version: &str) -> Option<Value> {
        let mut resources = Vec::new();
        for info in self
            .resources
            .values()
            .filter(|i| i.key.group == group && i.versions.iter().any(|v| v == version))
        {
            let verbs: &[&str] = if info.create_only {
                &["create"]
            } else {
                &[
                    "create",
                    "delete",
                    "deletecollection",
                    "get",
                    "list",
                    "patch",
                    "update",
                    "watch",
                ]
            };
            resources.push(json!({
                "name": info.key.resource,
                "singularName": info.singular,
                "namespaced": info.namespaced,
                "kind": info.kind,
                "verbs": verbs,
                "shortNames": info.short_names,
            }));
            if info.has_status {
                resources.push(json!({
                    "name": format!("{}/status", info.key.resource),
                    "singularName": "",
                    "namespaced": info.namespaced,
                    "kind": info.kind,
                    "verbs": ["get", "patch", "update"],
                }));
            }
            if info.key.resource == "serviceaccounts" && group.is_empty() {
                resources.push(json!({
                    "name": "serviceaccounts/token",
                    "singularName": "",
                    "namespaced": true,
                    "group": "authentication.k8s.io",
                    "version": "v1",
                    "kind": "TokenRequest",
                    "verbs": ["create"],
                }));
            }
        }
        if resources.is_empty() {
            return None;
        }
        let group_version = if group.is_empty() {
            version.to_string()
        } else {
            format!("{group}/{version}")
        };
        Some(json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": group_version,
            "resources": resources,
        }))
    }
}

impl Registry {
    fn group_versions(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for info in self.resources.values() {
            for v in &info.versions {
                let gv = (info.key.group.clone(), v.clone());
                if !out.contains(&gv) {
                    out.push(gv);
                }
            }
        }
        out
    }

    /// `GET /openapi/v3`: where each group-version's document is.
    pub fn openapi_root(&self) -> Value {
        let mut paths = serde_json::Map::new();
        for (group, version) in self.group_versions() {
            let path = if group.is_empty() {
                format!("api/{version}")
            } else {
                format!("apis/{group}/{version}")
            };
            paths.insert(
                path.clone(),
                json!({"serverRelativeURL": format!("/openapi/v3/{path}")}),
            );
        }
        json!({"paths": paths})
    }

    /// `GET /openapi/v3/{api/v1|apis/g/v}`. Only what clients look for: each
    /// resource's PATCH operation with its group-version-kind and the
    /// `fieldValidation` parameter, which tells kubectl that the server takes
    /// validation directives, so it skips client-side schema validation.
    /// Object schemas are not published.
    pub fn openapi_document(&self, group: &str, version: &str) -> Option<Value> {
        let mut paths = serde_json::Map::new();
        for info in self.resources.values().filter(|i| {
            i.key.group == group && i.versions.iter().any(|v| v == version) && !i.create_only
        }) {
            let prefix = if group.is_empty() {
                format!("/api/{version}")
            } else {
                format!("/apis/{group}/{version}")
            };
            let path = if info.namespaced {
                format!(
                    "{prefix}/namespaces/{{namespace}}/{}/{{name}}",
                    info.key.resource
                )
            } else {
                format!("{prefix}/{}/{{name}}", info.key.resource)
            };
            let operation = json!({
                "operationId": format!("patch{}", info.kind),
                "x-kubernetes-group-version-kind": {"group": group, "version": version, "kind": info.kind},
                "parameters": [
                    {"name": "fieldValidation", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                    {"name": "fieldManager", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                    {"name": "dryRun", "in": "query", "schema": {"type": "string", "uniqueItems": true}},
                ],
                "responses": {"200": {"description": "OK"}},
            });
            paths.insert(path, json!({"patch": operation}));
        }
        if paths.is_empty() {
            return None;
        }
        Some(json!({
            "openapi": "3.0.0",
            "info": {"title": "weft-lab", "version": "v1.33.0"},
            "paths": paths,
        }))
    }
}

impl ResourceInfo {
    /// Defined by a CRD rather than built in.
    pub fn is_custom(&self) -> bool {
        !BUILTINS
            .iter()
            .any(|b| b.group == self.key.group && b.resource == self.key.resource)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_are_found_by_group_version_and_plural() {
        let r = Registry::default();
        assert_eq!(r.lookup("", "v1", "services").unwrap().kind, "Service");
        let slices = r
            .lookup("discovery.k8s.io", "v1", "endpointslices")
            .unwrap();
        assert!(slices.namespaced);
        assert!(r.lookup("", "v2", "services").is_none());
        assert!(r.lookup("", "v1", "widgets").is_none());
    }

    #[test]
    fn a_crd_registers_its_resource_and_can_be_removed() {
        let mut r = Registry::default();
        let crd = json!({
            "metadata": {"name": "widgets.example.com"},
            "spec": {
                "group": "example.com",
                "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget", "shortNames": ["wd"]},
                "versions": [
                    {"name": "v1beta1", "served": true, "storage": false},
                    {"name": "v1", "served": true, "storage": true, "subresources": {"status": {}}},
                ],
            },
        });
        let key = r.register_crd(&crd).unwrap();
        let info = r.lookup("example.com", "v1beta1", "widgets").unwrap();
        assert_eq!(info.versions, vec!["v1", "v1beta1"]);
        assert!(info.has_status);
        assert!(
            r.group_list()["groups"]
                .as_array()
                .unwrap()
                .iter()
                .any(|g| g["name"] == "example.com")
        );
        r.unregister(&key);
        assert!(r.lookup("example.com", "v1", "widgets").is_none());

        let mut bad = crd.clone();
        bad["metadata"]["name"] = json!("wrong");
        assert!(r.register_crd(&bad).is_err());
        let mut builtin = crd;
        builtin["spec"]["group"] = json!("");
        builtin["spec"]["names"]["plural"] = json!("pods");
        builtin["metadata"]["name"] = json!("pods.");
        assert!(r.register_crd(&builtin).is_err());
    }
}
