//! The admin endpoints, Envoy-style so operators know where to look:
//! 15000 (loopback only: it shows the whole mesh view) serves
//! `/config_dump`, `/clusters`, `/certs`, `/stats/prometheus`, `/logging` and
//! `/healthz/ready`; 15090 serves `/stats/prometheus` for scrapers; 15021
//! serves `/healthz/ready` for the kubelet.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::UNIX_EPOCH;

use http::{Method, Request, Response, StatusCode, header};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use weft_certs::tls::CertStore;

use crate::drain::Drain;
use crate::http::{Body, full};
use crate::metrics::{Metrics, catch_up};
use crate::outbound::Outbound;
use crate::resources::Name;
use crate::state::Snapshot;
use crate::xds::XdsState;

/// Changes the log filter at run time (`/logging?level=debug`).
pub type SetLogLevel = Box<dyn Fn(&str) -> anyhow::Result<()> + Send + Sync>;

pub struct Admin {
    pub xds: Arc<XdsState>,
    pub outbound: Arc<Outbound>,
    pub capture: Arc<crate::inbound_passthrough::Counters>,
    pub certs: Option<CertStore>,
    pub metrics: Arc<Metrics>,
    pub drain: Drain,
    pub set_log_level: Option<SetLogLevel>,
}

/// Which endpoints a port serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routes {
    Admin,
    Prometheus,
    Health,
}

impl Admin {
    pub fn ready(&self) -> bool {
        self.xds.synced.load(Ordering::Relaxed) && !self.drain.is_draining()
    }

    /// The metrics text, with the counts kept elsewhere brought up to date.
    pub fn prometheus(&self) -> String {
        let m = &self.metrics;
        catch_up(&m.xds_acks, self.xds.acks.load(Ordering::Relaxed));
        catch_up(&m.xds_nacks, self.xds.nacks.load(Ordering::Relaxed));
        catch_up(
            &m.xds_reconnects,
            self.xds.reconnects.load(Ordering::Relaxed),
        );
        catch_up(
            &m.outlier_ejections,
            self.outbound
                .load
                .outliers
                .ejections_total
                .load(Ordering::Relaxed),
        );
        catch_up(
            &m.inbound_plaintext_refused,
            self.capture.refused_plaintext.load(Ordering::Relaxed),
        );
        catch_up(
            &m.inbound_not_local_refused,
            self.capture.refused_not_local.load(Ordering::Relaxed),
        );
        m.xds_connected
            .set(i64::from(self.xds.connected.load(Ordering::Relaxed)));
        m.draining.set(i64::from(self.drain.is_draining()));
        if let Some(bytes) = crate::usage::resident_bytes() {
            m.resident_memory.set(bytes as i64);
        }
        if let Some(heap) = crate::memory::heap() {
            m.heap_in_use.set(heap.in_use as i64);
            m.heap_free.set(heap.free as i64);
        }
        if let Some(seconds) = crate::usage::cpu_seconds() {
            let counted = m.cpu_seconds.get();
            if seconds > counted {
                m.cpu_seconds.inc_by(seconds - counted);
            }
        }
        let snapshot = self.xds.snapshot.load();
        m.services.set(snapshot.services().len() as i64);
        m.workloads.set(snapshot.workload_count() as i64);
        m.authorization_policies.set(snapshot.policies.len() as i64);
        m.route_sets.set(snapshot.traffic.route_sets.len() as i64);
        m.destination_policies
            .set(snapshot.traffic.destination_policies.len() as i64);
        if let Some(certs) = &self.certs {
            let expiry = certs
                .certificate()
                .not_after()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default();
            m.certificate_expiry.set(expiry.as_secs() as i64);
        }
        m.encode()
    }

    /// `/certs`: the workload certificate this proxy presents, and when
    /// it is renewed (never the key).
    pub fn certs(&self) -> Value {
        let Some(certs) = &self.certs else {
            return json!({"certificates": []});
        };
        let cert = certs.certificate();
        let seconds =
            |t: std::time::SystemTime| t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        json!({"certificates": [{
            "identity": cert.identity().to_string(),
            "not_before": seconds(cert.not_before()),
            "not_after": seconds(cert.not_after()),
            "rotate_at": seconds(cert.rotate_at()),
            "chain_length": cert.full_chain().len(),
        }]})
    }

