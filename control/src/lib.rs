//! `weft-control`, the per-cluster control plane.
//!
//! One instance runs in every cluster of a multi-primary mesh. It owns the
//! Kubernetes watchers on the local API server and on every remote API server
//! registered through a kubeconfig Secret, the merged mesh model built from
//! them, the delta xDS server that pushes `Service` and `Workload` resources to
//! proxies, the CA service that signs workload certificates, and the sidecar
//! injection webhook. It never depends on the proxy crate; the two meet only on
//! the wire protocols of `weft-xds-proto`. Nothing is implemented here yet.
