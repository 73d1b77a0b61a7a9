//! Giving memory back. The allocator keeps what a burst of connections
//! freed (their buffers) for reuse, and the kernel keeps every stack page
//! once touched: a sidecar that served one burst, or started up once,
//! would hold that memory for the rest of its life. After start-up, after
//! a burst ends and after large configuration updates, free pages go back
//! to the system.

use std::time::Duration;

use crate::drain::Drain;

/// Returns free heap pages, and the stack's below the caller, to the
/// system.
pub fn release_free() {
    release_free_heap();
    match release_stack() {
        Ok(bytes) => tracing::trace!(bytes, "unused stack given back"),
        Err(err) => tracing::debug!("unused stack kept: {err}"),
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_heap() {
    // SAFETY: malloc_trim only returns unused heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_heap() {}

/// Unmaps this process's pages of its own executable code (and of the
/// read-only data at the start of the file), so that only what runs again
/// is mapped again.
///
/// The kernel maps a file's pages 64 KiB around each page fault (fault
/// around), and start-up touches nearly every 64 KiB of the code. Called
/// once start-up is over, this leaves out of the resident set the windows
/// that only start-up ran: 0.4 MiB in the short bench, nearly nothing for
/// a sidecar whose traffic reaches most of its paths (the full bench),
/// since each 64 KiB window holds something that runs again. The pages stay in the
/// page cache, shared with every other sidecar on the node: a page that
/// runs again is a minor fault, no I/O. Only private mappings of the
/// executable file that are never written are touched, so the file holds
/// exactly what was mapped: the code, and the read-only segment at the
/// file's start (headers, constants, unwind tables). Relocated data is in
/// writable or RELRO mappings, which are left alone.
#[cfg(target_os = "linux")]
pub fn release_code() -> std::io::Result<usize> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut released = 0;
    for (start, end) in never_written_mappings(&maps, &exe.to_string_lossy()) {
        // SAFETY: the range is a whole private mapping of the executable
        // file that was never written; dropping its pages only makes the
        // next use fault them back in from the page cache.
        released += unsafe { drop_pages(start, end) };
    }
    Ok(released)
}

/// Drops the pages of `start..end` from this process (`MADV_DONTNEED`):
/// the bytes dropped, 0 if the kernel refused.
///
/// # Safety
///
/// Nothing in the range may be in use: a private file mapping's pages
/// come back from the file, an anonymous mapping's come back zero-filled.
#[cfg(target_os = "linux")]
unsafe fn drop_pages(start: usize, end: usize) -> usize {
    // SAFETY: the caller vouches for the range.
    let done =
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    if done == 0 { end - start } else { 0 }
}

#[cfg(not(target_os = "linux"))]
pub fn release_code() -> std::io::Result<usize> {
    Ok(0)
}

/// What is kept of the stack below the caller's frame: the frames of the
/// calls this one makes, and the 128-byte red zone below the stack
/// pointer that leaf functions use without moving it.
const STACK_MARGIN: usize = 16 << 10;

/// Gives back the pages of the main thread's stack below this frame. The
/// kernel keeps every stack page a process once touched, and start-up and
/// bursts of new connections (futures built on the stack before they are
/// boxed) reach 140 KiB deep in the bench, where a task's poll between
/// them reaches about 36 KiB. Memory below the stack pointer holds nothing
/// live; a page used again is a fresh zero page. Does nothing on another
/// thread (a multi-thread runtime's workers have stacks of their own).
/// Never inlined, so that the margin is measured from a frame of its own.
#[cfg(target_os = "linux")]
#[inline(never)]
fn release_stack() -> std::io::Result<usize> {
    let here = 0u8;
    let sp = std::hint::black_box(&here) as *const u8 as usize;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let Some((start, end)) = unused_stack(&maps, sp, STACK_MARGIN) else {
        return Ok(0);
    };
    // SAFETY: the range lies in the main thread's stack mapping, below
    // this frame by more than any call from here uses: nothing in it is
    // live, and a page touched again comes back zero-filled.
    Ok(unsafe { drop_pages(start, end) })
}

#[cfg(not(target_os = "linux"))]
fn release_stack() -> std::io::Result<usize> {
    Ok(0)
}

/// The page-aligned range of the `[stack]` mapping that lies more than
/// `margin` below `sp`, if `sp` is in that mapping (the main thread).
fn unused_stack(maps: &str, sp: usize, margin: usize) -> Option<(usize, usize)> {
    const PAGE: usize = 4096;
    let line = maps.lines().find(|l| l.ends_with("[stack]"))?;
    let (start, end) = line.split_ascii_whitespace().next()?.split_once('-')?;
    let start = usize::from_str_radix(start, 16).ok()?;
    let end = usize::from_str_radix(end, 16).ok()?;
    if !(start..end).contains(&sp) {
        return None;
    }
    let top = sp.checked_sub(margin)? & !(PAGE - 1);
    (top > start).then_some((start, top))
}

/// The (start, end) of each private mapping of `exe` that is never
/// written, in a `/proc/<pid>/maps` text.
fn never_written_mappings<'a>(
    maps: &'a str,
    exe: &'a str,
) -> impl Iterator<Item = (usize, usize)> + 'a {
    maps.lines().filter_map(move |line| {
        let mut fields = line.split_ascii_whitespace();
        let range = fields.next()?;
        let perms = fields.next()?;
        let offset = fields.next()?;
        let path = fields.nth(2)?;
        // The code, and the read-only segment at the file's start (its
        // headers and constant data): neither is ever written. Other
        // read-only mappings can be RELRO, written by relocation first.
        let never_written =
            perms == "r-xp" || (perms == "r--p" && offset.bytes().all(|b| b == b'0'));
        if !never_written || path != exe {
            return None;
        }
        let (start, end) = range.split_once('-')?;
        Some((
            usize::from_str_radix(start, 16).ok()?,
            usize::from_str_radix(end, 16).ok()?,
        ))
    })
}

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

    #[test]
    fn only_the_executables_never_written_mappings_are_chosen() {
        let maps = "\
5600000000-5600159000 r--p 00000000 fd:00 42 /usr/bin/weft-proxy
560015a000-56006a3000 r-xp 00159000 fd:00 42 /usr/bin/weft-proxy
56006a3000-56006ce000 r--p 006a1000 fd:00 42 /usr/bin/weft-proxy
56006ce000-56006d5000 rw-p 006cb000 fd:00 42 /usr/bin/weft-proxy
7f0000000000-7f0000021000 rw-p 00000000 00:00 0
7f0000100000-7f0000200000 r-xp 00000000 fd:00 43 /usr/bin/weft-proxy-old
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
";
        let found: Vec<_> = never_written_mappings(maps, "/usr/bin/weft-proxy").collect();
        // The read-only start of the file and the code; not the RELRO
        // mapping (read-only now, written by relocation at start).
        assert_eq!(
            found,
            vec![(0x5600000000, 0x5600159000), (0x560015a000, 0x56006a3000)]
        );
    }

    #[test]
    fn only_the_main_stack_below_the_margin_is_unused() {
        let maps = "\
5600000000-5600159000 r--p 00000000 fd:00 42 /usr/bin/weft-proxy
7f0000000000-7f0000021000 rw-p 00000000 00:00 0
7ffc00000000-7ffc00030000 rw-p 00000000 00:00 0                          [stack]
7ffd00000000-7ffd00002000 r-xp 00000000 00:00 0 [vdso]
";
        let sp = 0x7ffc_0002_8abc;
        // Pages from the mapping's start up to 16 KiB below the frame,
        // rounded down to a page: nothing at or above that is touched.
        assert_eq!(
            unused_stack(maps, sp, 16 << 10),
            Some((0x7ffc_0000_0000, 0x7ffc_0002_4000))
        );
        // A frame near the bottom leaves nothing to give back.
        assert_eq!(unused_stack(maps, 0x7ffc_0000_2000, 16 << 10), None);
        // Another thread's stack is not the `[stack]` mapping.
        assert_eq!(unused_stack(maps, 0x7f00_0000_1000, 16 << 10), None);
        assert_eq!(unused_stack("", sp, 16 << 10), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_test_thread_gives_back_no_stack() {
        // Tests run on threads of their own, whose stacks are not the
        // main thread's mapping.
        assert_eq!(release_stack().unwrap(), 0);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn code_is_unmapped_and_comes_back_as_it_runs() {
        let released = release_code().unwrap();
        assert!(released > 0, "no code mapping found");
        // Still runs: what this test calls is mapped again on use.
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
