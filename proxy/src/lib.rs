//! `weft-proxy`, the sidecar that runs next to every meshed application.
//!
//! It owns the delta xDS client and the immutable config snapshot built from
//! it, the outbound (15001) and inbound (15006, 15008) listeners, L4 and L7
//! forwarding, load balancing across clusters, mutual TLS between sidecars,
//! the admin, health and metrics endpoints, and `weft-proxy iptables` for the
//! init container. It never depends on the control plane crate; the two meet
//! only on the wire protocols of `weft-xds-proto`. Nothing is implemented here
//! yet.
