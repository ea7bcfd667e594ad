//! Wire compatibility: type URLs and gRPC paths as peers spell them, golden encodings built
//! by hand from the reference field numbers (a renumbered field fails here), and round trips
//! of every protocol's messages.

use prost::{Message, Name};
use prost_types::Any;
use trellis_proto::envoy::config::core::v3::Node;
use trellis_proto::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use trellis_proto::istio::security::{self, Authorization};
use trellis_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};
use trellis_proto::istio::workload::{self as wl, Address, Workload, zds};
use trellis_proto::trellis::waypoint::v1 as l7;
use trellis_proto::{grpc_path, type_url};

#[test]
fn type_urls_are_the_ones_istio_uses() {
    assert_eq!(
        Address::type_url(),
        "type.googleapis.com/istio.workload.Address"
    );
    assert_eq!(Address::type_url(), type_url::ADDRESS);
    assert_eq!(
        Authorization::type_url(),
        "type.googleapis.com/istio.security.Authorization"
    );
    assert_eq!(Authorization::type_url(), type_url::AUTHORIZATION);
    assert_eq!(l7::Route::type_url(), type_url::WAYPOINT_ROUTE);
    assert_eq!(l7::L7Policy::type_url(), type_url::WAYPOINT_L7_POLICY);
    assert_eq!(
        l7::RequestAuthentication::type_url(),
        type_url::WAYPOINT_REQUEST_AUTHENTICATION
    );
    assert_eq!(
        zds::WorkloadRequest::full_name(),
        "istio.workload.zds.WorkloadRequest"
    );
}

#[test]
fn grpc_paths_match_the_generated_services() {
    use trellis_proto::envoy::service::discovery::v3::aggregated_discovery_service_server as ads;
    use trellis_proto::istio::v1::auth::istio_certificate_service_server as ca;
    assert_eq!(
        format!("/{}/DeltaAggregatedResources", ads::SERVICE_NAME),
        grpc_path::DELTA_AGGREGATED_RESOURCES
    );
    assert_eq!(
        format!("/{}/CreateCertificate", ca::SERVICE_NAME),
        grpc_path::CREATE_CERTIFICATE
    );
}

/// A length-delimited field: key (varint of field<<3|2), length, bytes.
fn ld(field: u32, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(field, prost::encoding::WireType::LengthDelimited, &mut out);
    prost::encoding::encode_varint(body.len() as u64, &mut out);
    out.extend_from_slice(body);
    out
}

/// A varint field.
fn vi(field: u32, v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_key(field, prost::encoding::WireType::Varint, &mut out);
    prost::encoding::encode_varint(v, &mut out);
    out
}

