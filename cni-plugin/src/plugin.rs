//! The CNI plugin `trellis-cni`, meant to run chained after the cluster's main plugin.
//!
//! It follows the CNI spec 1.0/1.1: the command in `CNI_COMMAND`, the network configuration
//! on stdin, the result (the previous plugin's, passed through unchanged) on stdout, errors
//! as the spec's JSON object with its codes and a non-zero exit. On ADD it asks the node
//! agent to enroll the pod and returns as soon as the agent has decided; when the agent
//! cannot be reached it fails the pod's start (the default: fail closed) or, with
//! `"failOpen": true`, lets it start unenrolled with a loud log.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::protocol::{DEFAULT_SOCKET, MAX_MESSAGE, PodReply, PodRequest};

/// Versions of the spec this plugin speaks.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// A spec error: code and message (and details), printed as the spec's error object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}")]
pub struct CniError {
    /// The spec's code: 1 incompatible version, 2 unsupported field, 3 unknown container,
    /// 4 invalid environment variables, 5 I/O failure, 6 failed to decode, 7 invalid network
    /// config, 11 try again later, 50 plugin not available; 100+ this plugin's own.
    pub code: u32,
    /// What went wrong, for the operator.
    pub msg: String,
    /// More detail.
    pub details: String,
}

/// This plugin's own code: the agent refused to enroll the pod.
pub const CODE_AGENT_REFUSED: u32 = 100;

fn err(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
    CniError {
        code,
        msg: msg.into(),
        details: details.into(),
    }
}

impl CniError {
    /// The spec's JSON error object.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
            "details": self.details,
        })
    }
}

/// This plugin's network configuration (one entry of the list, as the runtime passes it).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// Spec version of the configuration.
    pub cni_version: String,
    /// Network name.
    #[serde(default)]
    pub name: String,
    /// `trellis-cni`.
    #[serde(rename = "type")]
    pub type_: String,
    /// The previous plugins' result (required for ADD and CHECK: this plugin is chained).
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// The agent's socket.
    #[serde(default)]
    pub agent_socket: Option<PathBuf>,
    /// Let pods start unenrolled when the agent is unreachable (default: fail).
    #[serde(default)]
    pub fail_open: bool,
    /// How long to wait for the agent's answer, in milliseconds (default 10,000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// The `CNI_*` environment of one call.
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// `CNI_COMMAND`.
    pub command: Option<String>,
    /// `CNI_CONTAINERID`.
    pub container_id: Option<String>,
    /// `CNI_NETNS`.
    pub netns: Option<String>,
    /// `CNI_IFNAME`.
    pub ifname: Option<String>,
    /// `CNI_ARGS`.
    pub args: Option<String>,
}

impl Env {
    /// From the process environment.
    pub fn from_process() -> Env {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Env {
            command: get("CNI_COMMAND"),
            container_id: get("CNI_CONTAINERID"),
            netns: get("CNI_NETNS"),
            ifname: get("CNI_IFNAME"),
            args: get("CNI_ARGS"),
        }
    }
}

/// What a successful call prints (nothing for DEL, GC, STATUS).
pub type Output = Option<Value>;

/// Runs one plugin invocation. `stdin` is the network configuration. Returns what to
/// print on success, or the error and the version to report it in.
pub fn run(env: &Env, stdin: &[u8]) -> Result<Output, (CniError, String)> {
    let latest = SUPPORTED_VERSIONS[SUPPORTED_VERSIONS.len() - 1].to_string();
    let Some(command) = env.command.as_deref() else {
        return Err((
            err(
                4,
                "CNI_COMMAND is not set",
                "expected ADD, DEL, CHECK, VERSION, STATUS or GC",
            ),
            latest,
        ));
    };
    if command == "VERSION" {
        return Ok(Some(json!({
            "cniVersion": latest,
            "supportedVersions": SUPPORTED_VERSIONS,
        })));
    }
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        (
            err(6, "cannot decode the network configuration", e.to_string()),
            latest.clone(),
        )
    })?;
    let version = conf.cni_version.clone();
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err((
            err(
                1,
                format!("incompatible CNI version {version}"),
                format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
            ),
            latest,
        ));
    }
    match command {
        "ADD" => add(env, &conf).map_err(|e| (e, version)),
        "DEL" => del(env, &conf).map(|()| None).map_err(|e| (e, version)),
        "CHECK" => check(env, &conf).map(|()| None).map_err(|e| (e, version)),
        "STATUS" => match ask(&conf, &status_request()) {
            Ok(_) => Ok(None),
            Err(e) => Err((
                err(50, "the Trellis node agent is not available", e),
                version,
            )),
        },
        "GC" => Ok(None), // the agent releases pods whose namespaces are gone on its own
        other => Err((
            err(
                4,
                format!("unknown CNI_COMMAND {other:?}"),
                "expected ADD, DEL, CHECK, VERSION, STATUS or GC",
            ),
            version,
        )),
    }
}

fn status_request() -> PodRequest {
    PodRequest {
        command: "STATUS".into(),
        container_id: String::new(),
        netns: String::new(),
        namespace: String::new(),
        name: String::new(),
        uid: String::new(),
        ips: Vec::new(),
    }
}

/// `CNI_ARGS` (`K=V;K=V`) as a map; a malformed pair is an error.
fn parse_args(args: &str) -> Result<BTreeMap<String, String>, CniError> {
    let mut out = BTreeMap::new();
    for pair in args.split(';').filter(|p| !p.is_empty()) {
        let Some((k, v)) = pair.split_once('=') else {
            return Err(err(
                4,
                "CNI_ARGS is malformed",
                format!("{pair:?} is not KEY=VALUE"),
            ));
        };
        out.insert(k.to_string(), v.to_string());
    }
    Ok(out)
}

