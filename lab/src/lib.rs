//! `weft-lab`, a multi-cluster Kubernetes stand-in on one machine.
//!
//! It owns what the demo, the end-to-end tests and the benchmarks need to run
//! several clusters without Docker: a Kubernetes-API-compatible in-memory API
//! server, per-pod network namespaces on a bridge per cluster, a minimal pod
//! runner, and the topology that ties them together. It is a development tool
//! and never part of a production install. Nothing is implemented here yet.
