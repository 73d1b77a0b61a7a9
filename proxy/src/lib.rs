//! `weft-proxy`, the sidecar that runs next to every meshed application. It
//! owns the workload identity and its rotation (`identity`), the delta xDS
//! client, the compact resources it decodes (with their strings as
//! `name::Name`) and the immutable snapshot built from them (`xds`,
//! `resources`, `state`), the mesh transport between sidecars (`hbone`,
//! `coalesce`), endpoint choice (`balance`, `outlier`), the outbound listener
//! (`outbound`), protocol detection (`sniff`), HTTP routing (`l7`, `http`,
//! `upstream`, `upgrade`), inbound capture (`inbound`), metrics and the admin
//! ports (`metrics`, `admin`, `usage`), graceful drain (`drain`), spawning
//! tasks (`task`), returning memory after bursts (`memory`), the capture rules
//! for the init container (`iptables`), and their assembly (`sidecar`). It
//! never depends on the control plane crate; the two meet only on the wire
//! protocols of `weft-xds-proto`. docs/proxy.md describes it for operators.

pub mod admin;
pub mod app_probe;
pub mod balance;
pub mod channel;
pub mod coalesce;
pub mod command_line;
pub mod drain;
pub mod hbone;
pub mod http;
pub mod identity;
pub mod inbound;
pub mod inbound_tunnel;
pub mod iptables;
pub mod l7;
pub mod logs;
pub mod memory;
pub mod metrics;
pub mod name;
pub mod outbound;
pub mod outlier;
pub mod resources;
pub mod sidecar;
pub mod sniff;
pub mod state;
pub mod task;
pub mod trust;
pub mod upgrade;
pub mod upstream;
pub mod usage;
pub mod xds;
