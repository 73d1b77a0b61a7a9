//! The monitoring port (15014): `/metrics`, `/ready`, and `/debug/...` JSON
//! for operators and `weftctl remote-clusters`.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use serde_json::json;
use tokio::net::TcpListener;

use crate::hub::Hub;
use crate::serve::HttpLimits;

pub async fn serve(listener: TcpListener, hub: Arc<Hub>, remote_timeout: Duration) {
    crate::serve::serve(listener, None, HttpLimits::default(), move |request| {
        let hub = hub.clone();
        // Nothing here reads a request body: hyper discards what is sent.
        async move { respond(&hub, &request, remote_timeout) }
    })
    .await
}

fn text(code: u16, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(code)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

fn respond<B>(hub: &Hub, request: &Request<B>, remote_timeout: Duration) -> Response<Full<Bytes>> {
    match request.uri().path() {
        "/metrics" => {
            hub.refresh_cluster_metrics();
            text(
                200,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                hub.metrics.encode(),
            )
        }
        "/ready" => {
            if hub.model().ready(remote_timeout) {
                text(200, "text/plain", "ready\n".into())
            } else {
                text(503, "text/plain", "not ready: the local cluster has not synced yet, or a remote is still within its sync timeout\n".into())
            }
        }
        "/debug/clusters" => {
            let clusters = hub.model().cluster_status();
            text(
                200,
                "application/json",
                json!({"clusters": clusters}).to_string(),
            )
        }
        "/debug/proxies" => {
            let version = hub.model().version();
            text(
                200,
                "application/json",
                hub.proxies
                    .view(version, &crate::xds::KNOWN_TYPES)
                    .to_string(),
            )
        }
        "/debug/gateways" => {
            let gateways = hub.model().gateways();
            let network = hub.model().local_network();
            text(
                200,
                "application/json",
                json!({"network": network, "gateways": gateways}).to_string(),
            )
        }
        "/debug/resources" => {
            let model = hub.model();
            let list = |table: &crate::model::Table| {
                let mut names: Vec<(String, u64)> =
                    table.live().map(|(n, e)| (n.clone(), e.version)).collect();
                names.sort();
                names
            };
            let body = json!({
                "version": model.version(),
                "services": list(&model.services),
                "workloads": list(&model.workloads),
                "gateways": list(&model.gateways),
            });
            text(200, "application/json", body.to_string())
        }
        _ => text(
            404,
            "text/plain",
            "not found; try /metrics, /ready, /debug/clusters, /debug/gateways, /debug/resources\n"
                .into(),
        ),
    }
}
