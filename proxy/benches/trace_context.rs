//! What the trace headers cost each request, at each sidecar: a request
//! that arrives with a `traceparent` and an `x-request-id` (continued), and
//! one that has neither (a trace and an id made here), as
//! `trace_context::on_request` handles them; the allocations each makes
//! are counted by the allocator.
//!
//! `cargo bench -p weft-proxy --bench trace_context`

use std::sync::atomic::Ordering;
use std::time::Instant;

use http::{HeaderMap, HeaderValue};
use weft_proxy::trace_context::on_request;

#[path = "support/counting.rs"]
mod counting;
use counting::ALLOCATIONS;

/// Time and allocations of `rounds` calls of `f`.
fn timed<T>(rounds: u32, f: impl Fn() -> T) -> (std::time::Duration, u64) {
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let started = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(f());
    }
    (
        started.elapsed(),
        (ALLOCATIONS.load(Ordering::Relaxed) - before) as u64,
    )
}

fn measure(what: &str, headers: &HeaderMap) {
    let run = || {
        let mut copy = headers.clone();
        std::hint::black_box(on_request(&mut copy));
    };
    for _ in 0..10_000 {
        run();
    }
    // The header map's own clone, measured alone, is taken off.
    let clone_only = || std::hint::black_box(headers.clone());
    let rounds = 500_000u32;
    let (time, allocations) = timed(rounds, run);
    let (base_time, base_allocations) = timed(rounds, clone_only);
    println!(
        "trace headers, {what}: {:.0} ns and {:.1} allocations per request (mean of {rounds}, a header map's clone taken off)",
        (time.as_nanos() as f64 - base_time.as_nanos() as f64) / f64::from(rounds),
        (allocations as f64 - base_allocations as f64) / f64::from(rounds),
    );
}

fn main() {
    let mut continued = HeaderMap::new();
    continued.insert(
        "traceparent",
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    continued.insert(
        "x-request-id",
        HeaderValue::from_static("b7ad6b71-6e2f-4d6c-9b3e-2f6a1e5d8c90"),
    );
    continued.insert("user-agent", HeaderValue::from_static("weft-perf"));
    measure("continued", &continued);
    let mut fresh = HeaderMap::new();
    fresh.insert("user-agent", HeaderValue::from_static("weft-perf"));
    measure("started here", &fresh);
}
