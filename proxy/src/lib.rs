//! `weft-proxy`, the sidecar that runs next to every meshed application.
//!
//! It owns the delta xDS client and the immutable config snapshot built from
//! it (`xds`, `state`), the workload identity and its rotation (`identity`),
//! and, to come, the outbound (15001) and inbound (15006, 15008) listeners,
//! L4 and L7 forwarding, load balancing across clusters, the admin and
//! metrics endpoints. It never depends on the
//! control plane crate; the two meet only on the wire protocols of
//! `weft-xds-proto`.
//!
//! Status (see docs/proxy.md): identity, xDS, the snapshot, the HBONE L4
//! transport, balancing, the explicit-mode outbound listener and the
//! capture rules are built and tested; transparent capture, L7, metrics and
//! the admin port are not yet.

pub mod balance;
pub mod channel;
pub mod hbone;
pub mod identity;
pub mod iptables;
pub mod outbound;
pub mod sidecar;
pub mod state;
pub mod xds;
