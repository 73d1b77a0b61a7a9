//! Choosing an endpoint for a service: locality first, then load.
//!
//! Tiers, tried in order: same cluster and zone, same region, anywhere
//! (the service's affinity may put every cluster in one tier, or other
//! clusters first). A tier is used when it has a healthy, fresh endpoint;
//! workloads of a stale (unreachable) cluster are used only when nothing
//! fresh is healthy, and those of a draining cluster only when nothing
//! else is.
//! Within a tier, the power of two choices on outstanding connections:
//! two picked at random, the less busy one wins.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use crate::outlier::Outliers;
use crate::resources::{Name, Workload};
use crate::routes::{Locality, Simple};
pub use weft_xds_proto::mesh::Affinity;

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
        2
    } else {
        4
    }
}

/// How to choose among endpoints, from the destination's policy.
#[derive(Clone, Copy, Default)]
pub struct Choice<'a> {
    pub simple: Simple,
    /// A consistent-hash key: the same key picks the same endpoint while
    /// the set of endpoints stays the same (rendezvous hashing: when one
    /// goes, only its keys move).
    pub hash: Option<u64>,
    pub locality: Option<&'a Locality>,
    /// The caller's labels, for failoverPriority.
    pub caller: Option<&'a Workload>,
    /// The service's affinity (`weft.io/affinity`), when no locality
    /// policy says otherwise.
    pub affinity: Affinity,
}

/// The tier of `workload` under a locality policy: failoverPriority's
/// labels first (more leading labels shared with the caller is better),
/// then the usual tiers, with a failover target region just after the
/// caller's own region.
fn tier_under(here: &Here, choice: &Choice, workload: &Workload) -> u16 {
    let Some(locality) = choice.locality else {
        return match choice.affinity {
            Affinity::Local => tier(here, workload) as u16,
            // Every cluster alike: one tier, in proportion to endpoints.
            Affinity::None => 0,
            // Other clusters first, by locality among them; this one last.
            Affinity::Remote => {
                let own = workload.profile.cluster_id == here.cluster;
                tier(here, workload) as u16 + if own { 8 } else { 0 }
            }
        };
    };
    if locality.disabled {
        return 0;
    }
    let mut base = tier(here, workload) as u16;
    if base == 4
        && locality
            .failover
            .iter()
            .any(|(from, to)| **from == *here.region && **to == *workload.profile.locality.region)
    {
        base = 3;
    }
    if locality.failover_priority.is_empty() {
        return base;
    }
    let Some(caller) = choice.caller else {
        return base;
    };
    let shared = locality
        .failover_priority
        .iter()
        .take_while(|key| {
            let mine = crate::routes::label_of(key, caller);
            mine.is_some() && mine == crate::routes::label_of(key, workload)
        })
        .count();
    ((locality.failover_priority.len() - shared) as u16) * 8 + base
}

/// Whether a `distribute` pattern ("region/zone/subzone", "*" for any
/// part and for what follows) covers a workload's locality.
fn covers(pattern: &str, workload: &Workload) -> bool {
    let l = &workload.profile.locality;
    let mut parts = pattern.split('/');
    for own in [&*l.region, &*l.zone, &*l.subzone] {
        match parts.next() {
            None | Some("*") => return true,
            Some(p) if p == own => {}
            Some(_) => return false,
        }
    }
    true
}

fn here_covered(pattern: &str, here: &Here) -> bool {
    let mut parts = pattern.split('/');
    for own in [&*here.region, &*here.zone] {
        match parts.next() {
            None | Some("*") => return true,
            Some(p) if p == own => {}
            Some(_) => return false,
        }
    }
    true
}

