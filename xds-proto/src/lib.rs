//! weft's wire protocols and nothing else.
//!
//! This crate owns the `.proto` sources and the Rust generated from them: the
//! aggregated discovery service, wire-compatible with Envoy's
//! `envoy.service.discovery.v3` (state-of-the-world and delta), the small part
//! of `envoy.config.core.v3` and `google.rpc` that it needs, weft's own mesh
//! resources in `weft.mesh.v1` (`Service`, `Workload`), and the mesh CA in
//! `weft.ca.v1`, and the demo echo service in `weft.echo.v1`. The code is generated at build time by protox, so no system
//! `protoc` is needed. Behaviour lives elsewhere: the control plane serves
//! these messages and the proxy consumes them. The one exception is
//! `pattern`, what a regex in a message means, which both sides must
//! agree on.

#![allow(clippy::doc_lazy_continuation, clippy::large_enum_variant)]

pub mod google {
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

pub mod envoy {
    pub mod config {
        pub mod core {
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    pub mod service {
        pub mod discovery {
            pub mod v3 {
                tonic::include_proto!("envoy.service.discovery.v3");
            }
        }
    }
}

pub mod weft {
    pub mod mesh {
        pub mod v1 {
            tonic::include_proto!("weft.mesh.v1");
        }
    }
    pub mod ca {
        pub mod v1 {
            tonic::include_proto!("weft.ca.v1");
        }
    }
    pub mod echo {
        pub mod v1 {
            tonic::include_proto!("weft.echo.v1");
        }
    }
}

pub mod encoded;
pub mod pattern;

pub use prost;
pub use prost_types;

/// Short paths to what the rest of weft uses most.
pub use envoy::service::discovery::v3 as discovery;
pub use weft::ca::v1 as ca;
pub use weft::echo::v1 as echo;
pub use weft::mesh::v1 as mesh;

/// Type URLs, as carried in `type_url` and in `google.protobuf.Any`.
pub mod type_url {
    const PREFIX: &str = "type.googleapis.com/";

    pub const SERVICE: &str = "type.googleapis.com/weft.mesh.v1.Service";
    pub const WORKLOAD: &str = "type.googleapis.com/weft.mesh.v1.Workload";
    pub const AUTHORIZATION: &str = "type.googleapis.com/weft.mesh.v1.Authorization";
    pub const ROUTE_SET: &str = "type.googleapis.com/weft.mesh.v1.RouteSet";
    pub const DESTINATION_POLICY: &str = "type.googleapis.com/weft.mesh.v1.DestinationPolicy";
    pub const NETWORK_GATEWAY: &str = "type.googleapis.com/weft.mesh.v1.NetworkGateway";

    /// Every weft resource type, in the order proxies subscribe, which is
    /// the order a control plane answers in: workloads before services,
    /// so that a new service's endpoints reach a proxy before its name
    /// and VIP do (never a moment of "no healthy endpoint").
    pub const ALL: [&str; 6] = [
        WORKLOAD,
        SERVICE,
        AUTHORIZATION,
        ROUTE_SET,
        DESTINATION_POLICY,
        NETWORK_GATEWAY,
    ];

    /// The type URL of any generated message, from its full protobuf name.
    pub fn of<M: prost::Name>() -> String {
        format!("{PREFIX}{}", M::full_name())
    }
}

/// Packs a message into a `google.protobuf.Any` with its type URL.
pub fn to_any<M: prost::Message + prost::Name>(message: &M) -> prost_types::Any {
    prost_types::Any {
        type_url: type_url::of::<M>(),
        value: message.encode_to_vec(),
    }
}

/// Why an `Any` could not be turned back into a message.
#[derive(Debug, PartialEq, Eq)]
pub enum AnyError {
    /// The `Any` names another type.
    WrongType { expected: String, found: String },
    /// The bytes are not a valid encoding of the expected type.
    Decode(prost::DecodeError),
}

impl std::fmt::Display for AnyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AnyError::WrongType { expected, found } => {
                write!(f, "expected resource of type {expected}, got {found}")
            }
            AnyError::Decode(err) => write!(f, "malformed resource: {err}"),
        }
    }
}

impl std::error::Error for AnyError {}

/// Unpacks a `google.protobuf.Any`, checking its type URL first so that a
/// resource of another type is refused rather than misread.
pub fn from_any<M: prost::Message + prost::Name + Default>(
    any: &prost_types::Any,
) -> Result<M, AnyError> {
    let expected = type_url::of::<M>();
    if any.type_url != expected {
        return Err(AnyError::WrongType {
            expected,
            found: any.type_url.clone(),
        });
    }
    M::decode(any.value.as_slice()).map_err(AnyError::Decode)
}

#[cfg(feature = "testing")]
pub mod testing;
