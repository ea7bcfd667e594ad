//! Installing the plugin on a node: the binary into the CNI bin directory, and an entry
//! for it at the end of the node's network configuration list. Idempotent both ways.
//!
//! The list is the first `*.conflist` of the configuration directory in name order (what
//! container runtimes load). It is rewritten through a temporary file and a rename, so a
//! runtime never reads half a file.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

/// The plugin's `type` (its binary name).
pub const PLUGIN_TYPE: &str = "trellis-cni";

/// Why installing failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Which.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The configuration list is not what the spec describes.
    #[error("{path}: {reason}")]
    Invalid {
        /// Which.
        path: String,
        /// Why.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The first `*.conflist` in `dir`.
pub fn find_conflist(dir: &Path) -> Result<PathBuf, InstallError> {
    let mut lists: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
        .collect();
    lists.sort();
    lists
        .into_iter()
        .next()
        .ok_or_else(|| InstallError::Invalid {
            path: dir.display().to_string(),
            reason: "no *.conflist: the node's network plugin is not installed yet".into(),
        })
}

/// Our entry of the list.
pub fn plugin_entry(agent_socket: &Path, fail_open: bool) -> Value {
    json!({
        "type": PLUGIN_TYPE,
        "agentSocket": agent_socket,
        "failOpen": fail_open,
    })
}

/// `list` with our entry last (replacing an earlier one, wherever it was).
pub fn with_plugin(mut list: Value, entry: Value) -> Result<Value, String> {
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or("the list has no \"plugins\" array")?;
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    plugins.push(entry);
    Ok(list)
}

/// `list` without our entry.
pub fn without_plugin(mut list: Value) -> Result<Value, String> {
    let plugins = list
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or("the list has no \"plugins\" array")?;
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    Ok(list)
}

fn rewrite(
    path: &Path,
    f: impl FnOnce(Value) -> Result<Value, String>,
) -> Result<(), InstallError> {
    let text = std::fs::read(path).map_err(io(path))?;
    let list: Value = serde_json::from_slice(&text).map_err(|e| InstallError::Invalid {
        path: path.display().to_string(),
        reason: format!("not JSON: {e}"),
    })?;
    let new = f(list.clone()).map_err(|reason| InstallError::Invalid {
        path: path.display().to_string(),
        reason,
    })?;
    if new == list {
        return Ok(());
    }
    let tmp = path.with_extension("conflist.trellis-tmp");
    let body = serde_json::to_vec_pretty(&new).unwrap_or_default();
    std::fs::write(&tmp, body).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn copy_binary(from: &Path, bin_dir: &Path) -> Result<(), InstallError> {
    std::fs::create_dir_all(bin_dir).map_err(io(bin_dir))?;
    let dest = bin_dir.join(PLUGIN_TYPE);
    let tmp = bin_dir.join(format!(".{PLUGIN_TYPE}.tmp"));
    // Copied aside and renamed: a runtime executing the old binary is not disturbed.
    std::fs::copy(from, &tmp).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &dest).map_err(io(&dest))
}

/// Installs: the plugin binary `binary` into `bin_dir`, our entry into the list in
/// `conf_dir`. Returns the list's path.
pub fn install(
    binary: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    agent_socket: &Path,
    fail_open: bool,
) -> Result<PathBuf, InstallError> {
    copy_binary(binary, bin_dir)?;
    let list = find_conflist(conf_dir)?;
    rewrite(&list, |l| {
        with_plugin(l, plugin_entry(agent_socket, fail_open))
    })?;
    Ok(list)
}

/// Uninstalls: our entry out of the list (the node's network is as before), the binary
/// removed.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<(), InstallError> {
    if let Ok(list) = find_conflist(conf_dir) {
        rewrite(&list, without_plugin)?;
    }
    match std::fs::remove_file(bin_dir.join(PLUGIN_TYPE)) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(bin_dir)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_is_idempotent_and_uninstall_restores_the_list() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("net.d");
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&conf).unwrap();
        let original = json!({"cniVersion": "1.0.0", "name": "k", "plugins": [{"type": "bridge"}]});
        std::fs::write(conf.join("10-k.conflist"), original.to_string()).unwrap();
        std::fs::write(conf.join("20-other.conflist"), "{}").unwrap();
        let exe = dir.path().join("plugin");
        std::fs::write(&exe, b"binary").unwrap();
        let sock = Path::new("/run/agent.sock");
        for _ in 0..2 {
            let list = install(&exe, &bin, &conf, sock, false).unwrap();
            assert_eq!(list, conf.join("10-k.conflist"));
        }
        let list: Value =
            serde_json::from_slice(&std::fs::read(conf.join("10-k.conflist")).unwrap()).unwrap();
        let types: Vec<&str> = list["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["bridge", "trellis-cni"], "once, last");
        assert_eq!(list["plugins"][1]["agentSocket"], "/run/agent.sock");
        assert_eq!(std::fs::read(bin.join("trellis-cni")).unwrap(), b"binary");

        uninstall(&bin, &conf).unwrap();
        uninstall(&bin, &conf).unwrap();
        let list: Value =
            serde_json::from_slice(&std::fs::read(conf.join("10-k.conflist")).unwrap()).unwrap();
        assert_eq!(list, original);
        assert!(!bin.join("trellis-cni").exists());
    }

    #[test]
    fn a_missing_or_broken_list_says_which_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let e = find_conflist(dir.path()).unwrap_err().to_string();
        assert!(e.contains("no *.conflist"), "{e}");
        std::fs::write(dir.path().join("a.conflist"), "{not json").unwrap();
        let exe = dir.path().join("x");
        std::fs::write(&exe, b"x").unwrap();
        let e = install(
            &exe,
            &dir.path().join("bin"),
            dir.path(),
            Path::new("/s"),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("a.conflist: not JSON"), "{e}");
    }
}
