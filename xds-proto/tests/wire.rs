//! Wire-format tests: messages survive a round trip, and the encoding of a
//! fixed DeltaDiscoveryRequest is byte-for-byte what Envoy's field numbers
//! produce, so a stock Envoy or gRPC xDS client can talk to weft.

use prost::Message;
use weft_xds_proto::envoy::config::core::v3::{Locality, Node, node::UserAgentVersionType};
use weft_xds_proto::google::rpc::Status;
use weft_xds_proto::{AnyError, ca, discovery, from_any, mesh, to_any, type_url};

fn sample_workload() -> mesh::Workload {
    mesh::Workload {
        uid: "c1/demo/echo-v1-abc".into(),
        name: "echo-v1-abc".into(),
        namespace: "demo".into(),
        cluster_id: "c1".into(),
        network: "net1".into(),
        addresses: vec![vec![10, 1, 0, 7]],
        locality: Some(mesh::Locality {
            region: "eu".into(),
            zone: "eu-1a".into(),
            subzone: String::new(),
        }),
        identity: Some(mesh::Identity {
            trust_domain: "cluster.local".into(),
            namespace: "demo".into(),
            service_account: "echo".into(),
        }),
        status: mesh::WorkloadStatus::Healthy as i32,
        services: vec![mesh::ServiceBinding {
            namespace: "demo".into(),
            hostname: "echo.demo.svc.cluster.local".into(),
            ports: vec![mesh::PortMapping {
                service_port: 80,
                target_port: 8080,
            }],
        }],
        tunnel_protocol: mesh::TunnelProtocol::Hbone as i32,
        node: "node-1".into(),
        canonical_name: "echo".into(),
        canonical_revision: "v1".into(),
        stale: false,
        draining: true,
        authorization_policies: vec!["demo/allow-client".into()],
        inbound_mtls: Some(mesh::InboundMtls {
            mode: mesh::MtlsMode::Strict as i32,
            ports: [(9000, mesh::MtlsMode::Permissive as i32)].into(),
        }),
        labels: [("app".to_string(), "echo".to_string())].into(),
    }
}

