//! When a control plane starts answering proxies. One that just started
//! has not listed its clusters yet: answering then would tell reconnecting
//! proxies to remove everything it has not seen so far, so proxies keep
//! serving their last snapshot while they wait. Ready is not enough
//! either: the tables are computed at the next flush, after the debounce,
//! so the gate also waits until what the clusters said is in them, or
//! until the longest debounce (plus a margin for the flush) has passed
//! since it became ready, for a model that never settles.

use std::time::{Duration, Instant};

use crate::hub::Debounce;

/// Slack after the longest debounce for the flush itself.
const FLUSH_MARGIN: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug)]
pub struct Gate {
    /// How long a remote cluster may take to sync before it is waited for
    /// no more.
    pub remote_timeout: Duration,
    /// How long a ready model may take to settle.
    pub settle: Duration,
}

impl Gate {
    pub fn new(remote_timeout: Duration, debounce: &Debounce) -> Self {
        Gate {
            remote_timeout,
            settle: debounce.max_delay + FLUSH_MARGIN,
        }
    }

    /// Whether to open, given whether the model is `ready` and `clean` (no
    /// change waiting for a flush) at `now`. `ready_since` is the gate's
    /// memory between looks: when the model became ready.
    pub fn opens(
        &self,
        ready: bool,
        clean: bool,
        ready_since: &mut Option<Instant>,
        now: Instant,
    ) -> bool {
        if !ready {
            *ready_since = None;
            return false;
        }
        let since = *ready_since.get_or_insert(now);
        clean || now.duration_since(since) > self.settle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_waits_for_ready_then_for_a_settled_model_or_the_longest_debounce() {
        let slow = Debounce {
            quiet: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
        };
        let gate = Gate::new(Duration::from_secs(30), &slow);
        assert_eq!(gate.settle, Duration::from_secs(31));
        let start = Instant::now();
        let mut since = None;
        let at = |s: u64| start + Duration::from_secs(s);
        assert!(!gate.opens(false, true, &mut since, at(0)), "not ready");
        assert!(
            !gate.opens(true, false, &mut since, at(1)),
            "ready, unsettled"
        );
        // Past the old hard-coded 11 s, but not past this debounce.
        assert!(!gate.opens(true, false, &mut since, at(13)));
        assert!(
            gate.opens(true, false, &mut since, at(33)),
            "waited long enough"
        );
        // Readiness lost starts the wait again.
        assert!(!gate.opens(false, false, &mut since, at(34)));
        assert!(!gate.opens(true, false, &mut since, at(35)));
        assert!(
            gate.opens(true, true, &mut since, at(35)),
            "settled opens at once"
        );
        let default = Gate::new(Duration::from_secs(30), &Debounce::default());
        assert_eq!(
            default.settle,
            Duration::from_secs(11),
            "as before, by default"
        );
    }
}
