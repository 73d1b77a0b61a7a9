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

/// The heap as the allocator sees it: bytes in live allocations, and bytes
/// in the free chunks it keeps for reuse (whole free pages inside them may
/// already be back with the system, after `release_free`). A growing
/// `in_use` is live data (or a leak); a resident size well above `in_use`
/// is fragmentation.
#[derive(Clone, Copy, Debug)]
pub struct Heap {
    pub in_use: u64,
    pub free: u64,
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn heap() -> Option<Heap> {
    // SAFETY: mallinfo2 only reads the allocator's counters.
    let info = unsafe { libc::mallinfo2() };
    Some(Heap {
        // Small allocations in arenas, plus large ones mapped on their own.
        in_use: (info.uordblks + info.hblkhd) as u64,
        free: info.fordblks as u64,
    })
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn heap() -> Option<Heap> {
    None
}

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

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn the_heap_reading_follows_allocations() {
        let before = heap().unwrap();
        // Many small allocations, as the snapshot makes: kept in the arena,
        // not mapped on their own. Other tests allocate in parallel, hence
        // the margin.
        let held: Vec<Box<[u8; 64]>> = (0..100_000).map(|_| Box::new([1u8; 64])).collect();
        let during = heap().unwrap();
        assert!(
            during.in_use >= before.in_use + 5_000_000,
            "{before:?} -> {during:?}"
        );
        drop(held);
        let after = heap().unwrap();
        assert!(
            after.in_use + 5_000_000 <= during.in_use,
            "{during:?} -> {after:?}"
        );
    }
}
