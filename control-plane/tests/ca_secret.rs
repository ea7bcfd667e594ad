//! The CA's root of trust on Kubernetes, in a Secret: the operator's `cacerts` wins; else
//! `trellis-ca`, generated once and shared by every replica. kube's `Client` over a
//! `tower-test` mock service stands in for the API server (it cannot run here).

mod common;
use common::{Seen, api_server, status};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use trellis_control_plane::ca::secret::{
    Origin, files_from_secret, load_or_generate, secret_from_files,
};
use trellis_control_plane::ca::store::{RootOfTrust, generate_root};

fn secret_json(name: &str, files: &trellis_control_plane::ca::store::CaFiles) -> Value {
    serde_json::to_value(secret_from_files("trellis-system", name, files)).unwrap()
}

fn seen(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Vec<(String, String)> {
    common::drain(rx)
        .into_iter()
        .map(|s| (s.method, s.path))
        .collect()
}

#[test]
fn a_secret_round_trips_the_four_files_and_a_missing_key_is_named() {
    let files = generate_root("cluster.local").unwrap();
    let secret = secret_from_files("trellis-system", "trellis-ca", &files);
    let back = files_from_secret("trellis-system/trellis-ca", &secret).unwrap();
    assert_eq!(back.ca_cert, files.ca_cert);
    assert_eq!(back.ca_key, files.ca_key);
    assert_eq!(back.root_cert, files.root_cert);
    assert!(RootOfTrust::from_files(&back).is_ok());

    let mut partial = secret.clone();
    partial.data.as_mut().unwrap().remove("ca-key.pem");
    let e = files_from_secret("trellis-system/cacerts", &partial)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("trellis-system/cacerts") && e.contains("ca-key.pem"),
        "{e}"
    );
}

#[tokio::test]
async fn the_operators_cacerts_is_used_as_is() {
    let plugged = generate_root("cluster.local").unwrap();
    let body = secret_json("cacerts", &plugged);
    let (client, mut rx) = api_server(move |method, path, _| match (method, path) {
        ("GET", "/api/v1/namespaces/trellis-system/secrets/cacerts") => (200, body.clone()),
        _ => panic!("unexpected {method} {path}"),
    });
    let (root, origin) = load_or_generate(&client, "cluster.local").await.unwrap();
    assert_eq!(origin, Origin::Plugged);
    assert_eq!(root.roots_pem(), plugged.root_cert);
    assert_eq!(seen(&mut rx).len(), 1, "read only, nothing written");
}

#[tokio::test]
async fn the_first_replica_generates_and_stores_the_root() {
    let (client, mut rx) = api_server(|method, path, body| match method {
        "GET" => status(404, "NotFound"),
        "POST" if path == "/api/v1/namespaces/trellis-system/secrets" => (201, body.clone()),
        _ => panic!("unexpected {method} {path}"),
    });
    let (root, origin) = load_or_generate(&client, "cluster.local").await.unwrap();
    assert_eq!(origin, Origin::Generated);
    let mut created = None;
    while let Ok(s) = rx.try_recv() {
        if s.method == "POST" {
            created = Some(s.body);
        }
    }
    let created = created.expect("the Secret was created");
    assert_eq!(created["metadata"]["name"], "trellis-ca");
    let keys: Vec<&String> = created["data"].as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "ca-cert.pem",
            "ca-key.pem",
            "cert-chain.pem",
            "root-cert.pem"
        ]
    );
    let stored: k8s_openapi::api::core::v1::Secret = serde_json::from_value(created).unwrap();
    let files = files_from_secret("trellis-ca", &stored).unwrap();
    assert_eq!(
        files.root_cert,
        root.roots_pem(),
        "it signs with what it stored"
    );
}

#[tokio::test]
async fn a_replica_losing_the_race_uses_the_winners_root() {
    let winner = generate_root("cluster.local").unwrap();
    let body = secret_json("trellis-ca", &winner);
    let reads = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (client, mut rx) = api_server(move |method, path, _| match (method, path) {
        ("GET", "/api/v1/namespaces/trellis-system/secrets/cacerts") => status(404, "NotFound"),
        ("GET", "/api/v1/namespaces/trellis-system/secrets/trellis-ca") => {
            // Absent at first; there once the other replica's create went through.
            if reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                status(404, "NotFound")
            } else {
                (200, body.clone())
            }
        }
        ("POST", _) => status(409, "AlreadyExists"),
        _ => panic!("unexpected {method} {path}"),
    });
    let (root, origin) = load_or_generate(&client, "cluster.local").await.unwrap();
    assert_eq!(origin, Origin::Stored);
    assert_eq!(
        root.roots_pem(),
        winner.root_cert,
        "one root for every replica"
    );
    let calls = seen(&mut rx);
    assert_eq!(calls.iter().filter(|(m, _)| m == "POST").count(), 1);
}

#[tokio::test]
async fn a_broken_secret_stops_the_start_with_its_name() {
    let (client, _rx) = api_server(|_, path, _| {
        if path.ends_with("/cacerts") {
            (
                200,
                json!({"apiVersion": "v1", "kind": "Secret",
                         "metadata": {"name": "cacerts", "namespace": "trellis-system"},
                         "data": {"ca-cert.pem": "bm90IGEgY2VydA=="}}),
            )
        } else {
            status(404, "NotFound")
        }
    });
    let e = load_or_generate(&client, "cluster.local")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("cacerts") && e.contains("ca-key.pem"), "{e}");
}
