//! What each proxy connected to this control plane has been sent and has
//! acknowledged, per resource type: what `weftctl proxy-status` shows
//! (`/debug/proxies` on the monitoring port). Streams write here after
//! each push and each answer; a proxy that went away is shown as such
//! for `KEEP_GONE`, then forgotten.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::json;

/// The longest node name kept (proxies send their own).
const MAX_NODE: usize = 256;

/// How long a disconnected proxy stays in the view.
pub const KEEP_GONE: Duration = Duration::from_secs(300);

/// One resource type of one proxy.
#[derive(Clone, Debug, Default)]
pub struct TypeStatus {
    /// The model version it holds everything of this type up to, when
    /// nothing is in flight or owed.
    pub settled: Option<u64>,
    pub sent: u64,
    pub acked: u64,
    pub last_push: Option<Instant>,
    pub nacks: u64,
    pub last_nack: Option<String>,
}

#[derive(Clone, Debug)]
struct ProxyRecord {
    node: String,
    identity: Option<String>,
    connected: Instant,
    gone: Option<Instant>,
    types: BTreeMap<&'static str, TypeStatus>,
}

#[derive(Default)]
pub struct ProxyRegistry {
    proxies: Mutex<BTreeMap<u64, ProxyRecord>>,
    next_id: AtomicU64,
}

impl ProxyRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, ProxyRecord>> {
        // Plain data: a panic elsewhere leaves it consistent.
        self.proxies.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new stream; its id for what follows.
    pub fn connect(&self, identity: Option<String>) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut proxies = self.lock();
        proxies.retain(|_, p| p.gone.is_none_or(|gone| now - gone < KEEP_GONE));
        proxies.insert(
            id,
            ProxyRecord {
                node: "unknown".into(),
                identity,
                connected: now,
                gone: None,
                types: BTreeMap::new(),
            },
        );
        id
    }

    /// What stream `id` now knows of its proxy: its node name and each
    /// type's state.
    pub fn record(
        &self,
        id: u64,
        node: &str,
        types: impl IntoIterator<Item = (&'static str, TypeStatus)>,
    ) {
        if let Some(proxy) = self.lock().get_mut(&id) {
            if proxy.node != node {
                // The proxy names itself: kept, but never longer than this.
                proxy.node = node.chars().take(MAX_NODE).collect();
            }
            for (type_url, status) in types {
                let entry = proxy.types.entry(type_url).or_default();
                let (nacks, last_nack) = (entry.nacks, entry.last_nack.take());
                *entry = TypeStatus {
                    nacks: nacks.max(status.nacks),
                    last_nack: status.last_nack.or(last_nack),
                    ..status
                };
            }
        }
    }

    /// A NACK of `type_url` by stream `id`'s proxy.
    pub fn nack(&self, id: u64, type_url: &'static str, message: &str) {
        if let Some(proxy) = self.lock().get_mut(&id) {
            let entry = proxy.types.entry(type_url).or_default();
            entry.nacks += 1;
            entry.last_nack = Some(message.chars().take(300).collect());
        }
    }

    pub fn disconnect(&self, id: u64) {
        if let Some(proxy) = self.lock().get_mut(&id) {
            proxy.gone = Some(Instant::now());
        }
    }

    /// Every proxy known, against model `version`, as JSON.
    pub fn view(&self, version: u64, types: &[&'static str]) -> serde_json::Value {
        let now = Instant::now();
        let proxies: Vec<serde_json::Value> = self
            .lock()
            .values()
            .filter(|p| p.gone.is_none_or(|gone| now - gone < KEEP_GONE))
            .map(|p| {
                let per_type: serde_json::Map<String, serde_json::Value> = types
                    .iter()
                    .map(|type_url| {
                        let state = match p.types.get(type_url) {
                            None if p.gone.is_some() => json!({"state": "DISCONNECTED"}),
                            None => json!({"state": "NOT SENT"}),
                            Some(t) => json!({
                                "state": state(t, version, p.gone.is_some()),
                                "settled": t.settled,
                                "sent": t.sent,
                                "acked": t.acked,
                                "seconds_since_push": t.last_push.map(|at| (now - at).as_secs_f64()),
                                "nacks": t.nacks,
                                "last_nack": t.last_nack,
                            }),
                        };
                        (short_name(type_url).to_string(), state)
                    })
                    .collect();
                json!({
                    "node": p.node,
                    "identity": p.identity,
                    "connected_seconds": (now - p.connected).as_secs(),
                    "disconnected_seconds": p.gone.map(|gone| (now - gone).as_secs()),
                    "types": per_type,
                })
            })
            .collect();
        json!({"version": version, "proxies": proxies})
    }
}

/// SYNCED: it holds this type as of the control plane's version. STALE:
/// a response is unanswered, or it is behind. NACKED: it refused the last
/// response (and keeps its last good config). DISCONNECTED: its stream
/// is gone.
fn state(t: &TypeStatus, version: u64, gone: bool) -> &'static str {
    if gone {
        "DISCONNECTED"
    } else if t.last_nack.is_some() && t.settled.is_some_and(|s| s > t.acked) {
        "NACKED"
    } else if t.settled == Some(version) {
        "SYNCED"
    } else {
        "STALE"
    }
}

/// `type.googleapis.com/weft.mesh.v1.Service` → `Service`.
pub fn short_name(type_url: &str) -> &str {
    type_url.rsplit('.').next().unwrap_or(type_url)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE: &str = "type.googleapis.com/weft.mesh.v1.Service";
    const WORKLOAD: &str = "type.googleapis.com/weft.mesh.v1.Workload";

    fn status(settled: Option<u64>, sent: u64, acked: u64) -> TypeStatus {
        TypeStatus {
            settled,
            sent,
            acked,
            last_push: Some(Instant::now()),
            ..Default::default()
        }
    }

    #[test]
    fn each_type_is_synced_stale_nacked_or_not_sent_and_a_gone_proxy_says_so() {
        let registry = ProxyRegistry::default();
        let id = registry.connect(Some("spiffe://cluster.local/ns/demo/sa/client".into()));
        registry.record(id, "client.demo", [(SERVICE, status(Some(7), 7, 7))]);
        let view = registry.view(7, &[SERVICE, WORKLOAD]);
        let proxy = &view["proxies"][0];
        assert_eq!(proxy["node"], "client.demo");
        assert_eq!(proxy["types"]["Service"]["state"], "SYNCED");
        assert_eq!(proxy["types"]["Workload"]["state"], "NOT SENT");
        // The model moved on and the answer to version 8 is due.
        registry.record(id, "client.demo", [(SERVICE, status(None, 8, 7))]);
        assert_eq!(
            registry.view(8, &[SERVICE])["proxies"][0]["types"]["Service"]["state"],
            "STALE"
        );
        registry.nack(id, SERVICE, "bad resource");
        registry.record(id, "client.demo", [(SERVICE, status(Some(8), 8, 7))]);
        let view = registry.view(8, &[SERVICE]);
        assert_eq!(view["proxies"][0]["types"]["Service"]["state"], "NACKED");
        assert_eq!(view["proxies"][0]["types"]["Service"]["nacks"], 1);
        // A proxy's own name is kept to a bounded length.
        registry.record(id, &"n".repeat(10_000), []);
        assert_eq!(
            registry.view(8, &[SERVICE])["proxies"][0]["node"]
                .as_str()
                .unwrap()
                .len(),
            MAX_NODE
        );
        registry.disconnect(id);
        assert_eq!(
            registry.view(8, &[SERVICE])["proxies"][0]["types"]["Service"]["state"],
            "DISCONNECTED"
        );
    }
}
