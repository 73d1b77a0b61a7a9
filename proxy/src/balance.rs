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

use crate::outlier::Outliers;
use crate::resources::{Name, Workload};

/// Where this proxy runs.
#[derive(Clone, Debug, Default)]
pub struct Here {
    pub cluster: Name,
    pub region: Name,
    pub zone: Name,
}

impl Here {
    pub fn new(cluster: &str, region: &str, zone: &str) -> Self {
        Here {
            cluster: cluster.into(),
            region: region.into(),
            zone: zone.into(),
        }
    }

    /// Where a workload runs.
    pub fn of(workload: &Workload) -> Self {
        let profile = &workload.profile;
        Here {
            cluster: profile.cluster_id.clone(),
            region: profile.locality.region.clone(),
            zone: profile.locality.zone.clone(),
        }
    }
}

fn tier(here: &Here, workload: &Workload) -> u8 {
    let profile = &workload.profile;
    if profile.cluster_id == here.cluster && profile.locality.zone == here.zone {
        0
    } else if !here.region.is_empty() && profile.locality.region == here.region {
        1
    } else {
        2
    }
}

/// Outstanding connections per workload, shared by every request path,
/// and the outlier state that takes failing endpoints out of rotation.
#[derive(Default)]
pub struct Load {
    outstanding: Mutex<HashMap<Name, Arc<AtomicUsize>>>,
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
    fn counter(&self, uid: &Name) -> Arc<AtomicUsize> {
        let mut map = self.outstanding.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(counter) = map.get(uid) {
            return counter.clone();
        }
        // Endpoints come and go: forget idle counters of old ones before
        // the map outgrows the mesh.
        if map.len() >= 4096 {
            map.retain(|_, c| Arc::strong_count(c) > 1);
        }
        map.entry(uid.clone()).or_default().clone()
    }

    pub fn outstanding(&self, uid: &str) -> usize {
        let map = self.outstanding.lock().unwrap_or_else(|p| p.into_inner());
        map.get(uid).map_or(0, |c| c.load(Ordering::Relaxed))
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
        candidates: impl Iterator<Item = &'a Arc<Workload>>,
        excluded: &[Name],
    ) -> Option<(Arc<Workload>, InFlight)> {
        let mut healthy: Vec<&Arc<Workload>> = candidates.filter(|w| w.healthy).collect();
        let ejected = self.outliers.ejected_among(healthy.iter().map(|w| &*w.uid));
        if !ejected.is_empty() || !excluded.is_empty() {
            let usable = |w: &&Arc<Workload>| {
                !ejected.contains(&&*w.uid) && !excluded.iter().any(|e| *e == w.uid)
            };
            if healthy.iter().any(usable) {
                let keep: Vec<&Arc<Workload>> = healthy.iter().copied().filter(usable).collect();
                healthy = keep;
            }
        }
        // Stale clusters only when nothing fresh is healthy.
        if healthy.iter().any(|w| !w.stale) {
            healthy.retain(|w| !w.stale);
        }
        let best_tier = healthy.iter().map(|w| tier(here, w)).min()?;
        healthy.retain(|w| tier(here, w) == best_tier);
        let pick = match healthy.len() {
            0 => return None,
            1 => healthy[0],
            n => {
                let a = healthy[rand::random_range(0..n)];
                let b = healthy[rand::random_range(0..n)];
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
    use crate::resources::fixtures::workload_message;
    use crate::resources::{Interner, fixtures};

    fn w(uid: &str, cluster: &str, zone: &str, healthy: bool, stale: bool) -> Arc<Workload> {
        let mut m = workload_message(uid, [10, 0, 0, 1]);
        m.cluster_id = cluster.into();
        if let Some(l) = m.locality.as_mut() {
            l.zone = zone.into();
        }
        m.status = if healthy { 0 } else { 1 };
        m.stale = stale;
        Arc::new(fixtures::workload(m, &mut Interner::default()))
    }

    fn here() -> Here {
        Here::new("c1", "eu", "a")
    }

    fn pick(load: &Load, set: &[Arc<Workload>]) -> Option<String> {
        load.choose(&here(), set.iter(), &[])
            .map(|(w, _)| w.uid.to_string())
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
        let mut far = workload_message("far", [10, 0, 0, 2]);
        far.cluster_id = "c3".into();
        far.locality = Some(weft_xds_proto::mesh::Locality {
            region: "us".into(),
            ..Default::default()
        });
        let far = Arc::new(fixtures::workload(far, &mut Interner::default()));
        assert_eq!(
            pick(&load, &[far.clone(), region.clone()]).unwrap(),
            "region"
        );
        assert_eq!(pick(&load, &[far]).unwrap(), "far");
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
                    .map(|(w, _)| w.uid.to_string())
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
        let retry = load.choose(&here(), both.iter(), &[Name::from("local")]);
        assert_eq!(&*retry.unwrap().0.uid, "remote", "a retry goes elsewhere");
        for _ in 0..load.outliers.policy.consecutive_failures {
            load.outliers.failure("local");
        }
        assert_eq!(pick(&load, &both).unwrap(), "remote", "ejected: failover");
        // Alone, an ejected endpoint is still better than nothing.
        assert_eq!(pick(&load, &[local]).unwrap(), "local");
    }
}
