//! End-to-end tests across weft's crates, and checks on the workspace's
//! structure.
//!
//! Unit tests live beside their code; this crate holds the tests that need
//! several crates at once (`tests/mesh.rs`): lab clusters with a real control
//! plane and the proxy's control-plane side. They are gathered into one
//! binary because each links the whole workspace. `modules` reads the
//! source of every crate and fails on modules that import each other in a
//! circle.

pub mod modules;
