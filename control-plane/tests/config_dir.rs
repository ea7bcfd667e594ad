//! The config directory: what a user editing manifests sees — changes applied, mistakes
//! reported with file/object/field while the last good config stays in force.

use std::path::Path;
use std::time::Duration;

use trellis_control_plane::config::dir::{DirSource, watch};
use trellis_control_plane::config::istio::Action;
use trellis_control_plane::config::model::Model;

fn policy(name: &str, action: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: foo}}\nspec:\n  action: {action}\n  rules: [{{from: [{{source: {{namespaces: [dev]}}}}]}}]\n"
    )
}

fn actions(m: &Model) -> Vec<(String, Action)> {
    m.authorization_policies()
        .map(|((_, n), p)| (n.clone(), p.spec.action))
        .collect()
}

fn write(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

#[test]
fn reads_every_manifest_below_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a.yaml", &policy("a", "DENY"));
    write(
        dir.path(),
        "nested/deeper/b.yml",
        &format!("{}---\n{}", policy("b", "ALLOW"), policy("c", "DENY")),
    );
    write(dir.path(), "notes.txt", "not a manifest");
    write(dir.path(), ".a.yaml.swp", "garbage: [");
    let mut src = DirSource::new(dir.path());
    let mut m = Model::default();
    let change = src.scan(&mut m).unwrap();
    assert_eq!(change.applied.len(), 3, "{change:?}");
    assert!(change.errors.is_empty());
    assert_eq!(
        actions(&m),
        [
            ("a".into(), Action::Deny),
            ("b".into(), Action::Allow),
            ("c".into(), Action::Deny)
        ]
    );
    // Nothing changed: nothing applied.
    assert!(!src.scan(&mut m).unwrap().changed());
}

#[test]
fn an_invalid_edit_keeps_the_last_good_version_and_says_where() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "p.yaml",
        &format!(
            "{}---\n{}",
            policy("keep", "DENY"),
            policy("other", "ALLOW")
        ),
    );
    let mut src = DirSource::new(dir.path());
    let mut m = Model::default();
    src.scan(&mut m).unwrap();
    // `keep` becomes invalid (wrong type), `other` changes validly.
    let broken = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: keep, namespace: foo}\nspec:\n  rules: {not: a-list}\n";
    write(
        dir.path(),
        "p.yaml",
        &format!("{broken}---\n{}", policy("other", "DENY")),
    );
    let change = src.scan(&mut m).unwrap();
    assert_eq!(change.errors.len(), 1);
    let e = change.errors[0].to_string();
    assert!(
        e.contains("p.yaml: AuthorizationPolicy foo/keep: spec.rules: invalid type"),
        "{e}"
    );
    assert_eq!(
        actions(&m),
        [
            ("keep".into(), Action::Deny),
            ("other".into(), Action::Deny)
        ],
        "keep still in force, other updated"
    );
    assert!(change.deleted.is_empty());

    // Broken YAML: every object of the file stays as it was.
    write(dir.path(), "p.yaml", "apiVersion: [\n");
    let change = src.scan(&mut m).unwrap();
    assert_eq!(change.errors.len(), 1);
    assert!(change.errors[0].reason.contains("not valid YAML"));
    assert!(change.deleted.is_empty(), "{change:?}");
    assert_eq!(actions(&m).len(), 2);

    // Fixed: only what is in the file now remains.
    write(dir.path(), "p.yaml", &policy("other", "ALLOW"));
    let change = src.scan(&mut m).unwrap();
    assert!(change.errors.is_empty());
    assert_eq!(actions(&m), [("other".into(), Action::Allow)]);
    assert_eq!(change.deleted.len(), 1);
}

#[test]
fn removed_files_and_documents_are_deleted_and_duplicates_warn() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "1.yaml", &policy("dup", "DENY"));
    write(dir.path(), "2.yaml", &policy("dup", "ALLOW"));
    let mut src = DirSource::new(dir.path());
    let mut m = Model::default();
    let change = src.scan(&mut m).unwrap();
    assert_eq!(
        actions(&m),
        [("dup".into(), Action::Deny)],
        "first file in path order wins"
    );
    assert!(
        change
            .warnings
            .iter()
            .any(|w| w.contains("defined in") && w.contains("1.yaml")),
        "{:?}",
        change.warnings
    );
    // The winner goes away: the other definition takes over.
    std::fs::remove_file(dir.path().join("1.yaml")).unwrap();
    src.scan(&mut m).unwrap();
    assert_eq!(actions(&m), [("dup".into(), Action::Allow)]);
    std::fs::remove_file(dir.path().join("2.yaml")).unwrap();
    let change = src.scan(&mut m).unwrap();
    assert!(actions(&m).is_empty());
    assert_eq!(change.deleted.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_watcher_applies_a_burst_of_edits_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut src = DirSource::new(&root);
    let mut model = Model::default();
    src.scan(&mut model).unwrap();
    tokio::spawn(watch(
        src,
        model,
        Duration::from_millis(100),
        Duration::from_millis(300),
        move |m, change| tx.send((actions(m), change)).is_ok(),
    ));
    // Two saves 100 ms apart: within the quiet period, so one change.
    write(&root, "a.yaml", &policy("a", "DENY"));
    tokio::time::sleep(Duration::from_millis(150)).await;
    write(&root, "b.yaml", &policy("b", "DENY"));
    let (seen, change) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen.len(), 2, "both edits in one change: {change:?}");
    assert_eq!(change.applied.len(), 2);
    assert!(rx.try_recv().is_err(), "applied once");
}
