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
    encoded_ads_server();
    Ok(())
}

/// The ADS server a second time, by hand, so that its delta responses can
/// be `EncodedDeltaResponse`: the same bytes on the wire as Envoy's
/// `DeltaDiscoveryResponse`, with each resource encoded once per change
/// instead of once per proxy. Clients keep the generated typed service.
fn encoded_ads_server() {
    use tonic_build::manual::{Builder, Method, Service};
    let sotw = Method::builder()
        .name("stream_aggregated_resources")
        .route_name("StreamAggregatedResources")
        .input_type("crate::discovery::DiscoveryRequest")
        .output_type("crate::discovery::DiscoveryResponse")
        .codec_path("tonic_prost::ProstCodec")
        .client_streaming()
        .server_streaming()
        .build();
    let delta = Method::builder()
        .name("delta_aggregated_resources")
        .route_name("DeltaAggregatedResources")
        .input_type("crate::discovery::DeltaDiscoveryRequest")
        .output_type("crate::encoded::EncodedDeltaResponse")
        .codec_path("tonic_prost::ProstCodec")
        .client_streaming()
        .server_streaming()
        .build();
    let service = Service::builder()
        .name("AggregatedDiscoveryService")
        .package("envoy.service.discovery.v3")
        .method(sotw)
        .method(delta)
        .build();
    Builder::new()
        .build_client(false)
        .build_transport(false)
        .compile(&[service]);
}
