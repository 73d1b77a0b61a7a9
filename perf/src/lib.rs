//! `weft-perf`, weft's benchmark scenarios and their reports.
//!
//! It owns the scenarios that measure weft's components and the Markdown
//! reports under `perf/results/`, each with the machine, the commit and the
//! command that produced it. Today it has the lab API server scenario
//! (`weft-perf apiserver`); the load generator and the proxy and control
//! plane scenarios come with those components.

pub mod apiserver;
pub mod report;
