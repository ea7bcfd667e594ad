//! A minimal container-runtime side of the CNI protocol (spec 1.0), as libcni does it.
//!
//! The runtime loads the node's network configuration *list*, then runs each plugin binary
//! found on `CNI_PATH` with the `CNI_*` environment and the plugin's configuration on stdin:
//! ADD in list order, each plugin after the first getting the previous result as
//! `prevResult`; CHECK in list order with the cached result; DEL in reverse order with the
//! cached result. A failed ADD is followed by a DEL of the whole list, as runtimes do, so
//! nothing half-configured stays behind.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

use crate::exec::{describe, run_with_timeout};

/// A plugin that takes longer than this is treated as hung (real runtimes use similar
/// deadlines around pod sandbox setup).
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The error a plugin reported, in the spec's error format (`code`, `msg`, `details`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// The plugin's `type`.
    pub plugin: String,
    /// ADD, DEL, CHECK or VERSION.
    pub command: String,
    /// The spec's error code (1–99 reserved by the spec, 100+ plugin-specific); 0 when the
    /// plugin failed without a parsable error object.
    pub code: u64,
    /// The plugin's message, or its stderr when it printed no error object.
    pub msg: String,
    /// The optional `details` field.
    pub details: String,
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CNI plugin {} {} failed with code {}: {}",
            self.plugin, self.command, self.code, self.msg
        )?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

/// Which pod a CNI call is about: the values a runtime puts into the `CNI_*` variables.
#[derive(Debug, Clone)]
pub struct Attachment {
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// `CNI_NETNS`: path of the pod's network namespace.
    pub netns_path: PathBuf,
    /// `CNI_IFNAME`.
    pub ifname: String,
    /// `CNI_ARGS` as key/value pairs (kubelet's `K8S_POD_*` keys).
    pub args: Vec<(String, String)>,
}

/// The CNI runtime of one node.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// Network namespace the plugins run in (the node's: plugins act as the node's runtime).
    pub exec_netns: String,
    /// Directory holding the network configuration list(s), like `/etc/cni/net.d`.
    pub conf_dir: PathBuf,
    /// `CNI_PATH`: where plugin binaries are looked up, in order.
    pub bin_dirs: Vec<PathBuf>,
    /// Where ADD results are cached for CHECK and DEL, like `/var/lib/cni/results`.
    pub cache_dir: PathBuf,
}

