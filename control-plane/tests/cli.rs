//! The `trellis-control-plane` binary as a user runs it.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_trellis-control-plane");

#[test]
fn check_prints_statuses_and_fails_on_a_rejected_object() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("seed.yaml"),
        include_str!("../../examples/seed-policies.yaml"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("AuthorizationPolicy foo/httpbin: accepted with warnings"),
        "{stdout}"
    );
    assert!(
        stdout.contains("PeerAuthentication foo/default: accepted"),
        "{stdout}"
    );

    std::fs::write(
        dir.path().join("bad.yaml"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: x, namespace: foo}\nspec: {mtls: {mode: SOMETIMES}}\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["check", "--config-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(
            "bad.yaml: PeerAuthentication foo/x: spec.mtls.mode: unknown variant `SOMETIMES`"
        ),
        "{stdout}"
    );
}

#[test]
fn a_bad_mesh_config_stops_the_start_with_the_field_named() {
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(&mesh, "trustDomain: Not Valid\n").unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--config-dir"])
        .arg(dir.path())
        .arg("--mesh-config")
        .arg(&mesh)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("mesh.yaml: mesh config: trustDomain: \"Not Valid\" is not a trust domain"),
        "{stderr}"
    );
}

#[test]
fn a_credential_is_printed_once_and_only_its_digest_is_stored() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["credential", "--state-dir"])
        .arg(dir.path())
        .args(["node", "node1"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = String::from_utf8(out.stdout).unwrap();
    // Exactly the token: a file made with `> file` is sent verbatim by some clients.
    assert_eq!(token.len(), 64, "{token:?}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token:?}");
    let token = token.as_str();
    let stored = std::fs::read_to_string(dir.path().join("credentials/node_node1.sha256")).unwrap();
    assert!(!stored.contains(token), "the token itself is not kept");
    assert!(stored.ends_with("node node1\n"), "{stored}");
}

#[test]
fn without_a_directory_outside_a_cluster_serve_says_what_to_give() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--state-dir"])
        .arg(dir.path())
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env_remove("TRELLIS_CONFIG_DIR")
        .env_remove("TRELLIS_CONFIG_SOURCE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("no configuration source: give --config-dir"),
        "{stderr}"
    );
}

#[test]
fn in_a_cluster_without_a_directory_serve_reads_the_kubernetes_api() {
    // The service-account environment of a pod, without the token: the source is
    // Kubernetes, and reaching it fails with a message that says so.
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["serve", "--state-dir"])
        .arg(dir.path())
        .env("KUBERNETES_SERVICE_HOST", "10.96.0.1")
        .env("KUBERNETES_SERVICE_PORT", "443")
        .env("KUBECONFIG", dir.path().join("none"))
        .env_remove("TRELLIS_CONFIG_DIR")
        .env_remove("TRELLIS_CONFIG_SOURCE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cannot reach the Kubernetes API"),
        "{stderr}"
    );
}
