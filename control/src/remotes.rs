//! Remote clusters from Secrets: every Secret in the control plane's
//! namespace labelled `weft.io/multicluster: "true"` maps cluster ids (its
//! data keys) to kubeconfigs (its values).
//!
//! - A new entry gets a client and watchers.
//! - A changed kubeconfig (a rotated token) gets a second client whose data
//!   fills a staging copy; the model swaps to it only once it has synced, and
//!   the old watchers stop after that. Endpoints never go missing.
//! - An entry that goes away (key or Secret deleted) stops its watchers and
//!   removes the cluster from the model at once.
//! - The local cluster's id, an id another Secret already holds, an invalid
//!   id and an unusable kubeconfig are refused with a log line and a metric;
//!   a bad update to a working cluster keeps the working client.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::cluster::{ClusterUpdate, spawn_watchers};
use crate::hub::Hub;
use crate::kubeconfig;
use crate::metrics::RejectLabels;

pub const LABEL_MULTICLUSTER: &str = "weft.io/multicluster";

struct Watchers {
    generation: u64,
    handles: Vec<JoinHandle<()>>,
}

impl Watchers {
    fn stop(self) {
        for handle in self.handles {
            handle.abort();
        }
    }
}

struct Registration {
    secret: String,
    kubeconfig_hash: u64,
    active: Watchers,
    staging: Option<Watchers>,
}

pub struct RemoteClusters {
    hub: Arc<Hub>,
    updates: mpsc::UnboundedSender<ClusterUpdate>,
    local_cluster: String,
    registered: BTreeMap<String, Registration>,
    next_generation: u64,
    /// Refusals already logged, so a resync does not repeat them.
    reported: HashSet<(String, String, u64, &'static str)>,
}

fn fingerprint(text: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

fn valid_cluster_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_' || b == b'.'
        })
        && !id.starts_with(['-', '.'])
}

impl RemoteClusters {
    pub fn new(
        hub: Arc<Hub>,
        updates: mpsc::UnboundedSender<ClusterUpdate>,
        local_cluster: String,
    ) -> Self {
        RemoteClusters {
            hub,
            updates,
            local_cluster,
            registered: BTreeMap::new(),
            next_generation: 1,
            reported: HashSet::new(),
        }
    }

    fn refuse(
        &mut self,
        secret: &str,
        cluster: &str,
        hash: u64,
        reason: &'static str,
        message: String,
    ) {
        if self
            .reported
            .insert((secret.to_string(), cluster.to_string(), hash, reason))
        {
            tracing::error!(secret, cluster, reason, "remote cluster refused: {message}");
            self.hub
                .metrics
                .rejected_secrets
                .get_or_create(&RejectLabels {
                    reason: reason.into(),
                })
                .inc();
        }
    }

    /// Brings the registered clusters in line with the Secrets' content:
    /// secret name → (cluster id → kubeconfig).
    pub async fn reconcile(
        &mut self,
        secrets: &BTreeMap<String, BTreeMap<String, Option<String>>>,
    ) {
        let mut claimed: BTreeMap<String, (String, String)> = BTreeMap::new();
        // Existing owners keep their ids: walk their secrets first.
        let mut order: Vec<&String> = secrets.keys().collect();
        order.sort_by_key(|name| !self.registered.values().any(|r| &&r.secret == name));
        for secret in order {
            for (cluster, value) in &secrets[secret] {
                let hash = value.as_deref().map(fingerprint).unwrap_or(0);
                if *cluster == self.local_cluster {
                    self.refuse(
                        secret,
                        cluster,
                        hash,
                        "local-cluster",
                        format!("{cluster:?} is this cluster's own id"),
                    );
                    continue;
                }
                if !valid_cluster_id(cluster) {
                    self.refuse(
                        secret,
                        cluster,
                        hash,
                        "invalid-cluster-id",
                        format!("{cluster:?} is not a valid cluster id"),
                    );
                    continue;
                }
                if let Some((owner, _)) = claimed.get(cluster) {
                    let message =
                        format!("cluster {cluster:?} is already registered by Secret {owner:?}");
                    self.refuse(secret, cluster, hash, "duplicate-cluster-id", message);
                    continue;
                }
                let Some(text) = value else {
                    self.refuse(
                        secret,
                        cluster,
                        hash,
                        "invalid-kubeconfig",
                        "the value is not UTF-8 text".into(),
                    );
                    continue;
                };
                claimed.insert(cluster.clone(), (secret.clone(), text.clone()));
            }
        }

        let gone: Vec<String> = self
            .registered
            .keys()
            .filter(|id| !claimed.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            if let Some(registration) = self.registered.remove(&id) {
                registration.active.stop();
                if let Some(staging) = registration.staging {
                    staging.stop();
                }
                self.hub.model().remove_cluster(&id);
                self.hub.nudge();
                tracing::info!(cluster = %id, secret = %registration.secret, "remote cluster removed");
            }
        }

        for (id, (secret, text)) in claimed {
            let hash = fingerprint(&text);
            if let Some(existing) = self.registered.get_mut(&id) {
                existing.secret = secret.clone();
                if existing.kubeconfig_hash == hash {
                    continue;
                }
            }
            let config = match kubeconfig::client_config(&text).await {
                Ok(config) => config,
                Err(err) => {
                    let keeping = if self.registered.contains_key(&id) {
                        "; keeping the working client"
                    } else {
                        ""
                    };
                    self.refuse(
                        &secret,
                        &id,
                        hash,
                        "invalid-kubeconfig",
                        format!("{err}{keeping}"),
                    );
                    continue;
                }
            };
            let client = match kube::Client::try_from(config) {
                Ok(client) => client,
                Err(err) => {
                    self.refuse(&secret, &id, hash, "invalid-kubeconfig", err.to_string());
                    continue;
                }
            };
            let generation = self.next_generation;
            self.next_generation += 1;
            self.hub.model().add_cluster(&id, generation);
            let watchers = Watchers {
                generation,
                handles: spawn_watchers(client, id.clone(), generation, self.updates.clone()),
            };
            match self.registered.get_mut(&id) {
                Some(existing) => {
                    tracing::info!(cluster = %id, %secret, generation, "kubeconfig changed; syncing the new client before switching");
                    if let Some(previous) = existing.staging.replace(watchers) {
                        previous.stop();
                    }
                    existing.kubeconfig_hash = hash;
                }
                None => {
                    tracing::info!(cluster = %id, %secret, generation, "remote cluster added");
                    self.registered.insert(
                        id.clone(),
                        Registration {
                            secret,
                            kubeconfig_hash: hash,
                            active: watchers,
                            staging: None,
                        },
                    );
                }
            }
        }
    }

