//! The control-plane channel reads its roots at each connection: a channel built before a
//! root rotation reaches a control plane whose serving certificate is under the new root,
//! once the roots file trusts it, without being rebuilt. Real TLS and HTTP/2 on loopback.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower_service::Service;
use trellis_core::channel::{ControlPlaneRoots, ControlPlaneTarget, control_plane_channel};
use trellis_core::testing::TestCa;

/// An HTTP/2 server over TLS as `localhost` under `ca`, answering every request with 200.
async fn serve(ca: &TestCa) -> std::net::SocketAddr {
    let (chain, key) = ca.issue_dns("localhost");
    let mut config = rustls::ServerConfig::builder_with_provider(trellis_core::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = conn.accept().await {
                    let resp = http::Response::builder().status(200).body(()).unwrap();
                    let _ = respond.send_response(resp, true);
                }
            });
        }
    });
    addr
}

/// One request on the channel: the status, or the error.
async fn call(channel: &mut tonic::transport::Channel) -> Result<u16, String> {
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .map_err(|e| format!("{e:?}"))?;
    let req = http::Request::builder()
        .method("POST")
        .uri("/test/Call")
        .body(tonic::body::Body::empty())
        .unwrap();
    let resp = channel.call(req).await.map_err(|e| format!("{e:?}"))?;
    Ok(resp.status().as_u16())
}

#[tokio::test]
async fn a_channel_built_before_a_rotation_connects_under_the_new_root() {
    let (old, new) = (TestCa::new("cluster.local"), TestCa::new("cluster.local"));
    let addr = serve(&new).await;
    let dir = std::env::temp_dir().join(format!("trellis-cp-roots-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("root-cert.pem");
    std::fs::write(&file, old.root_pem()).unwrap();
    let mut channel = control_plane_channel(&ControlPlaneTarget {
        endpoint: format!("https://{addr}"),
        server_name: "localhost".into(),
        roots: ControlPlaneRoots::File(file.clone()),
        connect_timeout: Duration::from_secs(2),
        request_timeout: Some(Duration::from_secs(2)),
    })
    .unwrap();
    // Only the old root is trusted: the server under the new root is refused.
    let refused = call(&mut channel).await;
    assert!(
        refused.is_err(),
        "connected to a server no trusted root signed: {refused:?}"
    );

    // The rotation adds the new root to the file; the same channel connects on a retry.
    std::fs::write(&file, format!("{}{}", old.root_pem(), new.root_pem())).unwrap();
    let mut last = Err(String::new());
    for _ in 0..50 {
        last = call(&mut channel).await;
        if last.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        last,
        Ok(200),
        "the channel did not connect after the roots changed"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn unusable_roots_are_refused_when_the_channel_is_built() {
    let err = control_plane_channel(&ControlPlaneTarget {
        endpoint: "https://127.0.0.1:1".into(),
        server_name: "localhost".into(),
        roots: ControlPlaneRoots::Pem("not a certificate".into()),
        connect_timeout: Duration::from_secs(1),
        request_timeout: None,
    })
    .unwrap_err();
    assert!(
        err.contains("no root certificate") || err.contains("roots"),
        "{err}"
    );
}
