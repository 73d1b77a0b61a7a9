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
//! Status: the control-plane side (identity, xDS, snapshot) and the capture
//! rules (`weft-proxy iptables`) are built and tested; the data path is not,
//! so the binary has only the `iptables` command so far.

pub mod balance;
pub mod channel;
pub mod hbone;
pub mod identity;
pub mod iptables;
pub mod outbound;
pub mod sidecar;
pub mod state;
pub mod xds;