fn mix(a: u64, b: u64) -> u64 {
    // SplitMix64's finalizer: a cheap, well-spread hash of two words.
    let mut z = a ^ b.rotate_left(32) ^ 0x9E37_79B9_7F4A_7C15;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A stable 64-bit hash of text (FNV-1a): the same in every proxy.
pub fn hash_text(text: &[u8]) -> u64 {
    text.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Outstanding connections per workload, shared by every request path,
/// and the outlier state that takes failing endpoints out of rotation.
#[derive(Default)]
pub struct Load {
    outstanding: Counters,
    /// Requests or connections in flight per destination host, for
    /// DestinationRule connection-pool limits.
    pools: Counters,
    pub outliers: Outliers,
    /// Round-robin position, shared: good enough spread for one sidecar.
    turn: AtomicUsize,
}

/// Counts one connection to a workload while it is alive.
pub struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

type Counters = Mutex<HashMap<Name, Arc<AtomicUsize>>>;

/// The counter of `key`, made on first use.
fn counter_in(counters: &Counters, key: &Name) -> Arc<AtomicUsize> {
    let mut map = counters.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(counter) = map.get(key) {
        return counter.clone();
    }
    // Endpoints and destinations come and go: forget idle counters of old
    // ones before the map outgrows the mesh.
    if map.len() >= 4096 {
        map.retain(|_, c| Arc::strong_count(c) > 1);
    }
    map.entry(key.clone()).or_default().clone()
}

impl Load {
    fn counter(&self, uid: &Name) -> Arc<AtomicUsize> {
        counter_in(&self.outstanding, uid)
    }

    /// Takes one of `max` places under `key` (a destination's connection
    /// pool), or none when all are taken.
    pub fn admit(&self, key: &Name, max: u32) -> Option<InFlight> {
        let counter = counter_in(&self.pools, key);
        if counter.fetch_add(1, Ordering::AcqRel) >= max as usize {
            counter.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(InFlight(counter))
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
        self.choose_with(here, candidates, excluded, &Choice::default(), None)
    }

    /// `choose` under a destination policy; `max_ejected_share` overrides
    /// the proxy's own outlier setting.
    pub fn choose_with<'a>(
        &self,
        here: &Here,
        candidates: impl Iterator<Item = &'a Arc<Workload>>,
        excluded: &[Name],
        choice: &Choice,
        max_ejected_share: Option<f64>,
    ) -> Option<(Arc<Workload>, InFlight)> {
        let mut healthy: Vec<&Arc<Workload>> = candidates.filter(|w| w.healthy).collect();
        let ejected = self
            .outliers
            .ejected_among_with(healthy.iter().map(|w| &*w.uid), max_ejected_share);
        if !ejected.is_empty() || !excluded.is_empty() {
            let usable = |w: &&Arc<Workload>| {
                !ejected.contains(&&*w.uid) && !excluded.iter().any(|e| *e == w.uid)
            };
            if healthy.iter().any(usable) {
                let keep: Vec<&Arc<Workload>> = healthy.iter().copied().filter(usable).collect();
                healthy = keep;
            }
        }
        // Stale clusters only when nothing fresh is healthy; draining
        // ones only when nothing else is.
        if healthy.iter().any(|w| !w.stale) {
            healthy.retain(|w| !w.stale);
        }
        if healthy.iter().any(|w| !w.draining) {
            healthy.retain(|w| !w.draining);
        }
        if let Some(share) = choice.locality.and_then(|l| {
            l.distribute
                .iter()
                .find(|(from, _)| here_covered(from, here))
                .map(|(_, to)| to)
        }) {
            // Istio's distribute: each locality gets its weight of the
            // traffic, spread over its endpoints; other tiers do not count.
            let weight = |w: &Workload| -> u64 {
                share.iter().find(|(pattern, _)| covers(pattern, w)).map_or(
                    0,
                    |(pattern, weight)| {
                        let members = healthy.iter().filter(|o| covers(pattern, o)).count().max(1);
                        u64::from(*weight) * 1_000_000 / members as u64
                    },
                )
            };
            let total: u64 = healthy.iter().map(|w| weight(w)).sum();
            if total > 0 {
                let mut at = rand::random_range(0..total);
                let pick = healthy.iter().copied().find(|w| {
                    let own = weight(w);
                    if at < own {
                        true
                    } else {
                        at -= own;
                        false
                    }
                })?;
                let counter = self.counter(&pick.uid);
                counter.fetch_add(1, Ordering::Relaxed);
                return Some((pick.clone(), InFlight(counter)));
            }
        }
        let best_tier = healthy.iter().map(|w| tier_under(here, choice, w)).min()?;
        healthy.retain(|w| tier_under(here, choice, w) == best_tier);
        let pick = match (healthy.len(), choice.hash, choice.simple) {
            (0, ..) => return None,
            (1, ..) => healthy[0],
            (_, Some(key), _) => healthy
                .iter()
                .copied()
                .max_by_key(|w| mix(key, hash_text(w.uid.as_bytes())))?,
            (n, None, Simple::Random) => healthy[rand::random_range(0..n)],
            (n, None, Simple::RoundRobin) => healthy[self.turn.fetch_add(1, Ordering::Relaxed) % n],
            (n, None, Simple::LeastRequest) => {
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
    fn a_draining_cluster_only_when_nothing_else_is_healthy() {
        let load = Load::default();
        let mut m = workload_message("draining", [10, 0, 0, 1]);
        m.cluster_id = "c1".into();
        m.draining = true;
        let draining = Arc::new(fixtures::workload(m, &mut Interner::default()));
        let far = w("far", "c2", "b", true, false);
        for _ in 0..20 {
            assert_eq!(
                pick(&load, &[draining.clone(), far.clone()]).unwrap(),
                "far"
            );
        }
        // Nothing fails for it: with no other endpoint it is still used.
        assert_eq!(
            pick(&load, std::slice::from_ref(&draining)).unwrap(),
            "draining"
        );
        let down = w("far", "c2", "b", false, false);
        assert_eq!(pick(&load, &[draining, down]).unwrap(), "draining");
    }

    #[test]
    fn affinity_none_spreads_by_endpoint_count_and_remote_prefers_other_clusters() {
        let load = Load::default();
        // Two endpoints here, one in each of two other clusters (2:1:1).
        let set = [
            w("c1-a", "c1", "a", true, false),
            w("c1-b", "c1", "a", true, false),
            w("c2-a", "c2", "b", true, false),
            w("c3-a", "c3", "c", true, false),
        ];
        let count = |affinity: Affinity, n: usize| {
            let choice = Choice {
                affinity,
                ..Choice::default()
            };
            let mut by_cluster = std::collections::BTreeMap::<String, usize>::new();
            for _ in 0..n {
                let (w, _) = load
                    .choose_with(&here(), set.iter(), &[], &choice, None)
                    .unwrap();
                *by_cluster
                    .entry(w.profile.cluster_id.to_string())
                    .or_default() += 1;
            }
            by_cluster
        };
        let local = count(Affinity::Local, 100);
        assert_eq!(local.get("c1"), Some(&100), "{local:?}");
        let none = count(Affinity::None, 4000);
        let share = |c: &str| *none.get(c).unwrap_or(&0) as f64 / 4000.0;
        assert!((share("c1") - 0.5).abs() < 0.04, "{none:?}");
        assert!((share("c2") - 0.25).abs() < 0.04, "{none:?}");
        assert!((share("c3") - 0.25).abs() < 0.04, "{none:?}");
        let remote = count(Affinity::Remote, 200);
        assert_eq!(remote.get("c1"), None, "{remote:?}");
        // Only this cluster's left: used rather than failing.
        let only_here = [set[0].clone()];
        let choice = Choice {
            affinity: Affinity::Remote,
            ..Choice::default()
        };
        assert!(
            load.choose_with(&here(), only_here.iter(), &[], &choice, None)
                .is_some()
        );
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

    #[test]
    fn a_hash_key_keeps_one_endpoint_and_keys_spread() {
        let load = Load::default();
        let set: Vec<Arc<Workload>> = (0..4)
            .map(|i| w(&format!("e{i}"), "c1", "a", true, false))
            .collect();
        let pick = |key: &str| {
            let choice = Choice {
                hash: Some(hash_text(key.as_bytes())),
                ..Choice::default()
            };
            load.choose_with(&here(), set.iter(), &[], &choice, None)
                .map(|(w, _)| w.uid.to_string())
                .unwrap()
        };
        let alice = pick("alice");
        assert!(
            (0..50).all(|_| pick("alice") == alice),
            "one key, one endpoint"
        );
        let used: std::collections::BTreeSet<String> =
            (0..64).map(|i| pick(&format!("user-{i}"))).collect();
        assert!(used.len() >= 3, "keys spread: {used:?}");
    }

    #[test]
    fn locality_failover_prefers_the_named_region_and_can_be_turned_off() {
        let load = Load::default();
        let mut us = workload_message("us", [10, 0, 0, 3]);
        us.cluster_id = "c3".into();
        us.locality = Some(weft_xds_proto::mesh::Locality {
            region: "us".into(),
            ..Default::default()
        });
        let mut ap = us.clone();
        ap.uid = "ap".into();
        ap.locality = Some(weft_xds_proto::mesh::Locality {
            region: "ap".into(),
            ..Default::default()
        });
        let names = &mut Interner::default();
        let us = Arc::new(fixtures::workload(us, names));
        let ap = Arc::new(fixtures::workload(ap, names));
        let failover = Locality {
            failover: Box::new([("eu".into(), "ap".into())]),
            ..Locality::default()
        };
        let choice = Choice {
            locality: Some(&failover),
            ..Choice::default()
        };
        for _ in 0..20 {
            let (picked, _) = load
                .choose_with(&here(), [us.clone(), ap.clone()].iter(), &[], &choice, None)
                .unwrap();
            assert_eq!(&*picked.uid, "ap");
        }
        let local = w("local", "c1", "a", true, false);
        let off = Locality {
            disabled: true,
            ..Locality::default()
        };
        let choice = Choice {
            locality: Some(&off),
            ..Choice::default()
        };
        let far: usize = (0..200)
            .filter(|_| {
                let (picked, _) = load
                    .choose_with(
                        &here(),
                        [local.clone(), us.clone()].iter(),
                        &[],
                        &choice,
                        None,
                    )
                    .unwrap();
                &*picked.uid == "us"
            })
            .count();
        assert!(far > 20, "locality off spreads: {far} of 200 far");
    }
}
