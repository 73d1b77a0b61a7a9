//! End-to-end tests across weft's crates.
//!
//! Unit tests live beside their code; this crate holds the tests that need
//! several crates at once, such as two lab clusters with real control planes
//! and proxies. The tests are gathered into few binaries because each one
//! links the whole workspace. Nothing is here yet.
