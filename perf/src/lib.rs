//! `weft-perf`, weft's benchmark scenarios and their reports.
//!
//! It owns the scenarios that measure weft's components and the Markdown
//! reports under `perf/results/`, each with the machine, the commit and the
//! command that produced it. Today it has the lab API server scenario
//! (`weft-perf apiserver`) and the control plane scenario (`weft-perf
//! control`); the load generator and the proxy scenarios come with the proxy.

pub mod apiserver;
pub mod bench;
pub mod code_order;
pub mod control;
pub mod exchange;
pub mod floor;
pub mod load;
pub mod networks;
pub mod report;
pub mod sidecar;
pub mod svg;
pub mod targets;
pub mod tunnel;
