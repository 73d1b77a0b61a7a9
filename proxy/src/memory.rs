//! Giving memory back. The allocator keeps what a burst of connections
//! freed (their buffers) for reuse, and a sidecar that served one burst
//! would hold that memory for the rest of its life. After a burst ends,
//! and after large configuration updates, free pages go back to the
//! system.

use std::time::Duration;

use crate::drain::Drain;

/// Returns free heap pages to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn release_free() {
    // SAFETY: malloc_trim only returns unused heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn release_free() {}

/// Open connections that make a burst worth trimming after: below this,
/// what they freed is too little to matter.
const BURST: usize = 8;

/// Whether a burst just ended: the connection count has fallen to half
/// (or less) of its peak since the last release, and that peak was a burst.
fn burst_ended(peak: usize, open: usize) -> bool {
    peak >= BURST && open * 2 <= peak
}

/// Watches the open connections once a second; releases memory when a
/// burst has ended. One atomic read a second when nothing happens.
pub async fn release_after_bursts(drain: Drain) {
    let mut peak = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let open = drain.active();
        peak = peak.max(open);
        if burst_ended(peak, open) {
            release_free();
            peak = open;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_end_of_a_burst_releases() {
        assert!(!burst_ended(4, 0), "a few connections are no burst");
        assert!(!burst_ended(32, 20), "still busy");
        assert!(burst_ended(32, 16));
        assert!(burst_ended(32, 0));
    }
}
