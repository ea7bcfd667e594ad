//! The CA as a client sees it: gRPC on TLS, `IstioCertificateService/CreateCertificate`,
//! callers authenticated by their local-mode credential and limited to what they may hold.

use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};
use trellis_control_plane::ca::auth::{LocalCredentials, NodeWorkloads};
use trellis_control_plane::ca::service::{self, CaService, IMPERSONATED_IDENTITY};
use trellis_control_plane::ca::store::generate_root;
use trellis_control_plane::ca::{CaConfig, CertificateAuthority, RootOfTrust};
use trellis_core::SpiffeId;
use trellis_core::tls::WorkloadCert;
use trellis_proto::istio::v1::auth::IstioCertificateRequest;
use trellis_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;

struct Harness {
    client: IstioCertificateServiceClient<Channel>,
    addr: std::net::SocketAddr,
    root_pem: String,
    node1: String,
    node2: String,
    waypoint: String,
    _dir: tempfile::TempDir,
    _stop: tokio::sync::oneshot::Sender<()>,
}

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

async fn start() -> Harness {
    let files = generate_root("cluster.local").unwrap();
    let root_pem = files.root_cert.clone();
    let ca = Arc::new(CertificateAuthority::new(
        CaConfig::default(),
        RootOfTrust::from_files(&files).unwrap(),
    ));
    let dir = tempfile::tempdir().unwrap();
    let creds = Arc::new(LocalCredentials::open(dir.path()).unwrap());
    let node1 = creds.issue_node("node1").unwrap();
    let node2 = creds.issue_node("node2").unwrap();
    let waypoint = creds
        .issue_waypoint(&id("spiffe://cluster.local/ns/shop/sa/waypoint"))
        .unwrap();
    let placement = Arc::new(NodeWorkloads::default());
    placement.set("node1", [id("spiffe://cluster.local/ns/shop/sa/cart")]);
    placement.set("node2", [id("spiffe://cluster.local/ns/shop/sa/payments")]);

    let (cert, key) =
        service::serving_certificate(&ca, &["localhost", "127.0.0.1"], Duration::from_secs(3600))
            .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let svc = CaService::new(ca, creds, placement);
    tokio::spawn(async move {
        service::serve(listener, svc, &cert, &key, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(root_pem.clone()))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    Harness {
        client: IstioCertificateServiceClient::new(channel),
        addr,
        root_pem,
        node1,
        node2,
        waypoint,
        _dir: dir,
        _stop: stop,
    }
}

fn csr(identity: &str) -> (String, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(identity.to_string().try_into().unwrap())];
    (
        params.serialize_request(&key).unwrap().pem().unwrap(),
        key.serialize_pem(),
    )
}

fn request(
    token: Option<&str>,
    csr: &str,
    impersonate: Option<&str>,
) -> tonic::Request<IstioCertificateRequest> {
    let metadata = impersonate.map(|who| prost_types::Struct {
        fields: [(
            IMPERSONATED_IDENTITY.to_string(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue(who.to_string())),
            },
        )]
        .into(),
    });
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr: csr.to_string(),
        validity_duration: 3600,
        metadata,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    req
}

const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";
const PAYMENTS: &str = "spiffe://cluster.local/ns/shop/sa/payments";

#[tokio::test]
async fn a_node_obtains_certificates_for_its_own_pods() {
    let mut h = start().await;
    let (pem, key) = csr(CART);
    let resp = h
        .client
        .create_certificate(request(Some(&h.node1), &pem, Some(CART)))
        .await
        .expect("node1 may obtain the identity of a pod on node1")
        .into_inner();
    let cert = WorkloadCert::from_pem(&resp.cert_chain.concat(), &key).unwrap();
    assert_eq!(cert.identity().to_string(), CART);
    assert_eq!(resp.cert_chain.len(), 2, "leaf then root, Istio's order");
}

#[tokio::test]
async fn node1_cannot_obtain_a_certificate_for_a_pod_of_node2() {
    let mut h = start().await;
    let (pem, _) = csr(PAYMENTS);
    let status = h
        .client
        .create_certificate(request(Some(&h.node1), &pem, Some(PAYMENTS)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(
        status.message().contains("ztunnel of node node1") && status.message().contains(PAYMENTS),
        "{}",
        status.message()
    );
    // The node the pod runs on may.
    let ok = h
        .client
        .create_certificate(request(Some(&h.node2), &pem, Some(PAYMENTS)))
        .await;
    assert!(ok.is_ok(), "{ok:?}");
}

#[tokio::test]
async fn nobody_is_anonymous() {
    let mut h = start().await;
    let (pem, _) = csr(CART);
    for token in [None, Some("0123456789abcdef")] {
        let status = h
            .client
            .create_certificate(request(token, &pem, None))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    }
}

#[tokio::test]
async fn a_waypoint_obtains_only_its_own_identity() {
    let mut h = start().await;
    let own = "spiffe://cluster.local/ns/shop/sa/waypoint";
    let (pem, _) = csr(own);
    assert!(
        h.client
            .create_certificate(request(Some(&h.waypoint), &pem, None))
            .await
            .is_ok()
    );
    let (pem, _) = csr(CART);
    let status = h
        .client
        .create_certificate(request(Some(&h.waypoint), &pem, None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
}

#[tokio::test]
async fn bad_requests_get_invalid_argument_with_the_reason() {
    let mut h = start().await;
    let (pem, _) = csr(CART);
    // The impersonated identity must be the one the CSR asks for.
    let status = h
        .client
        .create_certificate(request(Some(&h.node1), &pem, Some(PAYMENTS)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("differs from the CSR's identity"),
        "{}",
        status.message()
    );
    let status = h
        .client
        .create_certificate(request(Some(&h.node1), "garbage", None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("invalid CSR"),
        "{}",
        status.message()
    );
}

#[tokio::test]
async fn a_ztunnel_certificate_manager_gets_its_pods_certificates_and_no_others() {
    use trellis_core::cert::{CertConfig, CertError, CertManager, GrpcCaClient, GrpcCaConfig};
    let h = start().await;
    let client = GrpcCaClient::new(&GrpcCaConfig {
        endpoint: format!("https://{}", h.addr),
        roots: trellis_core::channel::ControlPlaneRoots::Pem(h.root_pem.clone()),
        server_name: "localhost".into(),
        credential: h.node1.clone().into(),
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(5),
    })
    .unwrap();
    // The manager accepts only chains that lead to the mesh root (it verifies each answer).
    let bundle =
        Arc::new(trellis_core::tls::TrustBundle::from_pem("cluster.local", &h.root_pem).unwrap());
    let mgr = CertManager::new(client, bundle, CertConfig::default());
    let cert = mgr.fetch(&id(CART)).await.unwrap();
    assert_eq!(cert.identity(), &id(CART));
    let err = mgr.fetch(&id(PAYMENTS)).await.unwrap_err();
    assert!(
        matches!(&err, CertError::Refused { reason, .. } if reason.contains("PermissionDenied")),
        "{err}"
    );
}