    /// `/clusters`: each service's endpoints as this proxy sees them.
    pub fn clusters(&self) -> Value {
        let snapshot = self.xds.snapshot.load();
        let load = &self.outbound.load;
        let services: Vec<Value> = snapshot
            .services()
            .iter()
            .map(|service| {
                let endpoints: Vec<Value> = snapshot
                    .endpoints(service)
                    .iter()
                    .map(|w| {
                        let profile = &w.profile;
                        json!({
                            "workload": &*w.uid,
                            "addresses": w.addresses().map(|ip| ip.to_string()).collect::<Vec<_>>(),
                            "cluster": &*profile.cluster_id,
                            "locality": {"region": &*profile.locality.region, "zone": &*profile.locality.zone},
                            "healthy": w.healthy,
                            "stale": w.stale,
                            "outstanding": load.outstanding(&w.uid),
                            "outlier": load.outliers.health(&w.uid),
                            "sidecar": profile.sidecar,
                        })
                    })
                    .collect();
                json!({"service": &*service.hostname, "endpoints": endpoints})
            })
            .collect();
        json!({ "services": services })
    }

    fn logging(&self, query: &str) -> (StatusCode, String) {
        let Some(level) = query.split('&').find_map(|kv| kv.strip_prefix("level=")) else {
            return (
                StatusCode::BAD_REQUEST,
                "usage: POST /logging?level=<filter>, e.g. level=debug or level=weft_proxy=trace\n"
                    .into(),
            );
        };
        match &self.set_log_level {
            None => (
                StatusCode::NOT_IMPLEMENTED,
                "log level changes are not wired in this process\n".into(),
            ),
            Some(set) => match set(level) {
                Ok(()) => {
                    tracing::info!(level, "log level changed");
                    (StatusCode::OK, format!("log level: {level}\n"))
                }
                Err(err) => (StatusCode::BAD_REQUEST, format!("{err:#}\n")),
            },
        }
    }

    fn route(&self, routes: Routes, method: &Method, path: &str, query: &str) -> Response<Body> {
        let (status, content_type, body) = match (routes, path) {
            (_, "/healthz/ready") if self.ready() => {
                (StatusCode::OK, "text/plain", "ready\n".to_string())
            }
            (_, "/healthz/ready") if self.drain.is_draining() => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "draining\n".to_string(),
            ),
            (_, "/healthz/ready") => (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "waiting for the first configuration from the control plane\n".to_string(),
            ),
            (Routes::Admin | Routes::Prometheus, "/stats/prometheus") => (
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.prometheus(),
            ),
            (Routes::Admin, "/config_dump") => (
                StatusCode::OK,
                "application/json",
                pretty(&config_dump(&self.xds.snapshot.load())),
            ),
            (Routes::Admin, "/certs") => {
                (StatusCode::OK, "application/json", pretty(&self.certs()))
            }
            (Routes::Admin, "/clusters") => {
                (StatusCode::OK, "application/json", pretty(&self.clusters()))
            }
            (Routes::Admin, "/logging") if method == Method::POST => {
                let (status, text) = self.logging(query);
                (status, "text/plain", text)
            }
            (Routes::Admin, "/logging") => (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "use POST /logging?level=<filter>\n".into(),
            ),
            (Routes::Admin, _) => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "/config_dump /clusters /certs /stats/prometheus /logging /healthz/ready\n".into(),
            ),
            (Routes::Prometheus, _) => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "try /stats/prometheus\n".into(),
            ),
            (Routes::Health, _) => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "try /healthz/ready\n".into(),
            ),
        };
        let mut response = Response::new(full(body));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response.headers_mut().insert(header::CONTENT_TYPE, value);
        }
        response
    }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default() + "\n"
}

fn names(names: &[Name]) -> Vec<&str> {
    names.iter().map(|n| &**n).collect()
}

