//! `weft-proxy`, the sidecar that runs next to every meshed application.
//! docs/architecture.md draws its modules in the order data flows; in
//! short:
//!
//! - configuration from the control plane: the delta xDS client (`xds`),
//!   the compact resources it decodes, with their strings as `name::Name`
//!   (`resources`, `name`), and the immutable snapshot built from them
//!   (`state`); the workload identity and its rotation (`identity`,
//!   `trust`, `channel`);
//! - one module per traffic direction, none importing another:
//!   `outbound` (15001 and explicit mode, its HTTP in `outbound::l7`, an
//!   application's plain HTTP/1.1 read in `outbound::h1`),
//!   `inbound` (15008, from the mesh) and `inbound_passthrough` (15006,
//!   captured plaintext), `dns` (15053, the app's DNS), and in gateway
//!   mode `gateway` (15008 of an
//!   east-west gateway, forwarding to its network's sidecars);
//! - the leaves they share: delivery to the app behind this sidecar
//!   (`local_app`), the mesh connection pool (`pool`, the client half of
//!   15008) and its HTTP/1.1 links (`h1_link`, served by `inbound_h1`,
//!   framed by `h1_codec`, answers written by `h1_answer`), networks and their gateways (`network`), endpoint choice (`balance`, `outlier`), protocol detection
//!   (`sniff`), upgrades (`upgrade`), clients to fixed addresses
//!   (`upstream`), HTTP pieces (`http`), socket facts (`socket`), the
//!   accept loop (`serve`), graceful drain (`drain`), write coalescing
//!   (`coalesce`), pass-through I/O for stream wrappers (`through`) and
//!   task spawning (`task`);
//! - the sidecar's own ports and process: metrics and admin (`metrics`,
//!   `admin`, `usage`), the app's probes (`app_probe`), memory after
//!   bursts (`memory`), logs (`logs`), the capture rules for the init
//!   container (`iptables`), the command line (`command_line`), and the
//!   assembly of it all (`sidecar`).
//!
//! It never depends on the control plane crate; the two meet only on the
//! wire protocols of `weft-xds-proto`. docs/proxy.md describes it for
//! operators.

pub mod access_log;
pub mod admin;
pub mod app_probe;
pub mod authorization;
pub mod authorize;
pub mod balance;
pub mod channel;
pub mod chunked;
pub mod coalesce;
pub mod command_line;
pub mod dns;
pub mod drain;
pub mod gateway;
pub mod h1_answer;
pub mod h1_codec;
pub mod h1_link;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod inbound_h1;
pub mod inbound_passthrough;
pub mod iptables;
pub mod link;
pub mod local_app;
pub mod logs;
pub mod memory;
pub mod metrics;
pub mod name;
pub mod network;
pub mod outbound;
pub mod outlier;
pub mod pool;
pub mod resources;
pub mod routes;
pub mod serve;
pub mod sidecar;
pub mod sniff;
pub mod socket;
pub mod splice;
pub mod state;
pub mod task;
mod through;
pub mod trace_context;
pub mod trust;
pub mod upgrade;
pub mod upstream;
pub mod usage;
pub mod xds;