impl Runtime {
    /// Loads the network configuration list the runtime would use: the first `*.conflist`
    /// in `conf_dir` in lexical order, as libcni picks it.
    pub fn load_conflist(&self) -> Result<(PathBuf, Value)> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.conf_dir)
            .with_context(|| format!("cannot read CNI config dir {}", self.conf_dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
            .collect();
        files.sort();
        let path = files.into_iter().next().ok_or_else(|| {
            anyhow!(
                "no *.conflist in {}: the node has no CNI network",
                self.conf_dir.display()
            )
        })?;
        let text = std::fs::read_to_string(&path)?;
        let list: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()))?;
        for key in ["cniVersion", "name"] {
            if !list[key].is_string() {
                bail!("{}: field {key:?} must be a string", path.display());
            }
        }
        if list["plugins"].as_array().is_none_or(|p| p.is_empty()) {
            bail!(
                "{}: field \"plugins\" must be a non-empty list",
                path.display()
            );
        }
        Ok((path, list))
    }

    /// CNI ADD of the whole list; returns the final result (and caches it).
    pub fn add(&self, att: &Attachment) -> Result<Value> {
        let (_, list) = self.load_conflist()?;
        let mut prev: Option<Value> = None;
        for plugin in &plugins(&list) {
            match self.invoke("ADD", &list, plugin, att, prev.as_ref()) {
                Ok(result) => prev = Some(result),
                Err(e) => {
                    // Undo what the earlier plugins did; the ADD error is what matters.
                    let _ = self.del_with(&list, att, prev.as_ref());
                    return Err(e);
                }
            }
        }
        let result = prev.ok_or_else(|| anyhow!("CNI ADD produced no result"))?;
        std::fs::create_dir_all(&self.cache_dir)?;
        std::fs::write(self.cache_path(att), serde_json::to_vec_pretty(&result)?)?;
        Ok(result)
    }

    /// CNI CHECK of the whole list against the cached ADD result.
    pub fn check(&self, att: &Attachment) -> Result<()> {
        let (_, list) = self.load_conflist()?;
        let cached = self
            .cached_result(att)?
            .ok_or_else(|| anyhow!("no cached ADD result for {}", att.container_id))?;
        for plugin in &plugins(&list) {
            self.invoke("CHECK", &list, plugin, att, Some(&cached))?;
        }
        Ok(())
    }

    /// CNI DEL of the whole list (reverse order) with the cached result, then drops the cache.
    pub fn del(&self, att: &Attachment) -> Result<()> {
        let (_, list) = self.load_conflist()?;
        let cached = self.cached_result(att)?;
        self.del_with(&list, att, cached.as_ref())?;
        let _ = std::fs::remove_file(self.cache_path(att));
        Ok(())
    }

    /// Asks a plugin which spec versions it supports (CNI VERSION).
    pub fn version(&self, plugin_type: &str) -> Result<Value> {
        let bin = self.find_plugin(plugin_type)?;
        let mut cmd = Command::new(&bin);
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", "VERSION");
        let stdin = br#"{"cniVersion":"1.0.0"}"#;
        let out = run_with_timeout(&mut cmd, Some(stdin), PLUGIN_TIMEOUT)?;
        parse_output(plugin_type, "VERSION", &out)
    }

    fn del_with(&self, list: &Value, att: &Attachment, prev: Option<&Value>) -> Result<()> {
        // Every plugin gets its DEL even when an earlier one failed: DEL must release what
        // each plugin holds. The first error is reported.
        let mut first_err = None;
        for plugin in plugins(list).iter().rev() {
            if let Err(e) = self.invoke("DEL", list, plugin, att, prev) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    fn invoke(
        &self,
        command: &str,
        list: &Value,
        plugin: &Value,
        att: &Attachment,
        prev: Option<&Value>,
    ) -> Result<Value> {
        let plugin_type = plugin["type"]
            .as_str()
            .ok_or_else(|| anyhow!("a plugin in the CNI list has no \"type\""))?;
        let bin = self.find_plugin(plugin_type)?;
        // libcni injects the list's name and version into each plugin's configuration.
        let mut conf = plugin.clone();
        conf["name"] = list["name"].clone();
        conf["cniVersion"] = list["cniVersion"].clone();
        if let Some(prev) = prev {
            conf["prevResult"] = prev.clone();
        }
        let cni_args = att
            .args
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";");
        let cni_path = self
            .bin_dirs
            .iter()
            .map(|d| d.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.exec_netns])
            .arg(&bin)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", &att.container_id)
            .env("CNI_NETNS", &att.netns_path)
            .env("CNI_IFNAME", &att.ifname)
            .env("CNI_ARGS", cni_args)
            .env("CNI_PATH", cni_path);
        let stdin = serde_json::to_vec(&conf)?;
        let out = run_with_timeout(&mut cmd, Some(&stdin), PLUGIN_TIMEOUT)
            .with_context(|| format!("running `{}`", describe(&cmd)))?;
        parse_output(plugin_type, command, &out)
    }

    fn find_plugin(&self, plugin_type: &str) -> Result<PathBuf> {
        if plugin_type.contains('/') || plugin_type.is_empty() {
            bail!("invalid CNI plugin type {plugin_type:?}");
        }
        self.bin_dirs
            .iter()
            .map(|d| d.join(plugin_type))
            .find(|p| p.is_file())
            .ok_or_else(|| {
                anyhow!(
                    "CNI plugin {plugin_type:?} not found in {:?} (Debian package \
                     containernetworking-plugins provides the reference plugins)",
                    self.bin_dirs
                )
            })
    }

    fn cache_path(&self, att: &Attachment) -> PathBuf {
        self.cache_dir
            .join(format!("{}-{}.json", att.container_id, att.ifname))
    }

    fn cached_result(&self, att: &Attachment) -> Result<Option<Value>> {
        match std::fs::read(self.cache_path(att)) {
            Ok(bytes) => Ok(Some(serde_json::from_slice(&bytes)?)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }
}

fn plugins(list: &Value) -> Vec<Value> {
    list["plugins"].as_array().cloned().unwrap_or_default()
}

/// Turns a plugin's exit status and stdout into its result or a [`CniError`].
fn parse_output(plugin: &str, command: &str, out: &std::process::Output) -> Result<Value> {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let parsed: Option<Value> = serde_json::from_str(stdout.trim()).ok();
    if out.status.success() {
        // DEL and CHECK print nothing on success.
        return Ok(parsed.unwrap_or(Value::Null));
    }
    let err = match parsed {
        Some(v) if v["code"].is_u64() => CniError {
            plugin: plugin.to_string(),
            command: command.to_string(),
            code: v["code"].as_u64().unwrap_or(0),
            msg: v["msg"].as_str().unwrap_or_default().to_string(),
            details: v["details"].as_str().unwrap_or_default().to_string(),
        },
        _ => CniError {
            plugin: plugin.to_string(),
            command: command.to_string(),
            code: 0,
            msg: format!(
                "exited with {} without a CNI error object; stderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
            details: String::new(),
        },
    };
    Err(err.into())
}

/// The first IPv4 address in a CNI result, without its prefix length.
pub fn result_ipv4(result: &Value) -> Option<std::net::Ipv4Addr> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let cidr = ip["address"].as_str()?;
        cidr.split('/').next()?.parse().ok()
    })
}

/// The first IPv6 address of a CNI result.
pub fn result_ipv6(result: &Value) -> Option<std::net::Ipv6Addr> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let cidr = ip["address"].as_str()?;
        cidr.split('/').next()?.parse().ok()
    })
}

/// Where host-local keeps the lease of `ip` on `network` under its `dataDir`.
pub(crate) fn ipam_lease(dir: &Path, network: &str, ip: std::net::Ipv4Addr) -> PathBuf {
    dir.join(network).join(ip.to_string())
}