fn sample_service() -> mesh::Service {
    mesh::Service {
        name: "echo".into(),
        namespace: "demo".into(),
        hostname: "echo.demo.svc.cluster.local".into(),
        vips: vec![
            mesh::ClusterVip {
                cluster_id: "c1".into(),
                network: "net1".into(),
                address: vec![10, 96, 0, 10],
            },
            mesh::ClusterVip {
                cluster_id: "c2".into(),
                network: "net1".into(),
                address: vec![0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
            },
        ],
        ports: vec![mesh::ServicePort {
            port: 80,
            name: "http".into(),
            app_protocol: mesh::AppProtocol::Http as i32,
            target_port: 8080,
        }],
        cluster_local: false,
        clusters: vec!["c1".into(), "c2".into()],
        affinity: mesh::Affinity::None as i32,
    }
}

#[test]
fn mesh_resources_round_trip() {
    let workload = sample_workload();
    let decoded = mesh::Workload::decode(workload.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded, workload);

    let service = sample_service();
    let decoded = mesh::Service::decode(service.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded, service);
}

#[test]
fn delta_response_round_trips_with_typed_resources() {
    let response = discovery::DeltaDiscoveryResponse {
        system_version_info: "7".into(),
        type_url: type_url::WORKLOAD.into(),
        nonce: "n-1".into(),
        resources: vec![discovery::Resource {
            name: "c1/demo/echo-v1-abc".into(),
            version: "42".into(),
            resource: Some(to_any(&sample_workload())),
            ..Default::default()
        }],
        removed_resources: vec!["c2/demo/gone".into()],
        ..Default::default()
    };
    let decoded =
        discovery::DeltaDiscoveryResponse::decode(response.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded, response);
    let any = decoded.resources[0].resource.as_ref().unwrap();
    let workload: mesh::Workload = from_any(any).unwrap();
    assert_eq!(workload, sample_workload());
}

#[test]
fn type_urls_follow_the_protobuf_names() {
    assert_eq!(type_url::of::<mesh::Service>(), type_url::SERVICE);
    assert_eq!(type_url::of::<mesh::Workload>(), type_url::WORKLOAD);
    assert_eq!(
        type_url::of::<mesh::Authorization>(),
        type_url::AUTHORIZATION
    );
    assert_eq!(type_url::of::<mesh::RouteSet>(), type_url::ROUTE_SET);
    assert_eq!(
        type_url::of::<mesh::DestinationPolicy>(),
        type_url::DESTINATION_POLICY
    );
    assert_eq!(
        type_url::of::<mesh::NetworkGateway>(),
        type_url::NETWORK_GATEWAY
    );
    assert_eq!(
        type_url::of::<discovery::DeltaDiscoveryRequest>(),
        "type.googleapis.com/envoy.service.discovery.v3.DeltaDiscoveryRequest"
    );
}

#[test]
fn any_of_another_type_is_refused() {
    let any = to_any(&sample_service());
    let err = from_any::<mesh::Workload>(&any).unwrap_err();
    assert!(matches!(err, AnyError::WrongType { .. }), "{err}");
}

#[test]
fn garbage_bytes_are_a_decode_error_not_a_panic() {
    let any = prost_types::Any {
        type_url: type_url::WORKLOAD.into(),
        // Field 1, length-delimited, claiming 200 bytes that are not there.
        value: vec![0x0a, 0xc8, 0x01, 0x41],
    };
    assert!(matches!(
        from_any::<mesh::Workload>(&any),
        Err(AnyError::Decode(_))
    ));
    assert!(discovery::DeltaDiscoveryRequest::decode(&[0xff, 0xff, 0xff][..]).is_err());
}

#[test]
fn ca_messages_round_trip() {
    let request = ca::CreateCertificateRequest {
        csr: "-----BEGIN CERTIFICATE REQUEST-----\n...".into(),
        validity_seconds: 3600,
    };
    let decoded = ca::CreateCertificateRequest::decode(request.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded, request);
    let response = ca::CreateCertificateResponse {
        cert_chain: vec!["leaf".into(), "intermediate".into(), "root".into()],
    };
    let decoded =
        ca::CreateCertificateResponse::decode(response.encode_to_vec().as_slice()).unwrap();
    assert_eq!(decoded, response);
}

/// The bytes are written out by hand from Envoy's field numbers
/// (envoy/service/discovery/v3/discovery.proto, envoy/config/core/v3/base.proto,
/// google/rpc/status.proto), each as `tag = field << 3 | wire type`. prost
/// writes fields in field-number order, as the reference C++ encoder does.
#[test]
fn delta_discovery_request_golden_bytes() {
    let request = discovery::DeltaDiscoveryRequest {
        node: Some(Node {
            id: "n".into(),
            cluster: "c".into(),
            locality: Some(Locality {
                region: "r".into(),
                zone: "z".into(),
                sub_zone: String::new(),
            }),
            user_agent_name: "weft".into(),
            user_agent_version_type: Some(UserAgentVersionType::UserAgentVersion("1".into())),
            client_features: vec!["f".into()],
            ..Default::default()
        }),
        type_url: "t".into(),
        resource_names_subscribe: vec!["a".into(), "b".into()],
        resource_names_unsubscribe: vec!["x".into()],
        initial_resource_versions: [("a".to_string(), "1".to_string())].into(),
        response_nonce: "9".into(),
        error_detail: Some(Status {
            code: 3,
            message: "bad".into(),
            details: vec![],
        }),
        resource_locators_subscribe: vec![discovery::ResourceLocator {
            name: "l".into(),
            dynamic_parameters: Default::default(),
        }],
        resource_locators_unsubscribe: vec![],
    };

    #[rustfmt::skip]
    let expected: Vec<u8> = vec![
        // 1: node (message), 26 bytes
        0x0a, 26,
            0x0a, 1, b'n',                    // Node.id = 1
            0x12, 1, b'c',                    // Node.cluster = 2
            0x22, 6,                          // Node.locality = 4
                0x0a, 1, b'r',                //   Locality.region = 1
                0x12, 1, b'z',                //   Locality.zone = 2
            0x32, 4, b'w', b'e', b'f', b't',  // Node.user_agent_name = 6
            0x3a, 1, b'1',                    // Node.user_agent_version = 7
            0x52, 1, b'f',                    // Node.client_features = 10
        0x12, 1, b't',                        // 2: type_url
        0x1a, 1, b'a',                        // 3: resource_names_subscribe
        0x1a, 1, b'b',
        0x22, 1, b'x',                        // 4: resource_names_unsubscribe
        0x2a, 6,                              // 5: initial_resource_versions entry
            0x0a, 1, b'a',                    //   key = 1
            0x12, 1, b'1',                    //   value = 2
        0x32, 1, b'9',                        // 6: response_nonce
        0x3a, 7,                              // 7: error_detail (google.rpc.Status)
            0x08, 3,                          //   code = 1 (varint)
            0x12, 3, b'b', b'a', b'd',        //   message = 2
        0x42, 3,                              // 8: resource_locators_subscribe
            0x0a, 1, b'l',                    //   ResourceLocator.name = 1
    ];
    assert_eq!(request.encode_to_vec(), expected);
    assert_eq!(
        discovery::DeltaDiscoveryRequest::decode(expected.as_slice()).unwrap(),
        request
    );
}

/// A client built against Envoy's full protos sends fields weft does not
/// model (e.g. Node.extensions = 9, Node.dynamic_parameters = 12). They must be
/// skipped, not rejected.
#[test]
fn unknown_envoy_fields_are_skipped() {
    #[rustfmt::skip]
    let bytes: Vec<u8> = vec![
        0x0a, 9,
            0x0a, 1, b'n',            // Node.id
            0x4a, 2, 0x0a, 0,         // Node.extensions (unknown here)
            0x62, 0,                  // Node.dynamic_parameters (unknown here)
        0x12, 1, b't',
    ];
    let request = discovery::DeltaDiscoveryRequest::decode(bytes.as_slice()).unwrap();
    assert_eq!(request.node.unwrap().id, "n");
    assert_eq!(request.type_url, "t");
}

/// gRPC routes by "/<package>.<Service>/<Method>"; a stock xDS client dials
/// exactly these names.
#[test]
fn grpc_service_names_match_envoy_and_weft() {
    assert_eq!(
        discovery::aggregated_discovery_service_server::SERVICE_NAME,
        "envoy.service.discovery.v3.AggregatedDiscoveryService"
    );
    assert_eq!(
        ca::certificate_service_server::SERVICE_NAME,
        "weft.ca.v1.CertificateService"
    );
}