#[test]
fn golden_encodings_use_the_reference_field_numbers() {
    // istio.workload: Address.workload = 1, Workload.uid = 20, name = 1, namespace = 2,
    // addresses = 3, service_account = 7, node = 9, tunnel_protocol = 5 (HBONE = 1).
    let w = Workload {
        uid: "u1".into(),
        name: "a".into(),
        namespace: "ns".into(),
        addresses: vec![vec![10, 0, 0, 1]],
        service_account: "sa".into(),
        node: "n1".into(),
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        ..Default::default()
    };
    let mut body = Vec::new();
    body.extend(ld(1, b"a"));
    body.extend(ld(2, b"ns"));
    body.extend(ld(3, &[10, 0, 0, 1]));
    body.extend(vi(5, 1));
    body.extend(ld(7, b"sa"));
    body.extend(ld(9, b"n1"));
    body.extend(ld(20, b"u1"));
    let addr = Address {
        r#type: Some(wl::address::Type::Workload(w)),
    };
    assert_eq!(
        sorted_fields(&addr.encode_to_vec()),
        sorted_fields(&ld(1, &body))
    );
    // Address.service = 2, Service.hostname = 3.
    let svc = Address {
        r#type: Some(wl::address::Type::Service(wl::Service {
            hostname: "s.ns.svc.cluster.local".into(),
            ..Default::default()
        })),
    };
    assert_eq!(
        svc.encode_to_vec(),
        ld(2, &ld(3, b"s.ns.svc.cluster.local"))
    );

    // istio.security: action = 4 (DENY = 1), rules = 5 → clauses = 1 → matches = 2 →
    // destination_ports = 9 (packed).
    let authz = Authorization {
        name: "p".into(),
        action: security::Action::Deny as i32,
        rules: vec![security::Rule {
            clauses: vec![security::Clause {
                matches: vec![security::Match {
                    destination_ports: vec![8080],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    };
    let mut packed = Vec::new();
    prost::encoding::encode_varint(8080, &mut packed);
    let mut want = ld(1, b"p");
    want.extend(vi(4, 1));
    want.extend(ld(5, &ld(1, &ld(2, &ld(9, &packed)))));
    assert_eq!(authz.encode_to_vec(), want);

    // envoy delta xDS: request type_url = 2, response_nonce = 6; response nonce = 5,
    // removed_resources = 6, resources = 2 → Resource.name = 3, version = 1.
    let req = DeltaDiscoveryRequest {
        type_url: "t".into(),
        response_nonce: "n".into(),
        ..Default::default()
    };
    let mut want = ld(2, b"t");
    want.extend(ld(6, b"n"));
    assert_eq!(req.encode_to_vec(), want);
    let resp = DeltaDiscoveryResponse {
        resources: vec![Resource {
            name: "r".into(),
            version: "v".into(),
            ..Default::default()
        }],
        nonce: "n".into(),
        removed_resources: vec!["x".into()],
        ..Default::default()
    };
    let mut res = ld(1, b"v");
    res.extend(ld(3, b"r"));
    let mut want = ld(2, &res);
    want.extend(ld(5, b"n"));
    want.extend(ld(6, b"x"));
    assert_eq!(sorted_fields(&resp.encode_to_vec()), sorted_fields(&want));

    // istio.v1.auth: csr = 1, validity_duration = 3.
    let csr = IstioCertificateRequest {
        csr: "c".into(),
        validity_duration: 60,
        metadata: None,
    };
    let mut want = ld(1, b"c");
    want.extend(vi(3, 60));
    assert_eq!(csr.encode_to_vec(), want);

    // ZDS: WorkloadRequest.keep = 5 → uid = 1; WorkloadResponse.ack = 1 → error = 1.
    let keep = zds::WorkloadRequest {
        payload: Some(zds::workload_request::Payload::Keep(zds::KeepWorkload {
            uid: "k".into(),
        })),
    };
    assert_eq!(keep.encode_to_vec(), ld(5, &ld(1, b"k")));
    let ack = zds::WorkloadResponse {
        payload: Some(zds::workload_response::Payload::Ack(zds::Ack {
            error: "e".into(),
        })),
    };
    assert_eq!(ack.encode_to_vec(), ld(1, &ld(1, b"e")));
}

/// Splits an encoding into its top-level fields and sorts them, so a comparison does not
/// depend on the order prost writes fields in (which the spec leaves open).
fn sorted_fields(mut buf: &[u8]) -> Vec<Vec<u8>> {
    let mut fields = Vec::new();
    while !buf.is_empty() {
        let start = buf;
        let (_, wt) = prost::encoding::decode_key(&mut buf).unwrap();
        match wt {
            prost::encoding::WireType::Varint => {
                prost::encoding::decode_varint(&mut buf).unwrap();
            }
            prost::encoding::WireType::LengthDelimited => {
                let len = prost::encoding::decode_varint(&mut buf).unwrap() as usize;
                buf = &buf[len..];
            }
            other => panic!("unexpected wire type {other:?}"),
        }
        fields.push(start[..start.len() - buf.len()].to_vec());
    }
    fields.sort();
    fields
}

fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(m: &M) {
    let bytes = m.encode_to_vec();
    let back = M::decode(bytes.as_slice()).expect("decodes");
    assert_eq!(&back, m);
}

#[test]
fn every_protocol_round_trips() {
    let workload = Workload {
        uid: "cluster1//Pod/ns/a".into(),
        name: "a".into(),
        namespace: "ns".into(),
        addresses: vec![vec![10, 244, 1, 2]],
        trust_domain: "cluster.local".into(),
        service_account: "sa".into(),
        node: "node1".into(),
        tunnel_protocol: wl::TunnelProtocol::Hbone as i32,
        services: [(
            "ns/s.ns.svc.cluster.local".to_string(),
            wl::PortList {
                ports: vec![wl::Port {
                    service_port: 80,
                    target_port: 8080,
                }],
            },
        )]
        .into(),
        authorization_policies: vec!["ns/allow".into()],
        ..Default::default()
    };
    let address = Address {
        r#type: Some(wl::address::Type::Workload(workload)),
    };
    round_trip(&address);

    let authz = Authorization {
        name: "allow".into(),
        namespace: "ns".into(),
        scope: security::Scope::Namespace as i32,
        action: security::Action::Allow as i32,
        rules: vec![security::Rule {
            clauses: vec![security::Clause {
                matches: vec![security::Match {
                    principals: vec![security::StringMatch {
                        match_type: Some(security::string_match::MatchType::Prefix(
                            "spiffe://cluster.local/ns/dev/".into(),
                        )),
                    }],
                    not_source_ips: vec![security::Address {
                        address: vec![10, 0, 0, 0],
                        length: 8,
                    }],
                    ..Default::default()
                }],
            }],
        }],
        dry_run: true,
    };
    round_trip(&authz);

    // An Address carried in a delta response as Any, unpacked again by type URL.
    let resp = DeltaDiscoveryResponse {
        system_version_info: "v1".into(),
        type_url: type_url::ADDRESS.into(),
        nonce: "1".into(),
        resources: vec![Resource {
            name: "ns/a".into(),
            version: "7".into(),
            resource: Some(Any::from_msg(&address).unwrap()),
            ..Default::default()
        }],
        removed_resources: vec!["ns/gone".into()],
        ..Default::default()
    };
    round_trip(&resp);
    let any = resp.resources[0].resource.as_ref().unwrap();
    assert_eq!(any.type_url, type_url::ADDRESS);
    assert_eq!(any.to_msg::<Address>().unwrap(), address);
    assert!(
        any.to_msg::<Authorization>().is_err(),
        "type URL mismatch is refused"
    );

    round_trip(&DeltaDiscoveryRequest {
        node: Some(Node {
            id: "sidecar~10.0.0.1~ztunnel.istio-system~istio-system.svc.cluster.local".into(),
            ..Default::default()
        }),
        type_url: type_url::AUTHORIZATION.into(),
        resource_names_subscribe: vec!["*".into()],
        initial_resource_versions: [("ns/allow".to_string(), "3".to_string())].into(),
        ..Default::default()
    });

    round_trip(&IstioCertificateRequest {
        csr: "-----BEGIN CERTIFICATE REQUEST-----".into(),
        validity_duration: 86400,
        metadata: Some(prost_types::Struct {
            fields: [(
                "ImpersonatedIdentity".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(
                        "spiffe://cluster.local/ns/ns/sa/sa".into(),
                    )),
                },
            )]
            .into(),
        }),
    });
    round_trip(&IstioCertificateResponse {
        cert_chain: vec!["leaf".into(), "root".into()],
    });

    round_trip(&zds::WorkloadRequest {
        payload: Some(zds::workload_request::Payload::Add(zds::AddWorkload {
            uid: "pod-uid".into(),
            workload_info: Some(zds::WorkloadInfo {
                name: "a".into(),
                namespace: "ns".into(),
                service_account: "sa".into(),
            }),
        })),
    });
    round_trip(&zds::WorkloadRequest {
        payload: Some(zds::workload_request::Payload::SnapshotSent(
            zds::SnapshotSent {},
        )),
    });

    round_trip(&l7::Route {
        name: "ns/reviews".into(),
        rules: vec![l7::RouteRule {
            name: "v2-for-jason".into(),
            matches: vec![l7::RouteMatch {
                method: "GET".into(),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    });
    round_trip(&l7::L7Policy {
        name: "ns/deny-dev".into(),
        action: l7::l7_policy::Action::Deny as i32,
        rules: vec![l7::Rule {
            from: vec![l7::Source {
                namespaces: vec![l7::StringMatch {
                    kind: Some(l7::string_match::Kind::Exact("dev".into())),
                    ignore_case: false,
                }],
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    });
    round_trip(&l7::RequestAuthentication {
        name: "ns/jwt".into(),
        providers: vec![l7::JwtProvider {
            issuer: "https://issuer.example".into(),
            audiences: vec!["api".into()],
            ..Default::default()
        }],
        ..Default::default()
    });
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    for bytes in [&[0xff_u8, 0xff, 0xff][..], &[0x0a, 0x05, 0x01], &[0x07]] {
        assert!(Address::decode(bytes).is_err(), "{bytes:?} decoded");
        assert!(
            zds::WorkloadRequest::decode(bytes).is_err(),
            "{bytes:?} decoded"
        );
    }
}
