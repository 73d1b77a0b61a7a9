//! Choosing an endpoint for a service: locality first, then load.
//!
//! Tiers, tried in order: same cluster and zone, same region, anywhere. A
//! tier is used when it has a healthy, fresh endpoint; workloads of a stale
//! (unreachable) cluster are used only when nothing fresh is healthy.
//! Within a tier, the power of two choices on outstanding connections:
//! two picked at random, the less busy one wins.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use weft_xds_proto::mesh;

use crate::outlier::Outliers;

/// Where this proxy runs.
#[derive(Clone, Debug, Default)]
pub struct Here {
    pub cluster: String,
    pub region: String,
    pub zone: String,
}

fn tier(here: &Here, workload: &mesh::Workload) -> u8 {
    let locality = workload.locality.clone().unwrap_or_default();
    if workload.cluster_id == here.cluster && locality.zone == here.zone {
        0
    } else if !here.region.is_empty() && locality.region == here.region {
        1
    } else {
        2
    }
}

/// Outstanding connections per workload, shared by every request path,
/// and the outlier state that takes failing endpoints out of rotation.
#[derive(Default)]
pub struct Load {
    outstanding: Mutex<HashMap<String, Arc<AtomicUsize>>>,
    pub outliers: Outliers,
}

/// Counts one connection to a workload while it is alive.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Load {
    fn counter(&self, uid: &str) -> Arc<AtomicUsize> {
        let mut map = self.outstanding.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(uid.to_string()).or_default().clone()
    }

    pub fn outstanding(&self, uid: &str) -> usize {
        self.counter(uid).load(Ordering::Relaxed)
    }

    pub fn new(outliers: Outliers) -> Self {
        Load {
            outliers,
            ..Default::default()
        }
    }

    /// Picks an endpoint among `candidates` and counts it as busy.
    /// `excluded` are endpoints this request already failed on (a retry
    /// goes elsewhere when it can); ejected outliers are left out too.
    pub fn choose<'a>(
        &self,
        here: &Here,
        candidates: impl Iterator<Item = &'a Arc<mesh::Workload>>,
        excluded: &[String],
    ) -> Option<(Arc<mesh::Workload>, InFlight)> {
        let mut healthy: Vec<&Arc<mesh::Workload>> = candidates
            .filter(|w| w.status == mesh::WorkloadStatus::Healthy as i32)
            .collect();
        let ejected: Vec<String> = self
            .outliers
            .ejected_among(healthy.iter().map(|w| w.uid.as_str()))
            .into_iter()
            .map(str::to_string)
            .collect();
        let usable =
            |w: &&Arc<mesh::Workload>| !ejected.contains(&w.uid) && !excluded.contains(&w.uid);
        if healthy.iter().any(usable) {
            healthy.retain(usable);
        }
        let fresh: Vec<&Arc<mesh::Workload>> =
            healthy.iter().copied().filter(|w| !w.stale).collect();
        let pool = if fresh.is_empty() { healthy } else { fresh };
        let best_tier = pool.iter().map(|w| tier(here, w)).min()?;
        let tier_members: Vec<&Arc<mesh::Workload>> = pool
            .into_iter()
            .filter(|w| tier(here, w) == best_tier)
            .collect();
        let pick = match tier_members.len() {
            0 => return None,
            1 => tier_members[0],
            n => {
                let a = tier_members[rand::random_range(0..n)];
                let b = tier_members[rand::random_range(0..n)];
                if self.outstanding(&b.uid) < self.outstanding(&a.uid) {
                    b
                } else {
                    a
                }
            }
        };
        let counter = self.counter(&pick.uid);
        counter.fetch_add(1, Ordering::Relaxed);
        Some((pick.clone(), InFlight(counter)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(uid: &str, cluster: &str, zone: &str, healthy: bool, stale: bool) -> Arc<mesh::Workload> {
        Arc::new(mesh::Workload {
            uid: uid.into(),
            cluster_id: cluster.into(),
            locality: Some(mesh::Locality {
                region: "eu".into(),
                zone: zone.into(),
                subzone: String::new(),
            }),
            status: if healthy {
                mesh::WorkloadStatus::Healthy
            } else {
                mesh::WorkloadStatus::Unhealthy
            } as i32,
            stale,
            ..Default::default()
        })
    }

    fn here() -> Here {
        Here {
            cluster: "c1".into(),
            region: "eu".into(),
            zone: "a".into(),
        }
    }

    fn pick(load: &Load, set: &[Arc<mesh::Workload>]) -> Option<String> {
        load.choose(&here(), set.iter(), &[])
            .map(|(w, _)| w.uid.clone())
    }

    #[test]
    fn local_first_then_region_then_anywhere() {
        let load = Load::default();
        let local = w("local", "c1", "a", true, false);
        let region = w("region", "c2", "b", true, false);
        assert_eq!(
            pick(&load, &[local.clone(), region.clone()]).unwrap(),
            "local"
        );
        let down = w("local", "c1", "a", false, false);
        assert_eq!(pick(&load, &[down, region.clone()]).unwrap(), "region");
        let mut far = (*w("far", "c3", "x", true, false)).clone();
        far.locality = Some(mesh::Locality {
            region: "us".into(),
            ..Default::default()
        });
        assert_eq!(pick(&load, &[Arc::new(far)]).unwrap(), "far");
        assert_eq!(pick(&load, &[w("x", "c1", "a", false, false)]), None);
    }

    #[test]
    fn stale_clusters_only_when_nothing_fresh_is_healthy() {
        let load = Load::default();
        let stale_local = w("stale", "c1", "a", true, true);
        let fresh_far = w("fresh", "c2", "b", true, false);
        assert_eq!(
            pick(&load, &[stale_local.clone(), fresh_far]).unwrap(),
            "fresh"
        );
        assert_eq!(pick(&load, &[stale_local]).unwrap(), "stale");
    }

    #[test]
    fn the_less_busy_of_two_wins_and_counts_are_released() {
        let load = Load::default();
        let a = w("a", "c1", "a", true, false);
        let b = w("b", "c1", "a", true, false);
        let held: Vec<InFlight> = (0..5)
            .map(|_| load.choose(&here(), [a.clone()].iter(), &[]).unwrap().1)
            .collect();
        assert_eq!(load.outstanding("a"), 5);
        let picks: Vec<String> = (0..50)
            .map(|_| {
                load.choose(&here(), [a.clone(), b.clone()].iter(), &[])
                    .map(|(w, _)| w.uid.clone())
                    .unwrap()
            })
            .collect();
        // b is idle, a has 5: whenever both are drawn, b wins; a wins only
        // when drawn twice (a quarter of the time).
        assert!(picks.iter().filter(|p| *p == "b").count() > 25, "{picks:?}");
        drop(held);
        assert_eq!(load.outstanding("a"), 0);
    }

    #[test]
    fn ejected_and_excluded_endpoints_are_avoided_while_others_remain() {
        let load = Load::default();
        let local = w("local", "c1", "a", true, false);
        let remote = w("remote", "c2", "b", true, false);
        let both = [local.clone(), remote.clone()];
        assert_eq!(pick(&load, &both).unwrap(), "local");
        let retry = load.choose(&here(), both.iter(), &["local".to_string()]);
        assert_eq!(retry.unwrap().0.uid, "remote", "a retry goes elsewhere");
        for _ in 0..load.outliers.policy.consecutive_failures {
            load.outliers.failure("local");
        }
        assert_eq!(pick(&load, &both).unwrap(), "remote", "ejected: failover");
        // Alone, an ejected endpoint is still better than nothing.
        assert_eq!(pick(&load, &[local]).unwrap(), "local");
    }
}
