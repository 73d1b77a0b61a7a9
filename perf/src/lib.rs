//! `weft-perf`, weft's load generator and benchmark scenarios.
//!
//! It owns the open- and closed-loop load generator (HTTP/1.1, HTTP/2, gRPC,
//! TCP) with HDR latency histograms, the scenario runner that compares weft
//! with direct traffic and with other proxies in one run, the control-plane
//! scale scenario, and the Markdown and SVG reports under `perf/results/`.
//! Nothing is implemented here yet.
