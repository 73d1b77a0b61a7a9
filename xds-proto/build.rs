//! Compiles the `.proto` sources with protox, a pure-Rust protobuf compiler,
//! so that building weft never needs a system `protoc`.

use std::path::Path;

const PROTOS: &[&str] = &[
    "proto/google/rpc/status.proto",
    "proto/envoy/config/core/v3/base.proto",
    "proto/envoy/service/discovery/v3/discovery.proto",
    "proto/envoy/service/discovery/v3/ads.proto",
    "proto/weft/mesh/v1/authorization.proto",
    "proto/weft/mesh/v1/traffic.proto",
    "proto/weft/mesh/v1/mesh.proto",
    "proto/weft/ca/v1/ca.proto",
    "proto/weft/echo/v1/echo.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    for proto in PROTOS {
        if !Path::new(proto).exists() {
            return Err(format!("missing proto source {proto}").into());
        }
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    // Type names give every message `prost::Name`, from which weft derives
    // type URLs instead of spelling them by hand.
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds_with_config(descriptors, config)?;
    Ok(())
}
