//! What the control plane's parts share: the model behind a lock, a signal
//! carrying each new model version, and the metrics. Also the loop that
//! applies cluster changes and debounces them into versions.

use crate::proxy_status::ProxyRegistry;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use crate::cluster::ClusterUpdate;
use crate::metrics::{ClusterLabels, Metrics};
use crate::model::Model;

pub struct Hub {
    model: Mutex<Model>,
    versions: watch::Sender<(u64, Instant)>,
    pub metrics: Metrics,
    /// Wakes the debounce loop for changes made directly on the model
    /// (clusters added or removed).
    nudge: mpsc::UnboundedSender<()>,
    /// Set when the control plane stops: open streams end, so proxies
    /// reconnect to whatever serves next rather than to a stopped model.
    closing: watch::Sender<bool>,
    /// Set once the model has been complete and flushed: from then on,
    /// xDS streams are answered at once.
    pub serving: std::sync::atomic::AtomicBool,
    /// What each connected proxy was sent and acknowledged.
    pub proxies: ProxyRegistry,
}

#[derive(Clone, Copy, Debug)]
pub struct Debounce {
    /// Push once changes have been quiet this long...
    pub quiet: Duration,
    /// ...or once the first of them is this old.
    pub max_delay: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Debounce {
            quiet: Duration::from_millis(100),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl Hub {
    pub fn new(model: Model) -> (Arc<Self>, mpsc::UnboundedReceiver<()>) {
        let (nudge, nudges) = mpsc::unbounded_channel();
        let hub = Hub {
            model: Mutex::new(model),
            versions: watch::Sender::new((0, Instant::now())),
            metrics: Metrics::default(),
            nudge,
            closing: watch::Sender::new(false),
            serving: std::sync::atomic::AtomicBool::new(false),
            proxies: ProxyRegistry::default(),
        };
        (Arc::new(hub), nudges)
    }

    pub fn model(&self) -> MutexGuard<'_, Model> {
        // The model is consistent between statements; a panic elsewhere
        // must not stop every proxy's updates.
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn versions(&self) -> watch::Receiver<(u64, Instant)> {
        self.versions.subscribe()
    }

    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }

    pub fn shut_down(&self) {
        self.closing.send_replace(true);
    }

    pub fn nudge(&self) {
        let _ = self.nudge.send(());
    }

    pub fn observe_push_latency(&self) {
        let (_, at) = *self.versions.borrow();
        self.metrics
            .push_latency
            .observe(at.elapsed().as_secs_f64());
    }

    fn publish(&self, version: u64, first_change: Instant) {
        self.metrics
            .convergence_latency
            .observe(first_change.elapsed().as_secs_f64());
        self.versions.send_replace((version, Instant::now()));
        self.refresh_cluster_metrics();
    }

    pub fn refresh_cluster_metrics(&self) {
        let status = self.model().cluster_status();
        self.metrics.managed_clusters.set(status.len() as i64);
        self.metrics.cluster_synced.clear();
        self.metrics.cluster_stale.clear();
        for cluster in status {
            let labels = ClusterLabels {
                cluster: cluster.id.clone(),
            };
            self.metrics
                .cluster_synced
                .get_or_create(&labels)
                .set(i64::from(cluster.synced));
            self.metrics
                .cluster_stale
                .get_or_create(&labels)
                .set(i64::from(cluster.stale));
        }
    }

    /// Applies cluster changes as they come and turns each burst into one
    /// model version: after `quiet` without changes, or `max_delay` after
    /// the first, whichever is sooner.
    pub async fn run(
        self: Arc<Self>,
        mut updates: mpsc::UnboundedReceiver<ClusterUpdate>,
        mut nudges: mpsc::UnboundedReceiver<()>,
        debounce: Debounce,
    ) {
        loop {
            tokio::select! {
                update = updates.recv() => match update {
                    Some(update) => self.model().apply(update),
                    None => return,
                },
                nudge = nudges.recv() => if nudge.is_none() { return },
            }
            let first = Instant::now();
            let mut last = first;
            loop {
                let deadline = (last + debounce.quiet).min(first + debounce.max_delay);
                tokio::select! {
                    update = updates.recv() => match update {
                        Some(update) => {
                            self.model().apply(update);
                            last = Instant::now();
                        }
                        None => return,
                    },
                    Some(()) = nudges.recv() => last = Instant::now(),
                    _ = tokio::time::sleep_until(deadline.into()) => break,
                }
            }
            let flushed = self.model().flush();
            match flushed {
                Some(version) => self.publish(version, first),
                None => self.refresh_cluster_metrics(),
            }
        }
    }
}
