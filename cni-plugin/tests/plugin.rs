//! `trellis-cni` as a runtime runs it: environment, stdin, stdout, exit status. The paths
//! that need a running agent are covered end to end (tests/ crate) with the real agent.

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_trellis-cni");

fn call(command: Option<&str>, args: Option<&str>, conf: &str) -> (bool, Value) {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("CNI_CONTAINERID", "abc123")
        .env("CNI_NETNS", "/var/run/netns/none")
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin");
    if let Some(cmd) = command {
        c.env("CNI_COMMAND", cmd);
    }
    if let Some(a) = args {
        c.env("CNI_ARGS", a);
    }
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v = if stdout.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
    };
    (out.status.success(), v)
}

fn conf(extra: Value) -> String {
    let mut c = json!({
        "cniVersion": "1.0.0",
        "name": "k8s",
        "type": "trellis-cni",
        "agentSocket": "/nonexistent/trellis-test.sock",
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": "/var/run/netns/none"}],
            "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 0}],
        },
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c.to_string()
}

const ARGS: &str = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_UID=u-1";

#[test]
fn version_lists_the_supported_spec_versions() {
    let (ok, v) = call(Some("VERSION"), None, "");
    assert!(ok);
    assert_eq!(v["cniVersion"], "1.1.0");
    assert!(
        v["supportedVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.0.0"))
    );
}

/// (CNI_COMMAND, CNI_ARGS, stdin, expected code, expected message part)
type Case<'a> = (Option<&'a str>, Option<&'a str>, String, u64, &'a str);

#[test]
fn bad_input_gets_the_specs_error_codes() {
    let cases: Vec<Case<'_>> = vec![
        (
            None,
            Some(ARGS),
            conf(json!({})),
            4,
            "CNI_COMMAND is not set",
        ),
        (
            Some("ADD"),
            Some(ARGS),
            "{not json".into(),
            6,
            "cannot decode",
        ),
        (
            Some("ADD"),
            Some(ARGS),
            conf(json!({"cniVersion": "9.9.9"})),
            1,
            "incompatible CNI version 9.9.9",
        ),
        (
            Some("ADD"),
            Some(ARGS),
            conf(json!({"prevResult": null})),
            7,
            "must be chained",
        ),
        (
            Some("ADD"),
            None,
            conf(json!({})),
            4,
            "CNI_ARGS has no K8S_POD_NAMESPACE",
        ),
        (
            Some("ADD"),
            Some("K8S_POD_NAMESPACE=shop"),
            conf(json!({})),
            4,
            "CNI_ARGS has no K8S_POD_NAME",
        ),
        (
            Some("ADD"),
            Some("garbage"),
            conf(json!({})),
            4,
            "CNI_ARGS is malformed",
        ),
        (
            Some("FROB"),
            Some(ARGS),
            conf(json!({})),
            4,
            "unknown CNI_COMMAND",
        ),
        // The agent is not there: the pod is not started unenrolled.
        (
            Some("ADD"),
            Some(ARGS),
            conf(json!({})),
            11,
            "node agent is unreachable",
        ),
        (Some("STATUS"), None, conf(json!({})), 50, "not available"),
    ];
    for (cmd, args, stdin, code, msg) in cases {
        let (ok, v) = call(cmd, args, &stdin);
        assert!(!ok, "{cmd:?} {args:?} must fail: {v}");
        assert_eq!(v["code"], code, "{cmd:?} {args:?}: {v}");
        assert!(v["msg"].as_str().unwrap().contains(msg), "{v}");
        assert!(v["cniVersion"].is_string(), "{v}");
    }
}

#[test]
fn fail_open_passes_the_previous_result_through_and_del_never_fails() {
    let (ok, v) = call(Some("ADD"), Some(ARGS), &conf(json!({"failOpen": true})));
    assert!(ok, "{v}");
    assert_eq!(
        v["ips"][0]["address"], "10.244.1.5/24",
        "prevResult unchanged"
    );
    assert_eq!(v["cniVersion"], "1.0.0");
    let (ok, v) = call(Some("DEL"), Some(ARGS), &conf(json!({})));
    assert!(ok, "DEL with the agent away still succeeds: {v}");
    assert!(v.is_null(), "DEL prints nothing");
    // Nothing to do: no pod named, no previous result. Still success, as the spec asks.
    let (ok, v) = call(Some("DEL"), None, &conf(json!({"prevResult": null})));
    assert!(ok, "DEL without CNI_ARGS succeeds: {v}");
    assert!(v.is_null(), "DEL prints nothing");
    let (ok, v) = call(Some("DEL"), Some("IgnoreUnknown=1"), &conf(json!({})));
    assert!(ok, "DEL without the pod's name succeeds: {v}");
}

/// An agent (a stand-in on a unix socket, answering like the real one) that cannot decide
/// yet whether the pod is in the mesh: the ADD fails unless failOpen is set, and then the
/// pod starts with the previous result.
#[test]
fn an_undecided_enrollment_fails_the_add_unless_fail_open() {
    use std::io::Read;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let agent = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut conn, _) = listener.accept().unwrap();
            let mut req = Vec::new();
            conn.read_to_end(&mut req).unwrap();
            let req: Value = serde_json::from_slice(&req).unwrap();
            assert_eq!(req["command"], "ADD");
            let reply = json!({"ok": false, "captured": false, "undecided": true,
                               "error": "the control plane has not published this pod yet"});
            conn.write_all(reply.to_string().as_bytes()).unwrap();
        }
    });
    let at = socket.to_str().unwrap();
    let (ok, v) = call(Some("ADD"), Some(ARGS), &conf(json!({"agentSocket": at})));
    assert!(!ok, "an undecided pod started without failOpen: {v}");
    assert!(
        v["details"]
            .as_str()
            .is_some_and(|d| d.contains("has not published this pod")),
        "{v}"
    );
    let (ok, v) = call(
        Some("ADD"),
        Some(ARGS),
        &conf(json!({"agentSocket": at, "failOpen": true})),
    );
    assert!(ok, "failOpen: the pod starts: {v}");
    assert_eq!(v["ips"][0]["address"], "10.244.1.5/24");
    agent.join().unwrap();
}