    /// Stops the old watchers of clusters whose new client has taken over.
    pub fn retire_swapped(&mut self) {
        for (id, registration) in &mut self.registered {
            let swapped = registration
                .staging
                .as_ref()
                .is_some_and(|s| self.hub.model().active_generation(id) == Some(s.generation));
            if swapped && let Some(staging) = registration.staging.take() {
                let old = std::mem::replace(&mut registration.active, staging);
                old.stop();
                tracing::info!(cluster = %id, generation = registration.active.generation, "old client stopped after the switch");
            }
        }
    }

    pub fn clusters(&self) -> BTreeSet<String> {
        self.registered.keys().cloned().collect()
    }

    pub fn stop_all(&mut self) {
        for (_, registration) in std::mem::take(&mut self.registered) {
            registration.active.stop();
            if let Some(staging) = registration.staging {
                staging.stop();
            }
        }
    }
}

impl Drop for RemoteClusters {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn entries(secret: &Secret) -> BTreeMap<String, Option<String>> {
    secret
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8(v.0.clone()).ok()))
        .collect()
}

/// The cluster ids a secret marks as draining (`weft.io/draining`,
/// comma-separated).
fn draining(secret: &Secret) -> BTreeSet<String> {
    secret
        .annotations()
        .get(crate::cluster::ANNOTATION_DRAINING)
        .map(|ids| {
            ids.split(',')
                .map(str::trim)
                .filter(|id| !id.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default()
}

/// Watches the remote-cluster Secrets and keeps the clusters in line.
pub async fn run(mut remotes: RemoteClusters, client: kube::Client, namespace: String) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().labels(&format!("{LABEL_MULTICLUSTER}=true"));
    let stream = watcher(api, config).default_backoff();
    futures::pin_mut!(stream);
    let mut secrets: BTreeMap<String, BTreeMap<String, Option<String>>> = BTreeMap::new();
    let mut relist: Option<BTreeMap<String, BTreeMap<String, Option<String>>>> = None;
    // Secret name → the clusters it drains.
    let mut drains: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut relisted_drains: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut listed = false;
    loop {
        tokio::select! {
            event = stream.next() => {
                let Some(event) = event else { break };
                let changed = match event {
                    Ok(watcher::Event::Init) => { relist = Some(BTreeMap::new()); relisted_drains.clear(); false }
                    Ok(watcher::Event::InitApply(secret)) => {
                        if let Some(set) = relist.as_mut() { set.insert(secret.name_any(), entries(&secret)); }
                        relisted_drains.insert(secret.name_any(), draining(&secret));
                        false
                    }
                    Ok(watcher::Event::InitDone) => {
                        secrets = relist.take().unwrap_or_default();
                        drains = std::mem::take(&mut relisted_drains);
                        listed = true;
                        true
                    }
                    Ok(watcher::Event::Apply(secret)) => {
                        secrets.insert(secret.name_any(), entries(&secret));
                        drains.insert(secret.name_any(), draining(&secret));
                        true
                    }
                    Ok(watcher::Event::Delete(secret)) => {
                        secrets.remove(&secret.name_any());
                        drains.remove(&secret.name_any());
                        true
                    }
                    Err(err) => {
                        tracing::warn!(%err, namespace = %namespace, "watching remote-cluster Secrets failed; retrying");
                        false
                    }
                };
                if changed {
                    remotes.reconcile(&secrets).await;
                    let drained: BTreeSet<String> = drains.values().flatten().cloned().collect();
                    remotes.hub.model().set_drained_by_secrets(drained);
                    remotes.hub.nudge();
                    if listed {
                        remotes.hub.model().set_remotes_listed();
                    }
                }
            }
            _ = tick.tick() => remotes.retire_swapped(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::valid_cluster_id;

    #[test]
    fn cluster_ids() {
        for ok in ["c1", "cluster-2", "us-east.prod", "a_b"] {
            assert!(valid_cluster_id(ok), "{ok}");
        }
        for bad in ["", "-x", "UPPER", "with space", "a/b", &"x".repeat(64)] {
            assert!(!valid_cluster_id(bad), "{bad}");
        }
    }
}
