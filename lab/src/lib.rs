//! `weft-lab`, a multi-cluster Kubernetes stand-in on one machine.
//!
//! It owns what the demo, the end-to-end tests and the benchmarks need to run
//! several clusters without Docker: per-pod network namespaces, the pod
//! runner, the topology that ties clusters together and the traffic the
//! demo sends, on the Kubernetes-API-compatible server of `weft-apiserver`
//! (re-exported as `apiserver`). It is a development tool and never part
//! of a production install.

pub use weft_apiserver as apiserver;
pub mod apply;
pub mod dns;
pub mod endpoints;
pub mod lab;
pub mod load_balancer;
pub mod mesh;
pub mod netns;
pub mod runner;
pub mod traffic;

pub use apiserver::{ApiServer, ApiServerConfig, LabError};
