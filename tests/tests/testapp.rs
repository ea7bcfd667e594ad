//! The test app on loopback (no cluster, no root): what it answers over HTTP/1.1 and HTTP/2,
//! the echo check, and its exit status when an expectation fails.

use std::io::{BufRead, BufReader};
use std::process::{Child, Stdio};

use serde_json::Value;
use trellis_e2e::app::testapp;

/// A server on 127.0.0.1 with ephemeral ports; returns (child, echo addr, http addr).
fn start_server() -> (Child, String, String) {
    let mut child = testapp()
        .args([
            "serve",
            "--name",
            "loopback",
            "--tcp-echo",
            "127.0.0.1:0",
            "--http",
            "127.0.0.1:0",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut echo = String::new();
    let mut http = String::new();
    while echo.is_empty() || http.is_empty() {
        let line = lines.next().expect("server exited").unwrap();
        if let Some(a) = line.strip_prefix("listening tcp-echo ") {
            echo = a.to_string();
        } else if let Some(a) = line.strip_prefix("listening http ") {
            http = a.to_string();
        }
    }
    // Keep draining so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    (child, echo, http)
}

fn run(args: &[&str]) -> (bool, Value, String) {
    let out = testapp().args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (
        out.status.success(),
        v,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn http_answers_with_what_it_saw() {
    let (mut server, _, http) = start_server();
    for (flag, version) in [(None, "HTTP/1.1"), (Some("--http2"), "HTTP/2.0")] {
        let url = format!("http://{http}/some/path?q=2");
        let mut args = vec!["http", url.as_str(), "--requests", "3", "--method", "POST"];
        args.extend(["--header", "x-who: me", "--expect-status", "200"]);
        args.extend(flag);
        let (ok, out, err) = run(&args);
        assert!(ok, "client failed: {err}");
        let body = &out["last_body"];
        assert_eq!(body["pod"], "loopback");
        assert_eq!(body["method"], "POST");
        assert_eq!(body["path"], "/some/path?q=2");
        assert_eq!(body["version"], version);
        assert_eq!(body["headers"]["x-who"], "me");
        assert_eq!(
            body["peer"], out["local"],
            "server saw the client's own address"
        );
        assert_eq!(out["requests"], 3);
        assert_eq!(out["statuses"]["200"], 3);
        let lat = &out["latency_ms"];
        assert!(lat["p50"].as_f64().unwrap() <= lat["max"].as_f64().unwrap());
    }
    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn status_route_and_expectations() {
    let (mut server, _, http) = start_server();
    let url = format!("http://{http}/status/503");
    let (ok, out, _) = run(&["http", &url, "--requests", "2"]);
    assert!(ok, "without an expectation any status is fine");
    assert_eq!(out["statuses"]["503"], 2);
    let (ok, _, err) = run(&["http", &url, "--expect-status", "200"]);
    assert!(!ok, "a wrong status must fail the client");
    assert!(err.contains("did not have status 200"), "stderr: {err}");
    server.kill().unwrap();
    server.wait().unwrap();
}

#[test]
fn tcp_echo_is_verified_byte_for_byte() {
    let (mut server, echo, _) = start_server();
    let (ok, out, err) = run(&["tcp", &echo, "--bytes", "3000001"]);
    assert!(ok, "echo check failed: {err}");
    assert_eq!(out["intact"], true);
    assert_eq!(out["received"], 3000001);
    let (ok, out, _) = run(&["tcp", &echo, "--message", "ping"]);
    assert!(ok);
    assert_eq!(out["reply"], "ping");
    server.kill().unwrap();
    server.wait().unwrap();

    // Nothing listening: the client fails instead of reporting success.
    let (ok, _, err) = run(&["tcp", &echo, "--message", "ping", "--timeout", "5"]);
    assert!(!ok, "connect to a closed port must fail");
    assert!(err.contains("cannot connect"), "stderr: {err}");
}