fn pod_request(env: &Env, conf: &NetConf, command: &str) -> Result<PodRequest, CniError> {
    let require = |v: &Option<String>, name: &str| {
        v.clone().ok_or_else(|| {
            err(
                4,
                format!("{name} is not set"),
                "required by the CNI spec for this command",
            )
        })
    };
    let container_id = require(&env.container_id, "CNI_CONTAINERID")?;
    let netns = if command == "DEL" {
        env.netns.clone().unwrap_or_default()
    } else {
        require(&env.netns, "CNI_NETNS")?
    };
    let _ = require(&env.ifname, "CNI_IFNAME")?;
    let args = parse_args(env.args.as_deref().unwrap_or(""))?;
    let arg = |k: &str| {
        args.get(k)
            .cloned()
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                err(
                    4,
                    format!("CNI_ARGS has no {k}"),
                    "trellis-cni needs K8S_POD_NAMESPACE and K8S_POD_NAME to know which pod this is",
                )
            })
    };
    let ips = conf
        .prev_result
        .as_ref()
        .and_then(|r| r.get("ips"))
        .and_then(Value::as_array)
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip.get("address").and_then(Value::as_str))
                .map(|a| a.split('/').next().unwrap_or(a).to_string())
                .collect()
        })
        .unwrap_or_default();
    Ok(PodRequest {
        command: command.to_string(),
        container_id,
        netns,
        namespace: arg("K8S_POD_NAMESPACE")?,
        name: arg("K8S_POD_NAME")?,
        uid: args.get("K8S_POD_UID").cloned().unwrap_or_default(),
        ips,
    })
}

fn add(env: &Env, conf: &NetConf) -> Result<Output, CniError> {
    let Some(prev) = conf.prev_result.clone() else {
        return Err(err(
            7,
            "trellis-cni must be chained after the network plugin: no prevResult",
            "put it after bridge/ptp/... in the node's CNI configuration list",
        ));
    };
    let req = pod_request(env, conf, "ADD")?;
    let mut result = prev;
    // The result is the previous one, unchanged but for the version it is reported in.
    if let Some(obj) = result.as_object_mut() {
        obj.insert("cniVersion".into(), Value::String(conf.cni_version.clone()));
    }
    match ask(conf, &req) {
        Ok(reply) if reply.ok => Ok(Some(result)),
        Ok(reply) if reply.undecided && conf.fail_open => {
            eprintln!(
                "trellis-cni: WARNING: pod {}/{} starts WITHOUT mesh capture for now: {} (failOpen is set; it is captured once the control plane tells)",
                req.namespace, req.name, reply.error
            );
            Ok(Some(result))
        }
        Ok(reply) => Err(err(
            CODE_AGENT_REFUSED,
            format!(
                "the Trellis node agent could not enroll pod {}/{}",
                req.namespace, req.name
            ),
            reply.error,
        )),
        Err(e) if conf.fail_open => {
            eprintln!(
                "trellis-cni: WARNING: pod {}/{} starts WITHOUT mesh capture: the node agent is unreachable ({e}) and failOpen is set",
                req.namespace, req.name
            );
            Ok(Some(result))
        }
        Err(e) => Err(err(
            11,
            format!(
                "the Trellis node agent is unreachable; pod {}/{} is not started unenrolled (failOpen is false)",
                req.namespace, req.name
            ),
            e,
        )),
    }
}

fn del(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    // DEL succeeds when there is nothing to do (CNI spec): a runtime cleaning up a sandbox
    // that never got far may call it without CNI_ARGS, an interface or prevResult.
    let req = match pod_request(env, conf, "DEL") {
        Ok(req) => req,
        Err(e) => {
            eprintln!("trellis-cni: DEL with nothing to do ({e}); succeeding");
            return Ok(());
        }
    };
    // DEL must succeed when there is nothing to do; an agent that is away releases pods
    // whose namespaces are gone when it is back.
    if let Err(e) = ask(conf, &req) {
        eprintln!(
            "trellis-cni: node agent unreachable on DEL of {}/{} ({e}); it will clean up when it is back",
            req.namespace, req.name
        );
    }
    Ok(())
}

fn check(env: &Env, conf: &NetConf) -> Result<(), CniError> {
    if conf.prev_result.is_none() {
        return Err(err(
            7,
            "CHECK needs prevResult",
            "trellis-cni is a chained plugin",
        ));
    }
    let req = pod_request(env, conf, "CHECK")?;
    match ask(conf, &req) {
        Ok(r) if r.ok => Ok(()),
        Ok(r) => Err(err(
            CODE_AGENT_REFUSED,
            "the pod's capture is not as it should be",
            r.error,
        )),
        Err(e) => Err(err(11, "the Trellis node agent is unreachable", e)),
    }
}

/// Sends `req` to the agent and reads its reply.
fn ask(conf: &NetConf, req: &PodRequest) -> Result<PodReply, String> {
    let path = conf
        .agent_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    let timeout = Duration::from_millis(conf.timeout_ms.unwrap_or(10_000));
    let mut s = UnixStream::connect(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    s.set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let body = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    s.write_all(&body)
        .map_err(|e| format!("sending to the agent: {e}"))?;
    s.shutdown(std::net::Shutdown::Write)
        .map_err(|e| e.to_string())?;
    let mut reply = Vec::new();
    s.take(MAX_MESSAGE as u64 + 1)
        .read_to_end(&mut reply)
        .map_err(|e| format!("reading the agent's answer: {e}"))?;
    serde_json::from_slice(&reply).map_err(|e| format!("the agent's answer is not valid: {e}"))
}
