//! Outlier detection: an endpoint that fails several times in a row
//! (connect failures, or 5xx answers) is ejected from balancing for an
//! interval that grows with each ejection. Ejection never takes out more
//! than a configured share of a service's endpoints: past that, the
//! failures are more likely ours or the network's than the endpoints', and
//! ejecting them all would turn a partial outage into a total one.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// Failures in a row that eject an endpoint.
    pub consecutive_failures: u32,
    /// The first ejection's length; the n-th lasts n times as long.
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// The largest share of a service's endpoints ejected at once.
    pub max_ejected_share: f64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_share: 0.5,
        }
    }
}

#[derive(Clone, Debug, Default)]
struct Health {
    consecutive: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

/// What `/clusters` shows of an endpoint.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EndpointHealth {
    pub consecutive_failures: u32,
    pub ejections: u32,
    /// Seconds of ejection left; absent when the endpoint is in rotation.
    pub ejected_for_seconds: Option<f64>,
}

#[derive(Default)]
pub struct Outliers {
    pub policy: Policy,
    endpoints: Mutex<HashMap<String, Health>>,
    pub ejections_total: AtomicU64,
}

impl Outliers {
    pub fn new(policy: Policy) -> Self {
        Outliers {
            policy,
            ..Default::default()
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, Health>) -> T) -> T {
        f(&mut self.endpoints.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn success(&self, uid: &str) {
        self.with(|map| {
            if let Some(health) = map.get_mut(uid) {
                health.consecutive = 0;
                // A long healthy stretch forgets earlier ejections.
                if health
                    .ejected_until
                    .is_some_and(|until| until + self.policy.max_ejection < Instant::now())
                {
                    health.ejections = 0;
                    health.ejected_until = None;
                }
            }
        })
    }

    /// Counts a failure; true when it ejected the endpoint.
    pub fn failure(&self, uid: &str) -> bool {
        self.failure_under(uid, None)
    }

    /// Counts a failure under a destination's own policy.
    pub fn failure_under(&self, uid: &str, policy: Option<&Policy>) -> bool {
        let policy = policy.unwrap_or(&self.policy);
        let now = Instant::now();
        let ejected = self.with(|map| {
            let health = map.entry(uid.to_string()).or_default();
            health.consecutive += 1;
            let already = health.ejected_until.is_some_and(|until| until > now);
            if already || health.consecutive < policy.consecutive_failures {
                return false;
            }
            health.ejections += 1;
            health.consecutive = 0;
            let length = (policy.base_ejection * health.ejections).min(policy.max_ejection);
            health.ejected_until = Some(now + length);
            true
        });
        if ejected {
            self.ejections_total.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(endpoint = uid, "ejected after consecutive failures");
        }
        ejected
    }

    pub fn is_ejected(&self, uid: &str, now: Instant) -> bool {
        self.with(|map| {
            map.get(uid)
                .and_then(|h| h.ejected_until)
                .is_some_and(|until| until > now)
        })
    }

    /// The subset of `members` to leave out of balancing: the ejected ones,
    /// unless that would exceed the allowed share.
    pub fn ejected_among<'a>(&self, members: impl Iterator<Item = &'a str>) -> Vec<&'a str> {
        self.ejected_among_with(members, None)
    }

    /// `ejected_among` with a destination's own largest share.
    pub fn ejected_among_with<'a>(
        &self,
        members: impl Iterator<Item = &'a str>,
        max_ejected_share: Option<f64>,
    ) -> Vec<&'a str> {
        let now = Instant::now();
        let mut total = 0usize;
        let ejected: Vec<&str> = self.with(|map| {
            if map.is_empty() {
                return Vec::new();
            }
            members
                .inspect(|_| total += 1)
                .filter(|uid| {
                    map.get(*uid)
                        .and_then(|h| h.ejected_until)
                        .is_some_and(|until| until > now)
                })
                .collect()
        });
        let share = max_ejected_share.unwrap_or(self.policy.max_ejected_share);
        if ejected.len() as f64 > share * total as f64 {
            Vec::new()
        } else {
            ejected
        }
    }

    pub fn health(&self, uid: &str) -> EndpointHealth {
        let now = Instant::now();
        self.with(|map| {
            let health = map.get(uid).cloned().unwrap_or_default();
            EndpointHealth {
                consecutive_failures: health.consecutive,
                ejections: health.ejections,
                ejected_for_seconds: health
                    .ejected_until
                    .filter(|until| *until > now)
                    .map(|until| (until - now).as_secs_f64()),
            }
        })
    }

    /// Forgets endpoints that left the mesh.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.with(|map| map.retain(|uid, _| keep(uid)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> Outliers {
        Outliers::new(Policy {
            consecutive_failures: 3,
            base_ejection: Duration::from_millis(200),
            max_ejection: Duration::from_secs(1),
            max_ejected_share: 0.5,
        })
    }

    #[test]
    fn consecutive_failures_eject_for_a_growing_interval() {
        let outliers = quick();
        assert!(!outliers.failure("a"));
        outliers.success("a");
        assert!(!outliers.failure("a"));
        assert!(!outliers.failure("a"));
        assert!(
            !outliers.is_ejected("a", Instant::now()),
            "a success reset the count"
        );
        assert!(outliers.failure("a"), "third in a row");
        assert!(outliers.is_ejected("a", Instant::now()));
        let first = outliers.health("a").ejected_for_seconds.unwrap();
        assert!(first <= 0.2, "{first}");
        std::thread::sleep(Duration::from_millis(250));
        assert!(
            !outliers.is_ejected("a", Instant::now()),
            "back after the interval"
        );
        for _ in 0..3 {
            outliers.failure("a");
        }
        let second = outliers.health("a").ejected_for_seconds.unwrap();
        assert!(second > 0.3, "the second ejection lasts longer: {second}");
        assert_eq!(outliers.ejections_total.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn never_more_than_the_allowed_share() {
        let outliers = quick();
        for _ in 0..3 {
            outliers.failure("a");
            outliers.failure("b");
        }
        // Two of two ejected is 100% > 50%: nobody is left out.
        assert!(outliers.ejected_among(["a", "b"].into_iter()).is_empty());
        // One of two and one of three are within the share.
        assert_eq!(outliers.ejected_among(["a", "c"].into_iter()), vec!["a"]);
        assert_eq!(
            outliers.ejected_among(["a", "c", "d"].into_iter()),
            vec!["a"]
        );
    }
}
