//! The README's run command, as a user runs it (without the build step): `trellisctl demo`
//! walks through the mesh and exits 0 with every step shown. Root; fails without it.

use std::process::Command;

use trellis_e2e::mesh::workspace_bin;

#[test]
fn the_demo_runs_through_and_cleans_up() {
    let out = Command::new(workspace_bin("trellisctl").unwrap())
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "not found (encrypted)",
        "found in clear",
        "route=\"hbone\"",
        "dev/tool → shop/web: refused",
        "shop/deny-dev",
        "dev/tool → shop/web: allowed",
        "api-v1 answered",
        "with x-version: v2, 10 requests: api-v2 answered 10",
        "Cleaned up",
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}
