//! ztunnel's ZDS client against a real agent-side socket, in-process: malformed requests
//! get an error Ack (and a log line) and the connection stays usable; nothing panics.

use std::sync::Arc;
use std::time::Duration;

use trellis_core::zds::ZdsListener;
use trellis_proto::istio::workload::zds::{
    AddWorkload, KeepWorkload, SnapshotSent, WorkloadInfo, WorkloadRequest, workload_request,
};
use trellis_ztunnel::Config;
use trellis_ztunnel::inpod::{Pods, run_zds_client};

fn req(p: workload_request::Payload) -> WorkloadRequest {
    WorkloadRequest { payload: Some(p) }
}

#[tokio::test]
async fn bad_requests_get_error_acks_and_the_session_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztunnel.sock");
    let listener = ZdsListener::bind(&path).unwrap();
    // No control plane here: the mesh connects lazily and is never asked (no pod is added).
    let ca = trellis_core::testing::TestCa::new("cluster.local");
    let config = Arc::new(Config {
        zds_socket: path,
        control_plane: "https://127.0.0.1:1".into(),
        roots_pem: ca.root_pem().to_string(),
        credential: "unused".into(),
        ..Config::default()
    });
    let mesh = Arc::new(trellis_ztunnel::connect_mesh(&config).unwrap());
    let pods = Pods::new(config.clone(), mesh);
    tokio::spawn(run_zds_client(config, pods.clone()));
    let sock = tokio::time::timeout(Duration::from_secs(5), listener.accept())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sock.recv_hello().await.unwrap().version, 1);

    // An add without the pod's namespace.
    let add = req(workload_request::Payload::Add(AddWorkload {
        uid: "u1".into(),
        workload_info: Some(WorkloadInfo {
            name: "a".into(),
            namespace: "shop".into(),
            service_account: "a".into(),
        }),
    }));
    sock.send_request(&add, None).await.unwrap();
    let e = sock.recv_ack().await.unwrap().unwrap_err();
    assert!(e.contains("no file descriptor"), "{e}");
    assert!(!pods.has("u1"));

    // Garbage.
    sock.send_raw(&[0xff, 0xff, 0xff, 0xff], None)
        .await
        .unwrap();
    let e = sock.recv_ack().await.unwrap().unwrap_err();
    assert!(e.starts_with("rejected:"), "{e}");

    // Keep of a pod it does not serve.
    sock.send_request(
        &req(workload_request::Payload::Keep(KeepWorkload {
            uid: "nope".into(),
        })),
        None,
    )
    .await
    .unwrap();
    assert!(sock.recv_ack().await.unwrap().is_err());

    // Still a working session: the snapshot completes and ztunnel is ready.
    assert!(!pods.snapshot_applied());
    sock.send_request(
        &req(workload_request::Payload::SnapshotSent(SnapshotSent {})),
        None,
    )
    .await
    .unwrap();
    assert_eq!(sock.recv_ack().await.unwrap(), Ok(()));
    assert!(pods.snapshot_applied());
}