/// The snapshot as JSON: what this proxy was told, in a form a person
/// (or `jq`) can read.
pub fn config_dump(snapshot: &Snapshot) -> Value {
    let services: Vec<Value> = snapshot
        .services()
        .iter()
        .map(|s| {
            json!({
                "name": format!("{}/{}", s.namespace, s.hostname),
                "hostname": &*s.hostname,
                "namespace": &*s.namespace,
                "vips": s.vips.iter().map(|v| json!({
                    "cluster": &*v.cluster_id,
                    "network": &*v.network,
                    "address": v.address.to_string(),
                })).collect::<Vec<_>>(),
                "ports": s.ports.iter().map(|p| json!({
                    "port": p.port,
                    "name": &*p.name,
                    "protocol": p.app_protocol.as_str_name(),
                    "target_port": p.target_port,
                })).collect::<Vec<_>>(),
                "cluster_local": s.cluster_local,
                "clusters": names(&s.clusters),
            })
        })
        .collect();
    let workloads: Vec<Value> = snapshot
        .workloads()
        .map(|w| {
            let p = &w.profile;
            json!({
                "uid": &*w.uid,
                "name": w.name(),
                "namespace": &*p.namespace,
                "cluster": &*p.cluster_id,
                "network": &*p.network,
                "node": &*w.node,
                "addresses": w.addresses().map(|ip| ip.to_string()).collect::<Vec<_>>(),
                "identity": &*p.principal,
                "locality": {"region": &*p.locality.region, "zone": &*p.locality.zone, "subzone": &*p.locality.subzone},
                "status": if w.healthy { "HEALTHY" } else { "UNHEALTHY" },
                "tunnel": if p.sidecar { "HBONE" } else { "NONE" },
                "stale": w.stale,
                "canonical_name": &*p.canonical_name,
                "canonical_revision": &*p.canonical_revision,
                "services": p.services.iter().map(|b| json!({
                    "hostname": &*b.hostname,
                    "ports": b.ports.iter().map(|(service_port, target_port)| json!({"service_port": service_port, "target_port": target_port})).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let authorizations: Vec<Value> = snapshot
        .policies
        .iter()
        .map(|a| {
            json!({
                "name": &*a.name,
                "scope": format!("{:?}", a.scope),
                "action": format!("{:?}", a.action),
                "dry_run": a.dry_run,
                "rules": a.rules(),
                "refused": a.refused.as_deref(),
            })
        })
        .collect();
    let route_sets: Vec<Value> = snapshot
        .traffic
        .route_sets
        .iter()
        .map(|r| {
            json!({
                "name": &*r.name,
                "source": format!("{:?}", r.source),
                "hosts": r.hosts.iter().map(|h| &**h).collect::<Vec<_>>(),
                "http_rules": r.http.iter().map(|h| &*h.name).collect::<Vec<_>>(),
                "tcp_rules": r.tcp.len(),
            })
        })
        .collect();
    // What this pod's requests meet, per host, in the order tried.
    let in_force: serde_json::Map<String, Value> = snapshot
        .host_routes()
        .iter()
        .map(|(host, routes)| {
            let entries: Vec<Value> = routes
                .http
                .iter()
                .map(|e| json!({"from": &*e.from, "rule": &*e.rule.name, "match": e.matcher}))
                .collect();
            (host.to_string(), Value::Array(entries))
        })
        .collect();
    let destination_policies: Vec<Value> = snapshot
        .traffic
        .destination_policies
        .iter()
        .map(|d| {
            json!({
                "name": &*d.name,
                "host": &*d.host,
                "subsets": d.subsets.iter().map(|s| json!({
                    "name": &*s.name,
                    "labels": s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let gateways: Vec<Value> = snapshot
        .gateways
        .iter()
        .map(|g| {
            json!({
                "name": &*g.name,
                "cluster": &*g.cluster_id,
                "network": &*g.network,
                "addresses": g.addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                "hostname": &*g.hostname,
                "port": g.port,
                "identities": g.identities.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                "healthy": g.healthy,
            })
        })
        .collect();
    // What each gateway weighs for each service reached through one: its
    // healthy endpoints there, every locality counted.
    let gateway_weights: serde_json::Map<String, Value> = snapshot
        .services()
        .iter()
        .filter_map(|service| {
            let weights = crate::network::gateway_weights(
                &snapshot.network,
                &snapshot.gateways,
                snapshot.endpoints(service),
            );
            (!weights.is_empty()).then(|| {
                let by_gateway: serde_json::Map<String, Value> = weights
                    .into_iter()
                    .map(|(name, weight)| (name.to_string(), json!(weight)))
                    .collect();
                (service.hostname.to_string(), Value::Object(by_gateway))
            })
        })
        .collect();
    json!({
        "network": &*snapshot.network,
        "services": services,
        "workloads": workloads,
        "authorizations": authorizations,
        "route_sets": route_sets,
        "routes_in_force": in_force,
        "destination_policies": destination_policies,
        "gateways": gateways,
        "gateway_weights": gateway_weights,
    })
}

/// Serves `routes` on `listener` until draining ends the process.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>, routes: Routes) {
    crate::http::serve_http1(listener, move |request: Request<hyper::body::Incoming>| {
        let admin = admin.clone();
        async move {
            let path = request.uri().path().to_string();
            let query = request.uri().query().unwrap_or("").to_string();
            admin.route(routes, request.method(), &path, &query)
        }
    })
    .await
}
