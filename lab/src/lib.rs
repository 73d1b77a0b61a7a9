//! `weft-lab`, a multi-cluster Kubernetes stand-in on one machine.
//!
//! It owns what the demo, the end-to-end tests and the benchmarks need to run
//! several clusters without Docker. Today that is the Kubernetes-API-compatible
//! API server (`apiserver`); per-pod network namespaces, the pod runner and
//! the topology that ties clusters together come next. It is a development
//! tool and never part of a production install.

pub mod apiserver;
pub mod apply;
pub mod endpoints;
pub mod lab;
pub mod mesh;
pub mod netns;
pub mod runner;
pub mod traffic;

pub use apiserver::{ApiServer, ApiServerConfig, LabError};
