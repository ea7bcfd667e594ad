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
    let token = token.trim();
    assert_eq!(token.len(), 64);
    let stored = std::fs::read_to_string(dir.path().join("credentials/node_node1.sha256")).unwrap();
    assert!(!stored.contains(token), "the token itself is not kept");
    assert!(stored.ends_with("node node1\n"), "{stored}");
}
