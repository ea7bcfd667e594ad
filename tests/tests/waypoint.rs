//! The waypoint end to end (issue 14): client pod → its ztunnel → `trellis-waypoint` →
//! the server's ztunnel → server pod, with the real control plane, node agents, CNI
//! plugin and ztunnels on the namespace cluster. These run as root; without root they fail.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use trellis_e2e::app::{serve, testapp};
use trellis_e2e::mesh::{Mesh, eventually};
use trellis_e2e::{Cluster, Pod, Proc, with_cluster};

/// `requests` HTTP requests from `from` to `url` over one connection; the client's JSON
/// summary (statuses, pods that answered, the last body).
fn http(c: &Cluster, from: &Pod, url: &str, requests: usize, extra: &[&str]) -> Result<Value> {
    let mut cmd = testapp();
    cmd.args(["http", url, "--requests", &requests.to_string()])
        .args(extra);
    let out = c.run(from, &format!("http-{}", from.name), cmd)?;
    serde_json::from_str(out.trim()).with_context(|| format!("not JSON: {out}"))
}

/// Waits until `check` gives a value, and returns it.
fn eventually_value<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let mut found = None;
    eventually(what, timeout, || {
        found = check()?;
        Ok(found.is_some())
    })?;
    found.ok_or_else(|| anyhow::anyhow!("{what}: gone"))
}

/// The status of a one-request summary (`""` when there was none).
fn first_status(summary: &Value) -> String {
    summary["statuses"]
        .as_object()
        .and_then(|m| m.keys().next().cloned())
        .unwrap_or_default()
}

fn count(summary: &Value, what: &str, key: &str) -> u64 {
    summary[what][key].as_u64().unwrap_or(0)
}

/// The service manifests: `web` (bound to the waypoint; HTTP on 80, TCP echo on 9000) and
/// its two versions as their own Services.
const SERVICES: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: tcp-echo, port: 9000}, {name: grpc, port: 7070, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-v1, namespace: shop}
spec:
  clusterIP: 10.96.0.11
  selector: {app: web, version: v1}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: web-v2, namespace: shop}
spec:
  clusterIP: 10.96.0.12
  selector: {app: web, version: v2}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: grpc, port: 7070, targetPort: 8080}]
"#;

/// Namespace `shop` with a client pod on node1, `web-v1` and `web-v2` serving on node2, the
/// services above, and the waypoint on node1. Returns the pods and processes to keep.
struct Shop {
    client: Pod,
    waypoint: Pod,
    /// The servers of web-v1 and web-v2.
    s1: Proc,
    s2: Proc,
    /// The waypoint process.
    wp: Proc,
}

fn shop(c: &Cluster, mesh: &Mesh) -> Result<Shop> {
    shop_with(c, mesh, &[])
}

fn shop_with(c: &Cluster, mesh: &Mesh, waypoint_flags: &[&str]) -> Result<Shop> {
    let (n1, n2) = (&c.nodes()[0], &c.nodes()[1]);
    mesh.namespace("shop", true)?;
    let client = c.add_pod(n1, "shop", "client", "client", &[])?;
    let v1 = c.add_pod(
        n2,
        "shop",
        "web-v1",
        "web",
        &[("app", "web"), ("version", "v1")],
    )?;
    let v2 = c.add_pod(
        n2,
        "shop",
        "web-v2",
        "web",
        &[("app", "web"), ("version", "v2")],
    )?;
    for p in [&client, &v1, &v2] {
        mesh.register_pod(c, p)?;
        mesh.wait_captured(c, p, true)?;
    }
    let s1 = serve(c, &v1)?;
    let s2 = serve(c, &v2)?;
    let (waypoint, wp) =
        mesh.start_waypoint(c, n1, "shop", "waypoint", "10.96.0.50", waypoint_flags)?;
    mesh.apply("services.yaml", SERVICES)?;
    Ok(Shop {
        client,
        waypoint,
        s1,
        s2,
        wp,
    })
}

/// Waits until the waypoint's log has a line holding every one of `parts`.
fn wait_logged(wp: &Proc, parts: &[&str]) -> Result<()> {
    eventually(
        &format!("the waypoint to log a line with {parts:?}"),
        Duration::from_secs(10),
        || {
            Ok(wp
                .output()
                .lines()
                .any(|l| parts.iter().all(|p| l.contains(p))))
        },
    )
}

/// The route of `web`'s HTTP port.
const WEB_80: &str = "shop/web.shop.svc.cluster.local:80";

/// Route `name` as the waypoint's config dump shows it (`null` when it has none).
fn dumped_route(mesh: &Mesh, c: &Cluster, waypoint: &Pod, name: &str) -> Result<Value> {
    let dump = mesh.waypoint_config(c, waypoint)?;
    Ok(dump["routes"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["name"] == name))
        .cloned()
        .unwrap_or(Value::Null))
}

/// Waits until the waypoint has route `name` with `rules` rules.
fn wait_route(mesh: &Mesh, c: &Cluster, waypoint: &Pod, name: &str, rules: usize) -> Result<()> {
    eventually(
        &format!("the waypoint to have route {name} with {rules} rules"),
        Duration::from_secs(20),
        || {
            let dump = mesh.waypoint_config(c, waypoint)?;
            Ok(dump["routes"].as_array().is_some_and(|rs| {
                rs.iter().any(|r| {
                    r["name"] == name && r["rules"].as_array().is_some_and(|x| x.len() == rules)
                })
            }))
        },
    )
}

fn waypoint_metrics(c: &Cluster, waypoint: &Pod) -> Result<String> {
    let mut curl = Command::new("curl");
    curl.args(["-sf", &format!("http://{}:15020/metrics", waypoint.ip)]);
    c.run(waypoint, "waypoint-metrics", curl)
}

/// The value of the first series of `metric` whose labels include every one of `labels`.
fn series(text: &str, metric: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(&format!("{metric}{{")))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_waypoint_splits_and_routes_by_the_services_http_routes() {
    with_cluster("waypoint_routes", 2, |c| {
        let mesh = Mesh::start(c)?;
        let shop = shop(c, &mesh)?;
        // Bound, no route yet: requests go to the service itself (both versions answer).
        wait_route(
            &mesh,
            c,
            &shop.waypoint,
            "shop/web.shop.svc.cluster.local:80",
            0,
        )?;
        let plain = http(
            c,
            &shop.client,
            "http://10.96.0.10/",
            40,
            &["--expect-status", "200"],
        )?;
        ensure!(
            count(&plain, "pods", "web-v1") > 0 && count(&plain, "pods", "web-v2") > 0,
            "without routes both endpoints of web should answer: {plain}"
        );

        mesh.apply(
            "route.yaml",
            r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
    - matches: [{headers: [{name: x-version, value: v2}]}]
      backendRefs: [{name: web-v2, port: 80}]
    - backendRefs:
        - {name: web-v1, port: 80, weight: 90}
        - {name: web-v2, port: 80, weight: 10}
"#,
        )?;
        wait_route(
            &mesh,
            c,
            &shop.waypoint,
            "shop/web.shop.svc.cluster.local:80",
            2,
        )?;

        // 90/10 over 1,000 requests, within ±3 points.
        let split = http(
            c,
            &shop.client,
            "http://10.96.0.10/",
            1000,
            &["--expect-status", "200"],
        )?;
        let (v1, v2) = (
            count(&split, "pods", "web-v1"),
            count(&split, "pods", "web-v2"),
        );
        ensure!(v1 + v2 == 1000, "every request answered by web: {split}");
        ensure!((870..=930).contains(&v1), "90/10 split landed {v1}/{v2}");

        // The header match sends everything to v2.
        let header = http(
            c,
            &shop.client,
            "http://10.96.0.10/",
            50,
            &["--header", "x-version: v2", "--expect-status", "200"],
        )?;
        ensure!(
            count(&header, "pods", "web-v2") == 50,
            "x-version: v2 → {header}"
        );

        // HTTP/2 (prior knowledge) is multiplexed through the waypoint alike.
        let h2 = http(
            c,
            &shop.client,
            "http://10.96.0.10/",
            50,
            &[
                "--http2",
                "--header",
                "x-version: v2",
                "--expect-status",
                "200",
            ],
        )?;
        ensure!(count(&h2, "pods", "web-v2") == 50, "HTTP/2 → {h2}");

        // The server's peer is the waypoint: its ztunnel verified the waypoint's identity.
        let last = &header["last_body"];
        let peer = last["peer"].as_str().unwrap_or("");
        ensure!(
            peer.starts_with(&format!("{}:", shop.waypoint.ip)),
            "web-v2 saw {peer}, not the waypoint"
        );
        // (The waypoint keeps its upstream connections open: counted as opened, not yet
        // logged as complete.)
        let node2 = mesh.metrics(c, &c.nodes()[1])?;
        ensure!(
            series(
                &node2,
                "istio_tcp_connections_opened_total",
                &[
                    "reporter=\"destination\"",
                    "source_principal=\"spiffe://cluster.local/ns/shop/sa/waypoint\"",
                    "destination_workload=\"web-v2\"",
                ],
            )
            .is_some_and(|n| n >= 1.0),
            "node2's ztunnel never saw the waypoint as its peer"
        );
        // Istio's request metrics, reporter waypoint, with the client's identity.
        let text = waypoint_metrics(c, &shop.waypoint)?;
        let v1_count = series(
            &text,
            "istio_requests_total",
            &[
                "reporter=\"waypoint\"",
                "destination_service=\"web-v1.shop.svc.cluster.local\"",
                "destination_service_name=\"web-v1\"",
                "source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"",
                "destination_principal=\"spiffe://cluster.local/ns/shop/sa/web\"",
                "response_code=\"200\"",
                "response_flags=\"-\"",
                "request_protocol=\"http\"",
            ],
        );
        ensure!(
            v1_count.is_some_and(|n| n >= v1 as f64),
            "istio_requests_total for web-v1 is {v1_count:?}, want ≥ {v1}"
        );
        ensure!(
            series(
                &text,
                "istio_request_duration_milliseconds_bucket",
                &["reporter=\"waypoint\"", "le=\"+Inf\""]
            )
            .is_some(),
            "no request duration histogram"
        );

        // A route attached to the waypoint Gateway itself, naming the Service by hostname,
        // applies alongside the Service's own routes (its longer path prefix ranks first).
        mesh.apply(
            "gateway-route.yaml",
            r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: on-waypoint, namespace: shop}
spec:
  parentRefs: [{name: waypoint}]
  hostnames: [web.shop.svc.cluster.local]
  rules:
    - matches: [{path: {type: PathPrefix, value: /v1-only}}]
      backendRefs: [{name: web-v1, port: 80}]
"#,
        )?;
        wait_route(
            &mesh,
            c,
            &shop.waypoint,
            "shop/web.shop.svc.cluster.local:80",
            3,
        )?;
        let gw = http(
            c,
            &shop.client,
            "http://10.96.0.10/v1-only/x",
            40,
            &["--expect-status", "200"],
        )?;
        ensure!(
            count(&gw, "pods", "web-v1") == 40,
            "the Gateway's route sends /v1-only to web-v1: {gw}"
        );
        Ok(())
    });
}

#[test]
fn route_filters_timeouts_and_broken_backends_behave_as_the_gateway_api_says() {
    with_cluster("waypoint_filters", 2, |c| {
        let mesh = Mesh::start(c)?;
        let shop = shop(c, &mesh)?;
        mesh.apply(
            "route.yaml",
            r#"apiVersion: v1
kind: Service
metadata: {name: empty, namespace: shop}
spec:
  clusterIP: 10.96.0.13
  selector: {app: nothing}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
    - matches: [{path: {type: Exact, value: /go-away}}]
      filters:
        - {type: RequestRedirect, requestRedirect: {hostname: example.com, statusCode: 301}}
    - matches: [{path: {type: PathPrefix, value: /old}}]
      filters:
        - type: URLRewrite
          urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
        - type: RequestHeaderModifier
          requestHeaderModifier: {set: [{name: x-added, value: "yes"}], remove: [x-drop]}
        - type: ResponseHeaderModifier
          responseHeaderModifier: {add: [{name: x-resp, value: "1"}]}
      backendRefs: [{name: web-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /delay}}]
      timeouts: {request: 500ms}
      backendRefs: [{name: web-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /empty}}]
      backendRefs: [{name: empty, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /missing}}]
      backendRefs: [{name: no-such-service, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /mirror}}]
      filters:
        - type: RequestMirror
          requestMirror: {backendRef: {name: web-v2, port: 80}}
      backendRefs: [{name: web-v1, port: 80}]
"#,
        )?;
        wait_route(
            &mesh,
            c,
            &shop.waypoint,
            "shop/web.shop.svc.cluster.local:80",
            6,
        )?;
        let get = |path: &str, extra: &[&str]| {
            http(
                c,
                &shop.client,
                &format!("http://10.96.0.10{path}"),
                1,
                extra,
            )
        };

        let r = get("/go-away?x=1", &[])?;
        ensure!(count(&r, "statuses", "301") == 1, "redirect: {r}");
        ensure!(
            r["last_headers"]["location"] == "http://example.com/go-away?x=1",
            "redirect location: {r}"
        );

        let r = get(
            "/old/thing",
            &["--header", "x-drop: 1", "--expect-status", "200"],
        )?;
        let body = &r["last_body"];
        ensure!(
            body["pod"] == "web-v1" && body["path"] == "/new/thing",
            "rewrite: {r}"
        );
        ensure!(body["headers"]["x-added"] == "yes", "set header: {r}");
        ensure!(
            body["headers"].get("x-drop").is_none(),
            "removed header arrived: {r}"
        );
        ensure!(r["last_headers"]["x-resp"] == "1", "response header: {r}");

        let r = get("/delay/10", &["--expect-status", "200"])?;
        ensure!(r["last_body"]["pod"] == "web-v1", "{r}");
        let r = get("/delay/3000", &[])?;
        ensure!(
            count(&r, "statuses", "504") == 1,
            "a slow backend is cut at 500 ms: {r}"
        );
        let took = r["latency_ms"]["max"].as_f64().unwrap_or(0.0);
        ensure!(
            (400.0..2500.0).contains(&took),
            "the 504 came after {took} ms"
        );

        // The timeout covers the whole response: one that starts in time but does not
        // end is cut at 500 ms (the client sees its body break), never left to run on.
        let t = Instant::now();
        let r = get("/delay/drip/3000", &[]);
        let took = t.elapsed();
        ensure!(
            r.is_err() && took < Duration::from_millis(2500),
            "a response still streaming at the timeout should be cut at 500 ms: {r:?} after {took:?}"
        );
        let r = get("/delay/drip/10", &["--expect-status", "200"])?;
        ensure!(
            r["last_body"].as_str() == Some("first\nrest\n"),
            "a dripping response that ends in time arrives whole: {r}"
        );

        let r = get("/empty", &[])?;
        ensure!(count(&r, "statuses", "503") == 1, "no endpoint → 503: {r}");
        let r = get("/missing", &[])?;
        ensure!(
            count(&r, "statuses", "500") == 1,
            "unresolved backend → 500: {r}"
        );

        let r = get("/mirror/copy-me", &["--expect-status", "200"])?;
        ensure!(
            r["last_body"]["pod"] == "web-v1",
            "the mirror's answer is not the response: {r}"
        );
        eventually(
            "the mirror to reach web-v2",
            Duration::from_secs(10),
            || Ok(shop.s2.output().contains("request GET /mirror/copy-me")),
        )?;
        ensure!(
            shop.s1.output().contains("request GET /mirror/copy-me"),
            "web-v1 got no request"
        );

        // Response flags in the metrics: UT for the timeout, UH for no healthy upstream.
        let text = waypoint_metrics(c, &shop.waypoint)?;
        for (code, flag) in [("504", "UT"), ("503", "UH")] {
            ensure!(
                series(
                    &text,
                    "istio_requests_total",
                    &[
                        &format!("response_code=\"{code}\""),
                        &format!("response_flags=\"{flag}\"")
                    ],
                )
                .is_some(),
                "no {code}/{flag} series"
            );
        }
        let _ = &shop.wp;
        Ok(())
    });
}

#[test]
fn a_tcp_port_is_forwarded_and_a_stopped_waypoint_is_never_bypassed() {
    with_cluster("waypoint_tcp", 2, |c| {
        let mut mesh = Mesh::start(c)?;
        let mut shop = shop(c, &mesh)?;
        wait_route(
            &mesh,
            c,
            &shop.waypoint,
            "shop/web.shop.svc.cluster.local:9000",
            0,
        )?;
        // The tcp-echo port goes through the waypoint as TCP.
        let mut cmd = testapp();
        cmd.args(["tcp", "10.96.0.10:9000", "--bytes", "200000"]);
        let out: Value = serde_json::from_str(c.run(&shop.client, "echo", cmd)?.trim())?;
        ensure!(out["intact"] == true, "TCP through the waypoint: {out}");
        wait_logged(&shop.wp, &["\"protocol\":\"tcp\"", "\"result\":\"ok\""])?;

        // The waypoint stops: ztunnel refuses the service rather than go around it.
        shop.wp.stop(Duration::from_secs(5))?;
        let mut cmd = testapp();
        cmd.args(["http", "http://10.96.0.10/", "--timeout", "5"]);
        let refused = c.run(&shop.client, "http-down", cmd);
        ensure!(
            refused.is_err(),
            "a request reached web with its waypoint stopped: {refused:?}"
        );
        for s in [&shop.s1, &shop.s2] {
            ensure!(
                !s.output().contains("request GET / from"),
                "web was reached around the waypoint"
            );
        }
        // Back: served again.
        shop.wp = mesh.spawn_waypoint(c, &shop.waypoint, "shop", "waypoint", &[])?;
        eventually(
            "web to be served through the waypoint again",
            Duration::from_secs(20),
            || {
                Ok(http(
                    c,
                    &shop.client,
                    "http://10.96.0.10/",
                    1,
                    &["--expect-status", "200"],
                )
                .is_ok())
            },
        )?;
        let _ = &mut mesh;
        Ok(())
    });
}

fn grpc(c: &Cluster, from: &Pod, method: &str, message: &str) -> Result<Value> {
    let mut cmd = testapp();
    cmd.args([
        "grpc",
        "http://10.96.0.10:7070",
        "--method",
        method,
        "--message",
        message,
    ]);
    let out = c.run(from, &format!("grpc-{}", from.name), cmd)?;
    serde_json::from_str(out.trim()).with_context(|| format!("not JSON: {out}"))
}

#[test]
fn grpc_calls_keep_their_trailers_and_follow_grpc_routes() {
    with_cluster("waypoint_grpc", 2, |c| {
        let mesh = Mesh::start(c)?;
        let shop = shop(c, &mesh)?;
        mesh.apply(
            "grpc-route.yaml",
            r#"apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 7070}]
  rules:
    - matches: [{method: {service: test.Echo, method: Stream}}]
      backendRefs: [{name: web-v2, port: 7070}]
"#,
        )?;
        wait_route(
            &mesh,
            c,
            &shop.waypoint,
            "shop/web.shop.svc.cluster.local:7070",
            1,
        )?;
        // Unary: not matched by the route, goes to web itself; trailers intact.
        let unary = grpc(c, &shop.client, "/test.Echo/Unary", "hi")?;
        ensure!(
            unary["status"] == 200 && unary["grpc_status"] == "0",
            "unary: {unary}"
        );
        ensure!(
            unary["grpc_message"] == "from-testapp",
            "trailers lost: {unary}"
        );
        let msg = unary["messages"][0].as_str().unwrap_or("");
        ensure!(msg.ends_with(":hi"), "unary answer: {unary}");
        // Server streaming: the method match sends it to web-v2; every message arrives.
        let stream = grpc(c, &shop.client, "/test.Echo/Stream", "25")?;
        let msgs = stream["messages"].as_array().cloned().unwrap_or_default();
        ensure!(msgs.len() == 25, "stream: {stream}");
        ensure!(
            msgs.iter()
                .all(|m| m.as_str().is_some_and(|m| m.starts_with("web-v2:"))),
            "stream not routed to web-v2: {stream}"
        );
        ensure!(stream["grpc_status"] == "0", "stream status: {stream}");
        // A failing call's status is carried too, and counted.
        let fail = grpc(c, &shop.client, "/test.Echo/Fail", "x")?;
        ensure!(fail["grpc_status"] == "13", "fail: {fail}");
        eventually("the gRPC metrics", Duration::from_secs(5), || {
            let text = waypoint_metrics(c, &shop.waypoint)?;
            Ok(series(
                &text,
                "istio_requests_total",
                &["request_protocol=\"grpc\"", "grpc_response_status=\"13\""],
            )
            .is_some()
                && series(
                    &text,
                    "istio_requests_total",
                    &[
                        "request_protocol=\"grpc\"",
                        "grpc_response_status=\"0\"",
                        "destination_service_name=\"web-v2\"",
                    ],
                )
                .is_some())
        })?;
        let _ = (&shop.s1, &shop.s2, &shop.wp);
        Ok(())
    });
}

/// Sends `bytes` on a raw TCP connection from `from` to `addr`, waits up to `wait` for the
/// answer; the answer's status line, or `closed` when the connection closed without one.
fn raw(c: &Cluster, from: &Pod, addr: &str, bytes: &[u8], wait: u64) -> Result<String> {
    let (host, port) = addr.rsplit_once(':').context("host:port")?;
    let script = format!(
        "import socket,sys\ns=socket.create_connection(('{host}',{port}),timeout={wait})\ns.sendall(sys.stdin.buffer.read())\nr=b''\ntry:\n  while b'\\r\\n' not in r:\n    c=s.recv(65536)\n    if not c: break\n    r+=c\nexcept socket.timeout:\n  pass\nprint(r.split(b'\\r\\n')[0].decode() if r else 'closed')\n"
    );
    let mut cmd = Command::new("python3");
    cmd.args(["-c", &script]);
    let out = c.run_with_input(from, "raw", cmd, bytes)?;
    Ok(out.trim().to_string())
}

#[test]
fn bad_http_gets_its_status_and_the_waypoint_serves_the_next_request() {
    with_cluster("waypoint_bad_input", 2, |c| {
        let mesh = Mesh::start(c)?;
        let shop = shop_with(
            c,
            &mesh,
            &[
                "--header-read-timeout-seconds",
                "2",
                "--max-header-bytes",
                "16384",
            ],
        )?;
        wait_route(
            &mesh,
            c,
            &shop.waypoint,
            "shop/web.shop.svc.cluster.local:80",
            0,
        )?;
        let vip = "10.96.0.10:80";
        let big = format!(
            "GET / HTTP/1.1\r\nHost: web\r\nX-Big: {}\r\n\r\n",
            "a".repeat(20_000)
        );
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("malformed request line", b"GARBAGE\r\n\r\n".to_vec(), " 400 "),
            ("headers over the limit", big.into_bytes(), " 431 "),
            (
                "Content-Length and Transfer-Encoding",
                b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
                " 400 ",
            ),
            (
                "conflicting Content-Length",
                b"POST / HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello".to_vec(),
                " 400 ",
            ),
            (
                "obs-fold",
                b"GET / HTTP/1.1\r\nHost: web\r\nX-A: b\r\n c\r\n\r\n".to_vec(),
                " 400 ",
            ),
        ];
        for (what, bytes, want) in &cases {
            let got = raw(c, &shop.client, vip, bytes, 10)?;
            ensure!(
                got.contains(want),
                "{what}: answered {got:?}, want {want:?}"
            );
            http(
                c,
                &shop.client,
                "http://10.96.0.10/",
                1,
                &["--expect-status", "200"],
            )
            .with_context(|| format!("a good request after {what}"))?;
        }
        // A client that never finishes its headers is cut by the header-read timeout.
        let started = std::time::Instant::now();
        let got = raw(
            c,
            &shop.client,
            vip,
            b"GET / HTTP/1.1\r\nHost: web\r\nX-Slow:",
            10,
        )?;
        let took = started.elapsed();
        ensure!(
            !got.contains(" 200 ") && took < Duration::from_secs(8),
            "a slow client was not cut: {got:?} after {took:?}"
        );
        http(
            c,
            &shop.client,
            "http://10.96.0.10/",
            1,
            &["--expect-status", "200"],
        )?;
        let _ = (&shop.s1, &shop.s2, &shop.wp);
        Ok(())
    });
}

#[test]
fn sigterm_drains_the_waypoint_then_it_exits() {
    with_cluster("waypoint_drain", 2, |c| {
        let mesh = Mesh::start(c)?;
        let mut shop = shop(c, &mesh)?;
        wait_route(
            &mesh,
            c,
            &shop.waypoint,
            "shop/web.shop.svc.cluster.local:80",
            0,
        )?;
        http(
            c,
            &shop.client,
            "http://10.96.0.10/",
            1,
            &["--expect-status", "200"],
        )?;
        // A slow request in flight when the signal comes.
        let mut cmd = testapp();
        cmd.args([
            "http",
            "http://10.96.0.10/delay/2500",
            "--expect-status",
            "200",
        ]);
        let mut slow = c.spawn(&shop.client, "slow-request", cmd)?;
        eventually(
            "the slow request to reach web",
            Duration::from_secs(5),
            || {
                Ok(shop.s1.output().contains("/delay/2500")
                    || shop.s2.output().contains("/delay/2500"))
            },
        )?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(shop.wp.pid() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        shop.wp
            .wait_for_output("shutting down", Duration::from_secs(5))?;
        // Nothing new gets in while it drains...
        let mut cmd = testapp();
        cmd.args(["http", "http://10.96.0.10/", "--timeout", "3"]);
        ensure!(
            c.run(&shop.client, "new-during-drain", cmd).is_err(),
            "a new request was served by a draining waypoint"
        );
        // ...the request in flight completes, told the connection closes...
        let status = slow.wait(Duration::from_secs(10))?;
        ensure!(
            status.success(),
            "the in-flight request failed: {}",
            slow.output()
        );
        let out: Value = serde_json::from_str(
            slow.output()
                .lines()
                .find(|l| l.starts_with('{'))
                .context("no summary")?,
        )?;
        ensure!(
            out["last_headers"]["connection"] == "close",
            "no Connection: close while draining: {out}"
        );
        // ...and the waypoint exits cleanly.
        let exit = shop.wp.wait(Duration::from_secs(10))?;
        ensure!(exit.success(), "the waypoint exited with {exit}");
        Ok(())
    });
}

#[test]
fn a_workload_bound_to_the_waypoint_is_reached_through_it() {
    with_cluster("waypoint_workload", 2, |c| {
        let n2 = &c.nodes()[1];
        let mesh = Mesh::start(c)?;
        let shop = shop(c, &mesh)?;
        // The waypoint takes workload traffic too.
        mesh.apply(
            "waypoint-shop-waypoint.yaml",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: all}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: waypoint, namespace: shop, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}\nspec:\n  clusterIP: 10.96.0.50\n  selector: {gateway.networking.k8s.io/gateway-name: waypoint}\n  ports: [{name: mesh, port: 15008}]\n",
        )?;
        let db = c.add_pod(
            n2,
            "shop",
            "db",
            "db",
            &[("app", "db"), ("istio.io/use-waypoint", "waypoint")],
        )?;
        mesh.register_pod(c, &db)?;
        mesh.wait_captured(c, &db, true)?;
        let _server = serve(c, &db)?;
        let url = format!("http://{}:8080/hello", db.ip);
        let r = eventually(
            "db to be reached through the waypoint",
            Duration::from_secs(20),
            || {
                Ok(
                    http(c, &shop.client, &url, 1, &["--expect-status", "200"]).is_ok_and(|r| {
                        r["last_body"]["peer"]
                            .as_str()
                            .is_some_and(|p| p.starts_with(&format!("{}:", shop.waypoint.ip)))
                    }),
                )
            },
        );
        r.with_context(|| {
            format!(
                "db did not see the waypoint as its caller: {:?}; the waypoint knows {}",
                http(c, &shop.client, &url, 1, &[]),
                mesh.waypoint_config(c, &shop.waypoint)
                    .map(|d| d["workloads"].to_string())
                    .unwrap_or_default()
            )
        })?;
        eventually(
            "the waypoint to log the request to db",
            Duration::from_secs(10),
            || {
                Ok(shop.wp.output().lines().any(|l| {
                    l.contains("\"path\":\"/hello\"")
                        && l.contains(&format!("\"upstream\":\"{}:8080\"", db.ip))
                }))
            },
        )?;
        // A TCP connection to it is detected as not HTTP and forwarded as TCP.
        let mut cmd = testapp();
        cmd.args(["tcp", &format!("{}:9000", db.ip), "--bytes", "50000"]);
        let out: Value = serde_json::from_str(c.run(&shop.client, "echo-db", cmd)?.trim())?;
        ensure!(
            out["intact"] == true,
            "TCP to db through the waypoint: {out}"
        );
        let _ = (&shop.s1, &shop.s2);
        Ok(())
    });
}

/// AuthorizationPolicies at the waypoint, per request: the seed's namespace-wide DENY, an
/// ALLOW attached to the Service (normalized paths), a dry-run DENY; the denial in the
/// access log and metrics; removed, they stop applying.
#[test]
fn authorization_policies_are_enforced_per_request_at_the_waypoint() {
    with_cluster("waypoint_authz", 2, |c| {
        let mesh = Mesh::start(c)?;
        let shop = shop(c, &mesh)?;
        mesh.namespace("dev", true)?;
        let dev = c.add_pod(&c.nodes()[0], "dev", "dev-client", "dev-client", &[])?;
        mesh.register_pod(c, &dev)?;
        mesh.wait_captured(c, &dev, true)?;
        wait_route(
            &mesh,
            c,
            &shop.waypoint,
            "shop/web.shop.svc.cluster.local:80",
            0,
        )?;
        let status = |from: &Pod, method: &str, path: &str| -> Result<String> {
            let r = http(
                c,
                from,
                &format!("http://10.96.0.10{path}"),
                1,
                &["--method", method],
            )?;
            let code = first_status(&r);
            if code == "403" {
                ensure!(
                    r["last_body"] == "RBAC: access denied\n",
                    "a denial says only what Istio says: {r}"
                );
            }
            Ok(code)
        };
        // The seed articles' DENY of POST from dev (namespace-wide, as written there, in
        // the Service's namespace): denied exactly that, at the waypoint.
        mesh.apply(
            "deny-post-from-dev.yaml",
            "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata: {name: httpbin, namespace: shop}\nspec:\n  action: DENY\n  rules:\n  - from: [{source: {namespaces: [dev]}}]\n    to: [{operation: {methods: [POST]}}]\n",
        )?;
        eventually(
            "POST from dev to be denied",
            Duration::from_secs(20),
            || Ok(status(&dev, "POST", "/")? == "403"),
        )?;
        ensure!(status(&dev, "GET", "/")? == "200", "GET from dev passes");
        ensure!(
            status(&shop.client, "POST", "/")? == "200",
            "POST from shop passes"
        );

        // An ALLOW attached to the Service: only /public/*, and a path that normalizes
        // into /private is not let through by its spelling.
        mesh.apply(
            "allow-public.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: public-only, namespace: shop}\nspec:\n  targetRefs: [{group: \"\", kind: Service, name: web}]\n  action: ALLOW\n  rules:\n  - to: [{operation: {paths: [\"/public/*\"], methods: [GET]}}]\n",
        )?;
        eventually("/private to be denied", Duration::from_secs(20), || {
            Ok(status(&shop.client, "GET", "/private")? == "403")
        })?;
        ensure!(status(&shop.client, "GET", "/public/x")? == "200");
        ensure!(status(&shop.client, "POST", "/public/x")? == "403");
        ensure!(status(&shop.client, "GET", "/public/../private")? == "403");

        // A dry-run DENY on the waypoint: logged as would-deny, not enforced.
        mesh.apply(
            "dry-run.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: dry, namespace: shop, annotations: {istio.io/dry-run: \"true\"}}\nspec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n  action: DENY\n  rules: [{to: [{operation: {paths: [\"/public/dry\"]}}]}]\n",
        )?;
        eventually(
            "the dry-run policy to be evaluated",
            Duration::from_secs(20),
            || {
                ensure!(status(&shop.client, "GET", "/public/dry")? == "200");
                Ok(shop.wp.output().contains("would-deny"))
            },
        )?;

        // The denial in the access log (policy, flag) and in Istio's metrics.
        eventually(
            "the access log to name the policy",
            Duration::from_secs(5),
            || {
                let out = shop.wp.output();
                Ok(out.lines().any(|l| {
                    l.contains("request complete")
                        && l.contains("shop/public-only")
                        && l.contains("RBAC")
                }))
            },
        )?;
        let text = waypoint_metrics(c, &shop.waypoint)?;
        ensure!(
            series(
                &text,
                "istio_requests_total",
                &["response_code=\"403\"", "response_flags=\"RBAC\""]
            )
            .is_some_and(|n| n >= 1.0),
            "no 403 with flag RBAC in the waypoint's metrics"
        );

        // Removed, the policies stop applying.
        for f in [
            "allow-public.yaml",
            "deny-post-from-dev.yaml",
            "dry-run.yaml",
        ] {
            std::fs::remove_file(
                c.nodes()[0]
                    .state_dir()
                    .join("control-plane/config")
                    .join(f),
            )?;
        }
        eventually("/private served again", Duration::from_secs(20), || {
            Ok(status(&shop.client, "GET", "/private")? == "200")
        })?;
        ensure!(status(&dev, "POST", "/")? == "200");
        let _ = (&shop.s1, &shop.s2);
        Ok(())
    });
}

/// An identity provider's ES256 signing key and its JWK.
struct IdpKey {
    pkcs8: Vec<u8>,
    jwk: Value,
}

fn idp_key(kid: &str) -> IdpKey {
    use base64::Engine;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let public = pair.public_key().as_ref();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    IdpKey {
        pkcs8: pkcs8.as_ref().to_vec(),
        jwk: serde_json::json!({
            "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
            "x": b64(&public[1..33]), "y": b64(&public[33..65]),
        }),
    }
}

fn jwks_of(keys: &[&IdpKey]) -> String {
    serde_json::json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()}).to_string()
}

fn sign(key: &IdpKey, kid: &str, claims: &Value) -> String {
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = Some(kid.into());
    jsonwebtoken::encode(
        &h,
        claims,
        &jsonwebtoken::EncodingKey::from_ec_der(&key.pkcs8),
    )
    .unwrap()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// The identity provider: a pod outside the mesh serving the JWKS of `keys` (from a file
/// the test may rewrite) at `http://<pod>:8080/keys`, or, with `tls` (certificate chain
/// and key files), at `https://<pod>:443/keys`.
fn identity_provider(
    c: &Cluster,
    mesh: &Mesh,
    keys: &[&IdpKey],
    tls: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<(Pod, Proc, std::path::PathBuf)> {
    mesh.namespace("idp", false)?;
    let idp = c.add_pod(&c.nodes()[1], "idp", "jwks", "jwks", &[])?;
    mesh.register_pod(c, &idp)?;
    let jwks_file = c.log_dir().join("jwks.json");
    std::fs::write(&jwks_file, jwks_of(keys))?;
    let mut cmd = testapp();
    cmd.args(["serve", "--jwks"]).arg(&jwks_file);
    let listening = match tls {
        None => {
            cmd.args(["--http", "0.0.0.0:8080"]);
            "listening http"
        }
        Some((cert, key)) => {
            cmd.args(["--https", "0.0.0.0:443", "--tls-cert"])
                .arg(cert)
                .arg("--tls-key")
                .arg(key);
            "listening https"
        }
    };
    let mut server = c.spawn(&idp, "jwks-server", cmd)?;
    server.wait_for_output(listening, Duration::from_secs(10))?;
    Ok((idp, server, jwks_file))
}

/// PEM of one DER item (`label`: `CERTIFICATE`, `PRIVATE KEY`).
fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[test]
fn end_user_tokens_are_checked_at_the_waypoint() {
    with_cluster("waypoint_jwt", 2, |c| {
        let mesh = Mesh::start(c)?;
        let shop = shop(c, &mesh)?;
        let (k1, k2) = (idp_key("k1"), idp_key("k2"));
        let (idp, mut idp_server, jwks_file) = identity_provider(c, &mesh, &[&k1], None)?;

        // The seed articles' RequestAuthentication (a selector, jwksUri), pointing at the
        // cluster's identity provider.
        mesh.apply(
            "jwt.yaml",
            &format!(
                "apiVersion: security.istio.io/v1beta1\nkind: RequestAuthentication\nmetadata: {{name: jwt-example, namespace: shop}}\nspec:\n  selector:\n    matchLabels: {{app: web}}\n  jwtRules:\n  - issuer: \"https://issuer.example.com\"\n    jwksUri: \"http://{}:8080/keys\"\n    audiences: [shop]\n    outputClaimToHeaders: [{{header: x-user, claim: sub}}]\n",
                idp.ip
            ),
        )?;
        let claims = |extra: Value| {
            let mut c = serde_json::json!({
                "iss": "https://issuer.example.com", "sub": "alice", "aud": "shop",
                "exp": unix_now() + 600, "groups": ["admins"],
            });
            for (k, v) in extra.as_object().unwrap() {
                c[k] = v.clone();
            }
            c
        };
        let get = |token: Option<&str>| -> Result<(String, Value)> {
            let auth = token.map(|t| format!("authorization: Bearer {t}"));
            let mut extra = Vec::new();
            if let Some(a) = &auth {
                extra.extend(["--header", a.as_str()]);
            }
            let r = http(c, &shop.client, "http://10.96.0.10/", 1, &extra)?;
            let code = first_status(&r);
            Ok((code, r["last_body"].clone()))
        };
        eventually(
            "a malformed token to be refused",
            Duration::from_secs(20),
            || Ok(get(Some("not.a.token"))?.0 == "401"),
        )?;
        let valid = sign(&k1, "k1", &claims(serde_json::json!({})));
        let (code, body) = get(Some(&valid))?;
        ensure!(code == "200", "a valid token: {code} {body}");
        ensure!(
            body["headers"].get("authorization").is_none(),
            "the token was forwarded: {body}"
        );
        ensure!(
            body["headers"]["x-user"] == "alice",
            "claim to header: {body}"
        );
        ensure!(get(None)?.0 == "200", "no token passes unauthenticated");
        for (what, token) in [
            (
                "expired",
                sign(
                    &k1,
                    "k1",
                    &claims(serde_json::json!({"exp": unix_now() - 600})),
                ),
            ),
            (
                "not yet valid",
                sign(
                    &k1,
                    "k1",
                    &claims(serde_json::json!({"nbf": unix_now() + 600})),
                ),
            ),
            (
                "wrong issuer",
                sign(
                    &k1,
                    "k1",
                    &claims(serde_json::json!({"iss": "https://evil.example"})),
                ),
            ),
            (
                "bad signature",
                sign(&idp_key("k1"), "k1", &claims(serde_json::json!({}))),
            ),
            (
                "wrong audience",
                sign(&k1, "k1", &claims(serde_json::json!({"aud": "billing"}))),
            ),
        ] {
            let (code, body) = get(Some(&token))?;
            ensure!(code == "401", "{what}: {code} {body}");
        }
        {
            use base64::Engine;
            let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
            let none = format!(
                "{}.{}.",
                b64(r#"{"alg":"none","typ":"JWT"}"#),
                b64(&claims(serde_json::json!({})).to_string())
            );
            ensure!(get(Some(&none))?.0 == "401", "alg none");
        }

        // A principal required, and a claim condition.
        mesh.apply(
            "require-jwt.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: require-jwt, namespace: shop}\nspec:\n  targetRefs: [{group: \"\", kind: Service, name: web}]\n  action: ALLOW\n  rules:\n  - from: [{source: {requestPrincipals: [\"https://issuer.example.com/*\"]}}]\n    when: [{key: \"request.auth.claims[groups]\", values: [admins]}]\n",
        )?;
        eventually(
            "a request without token to be denied",
            Duration::from_secs(20),
            || Ok(get(None)?.0 == "403"),
        )?;
        ensure!(
            get(Some(&valid))?.0 == "200",
            "the admin's token is allowed"
        );
        let not_admin = sign(&k1, "k1", &claims(serde_json::json!({"groups": ["users"]})));
        ensure!(get(Some(&not_admin))?.0 == "403", "the claim condition");

        // Key rotation at the identity provider: a token of the new key is accepted once
        // the waypoint fetches the keys again (an unknown kid, at a bounded rate).
        std::fs::write(&jwks_file, jwks_of(&[&k1, &k2]))?;
        let rotated = sign(&k2, "k2", &claims(serde_json::json!({})));
        eventually(
            "the rotated key to be accepted",
            Duration::from_secs(20),
            || Ok(get(Some(&rotated))?.0 == "200"),
        )?;
        // The identity provider goes away: the last good keys stay in use.
        idp_server.stop(Duration::from_secs(2))?;
        std::thread::sleep(Duration::from_secs(6));
        let unknown = sign(&idp_key("k3"), "k3", &claims(serde_json::json!({})));
        ensure!(
            get(Some(&unknown))?.0 == "401",
            "an unknown key while the JWKS server is down"
        );
        ensure!(get(Some(&valid))?.0 == "200", "last good keys kept");
        let _ = (&shop.s1, &shop.s2, &shop.wp);
        Ok(())
    });
}

/// The external authorizer (HTTP on 8000, gRPC on 9001): a pod of `shop` in the mesh
/// labelled `app: ext-authz`, running until the test stops it.
fn external_authorizer(c: &Cluster, mesh: &Mesh) -> Result<Proc> {
    let pod = c.add_pod(
        &c.nodes()[1],
        "shop",
        "ext-authz",
        "ext-authz",
        &[("app", "ext-authz")],
    )?;
    mesh.register_pod(c, &pod)?;
    mesh.wait_captured(c, &pod, true)?;
    let mut cmd = testapp();
    cmd.args([
        "ext-authz",
        "--http",
        "0.0.0.0:8000",
        "--grpc",
        "0.0.0.0:9001",
    ]);
    let mut p = c.spawn(&pod, "ext-authz", cmd)?;
    p.wait_for_output("listening ext-authz-grpc", Duration::from_secs(10))?;
    Ok(p)
}

#[test]
fn custom_policies_ask_the_external_authorizer() {
    with_cluster("waypoint_ext_authz", 2, |c| {
        let mesh = Mesh::start_with_mesh_config(
            c,
            Some(
                "extensionProviders:\n- name: sample-ext-authz-http\n  envoyExtAuthzHttp:\n    service: ext-authz.shop.svc.cluster.local\n    port: 8000\n    timeout: 2s\n    includeRequestHeadersInCheck: [x-ext-authz]\n    headersToUpstreamOnAllow: [x-ext-authz-check-result]\n    headersToDownstreamOnDeny: [x-ext-authz-check-result]\n- name: sample-ext-authz-grpc\n  envoyExtAuthzGrpc:\n    service: ext-authz.shop.svc.cluster.local\n    port: 9001\n    timeout: 2s\n- name: lenient\n  envoyExtAuthzHttp:\n    service: ext-authz.shop.svc.cluster.local\n    port: 8000\n    timeout: 2s\n    failOpen: true\n    includeRequestHeadersInCheck: [x-ext-authz]\n",
            ),
        )?;
        let shop = shop(c, &mesh)?;
        // The external authorizer: a pod of the mesh behind its Service.
        let mut authorizer = external_authorizer(c, &mesh)?;
        mesh.apply(
            "ext-authz-lenient.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext-authz-lenient, namespace: shop}\nspec:\n  targetRefs: [{group: \"\", kind: Service, name: web}]\n  action: CUSTOM\n  provider: {name: lenient}\n  rules: [{to: [{operation: {paths: [\"/lenient/*\"]}}]}]\n",
        )?;
        mesh.apply(
            "ext-authz-grpc.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext-authz-grpc, namespace: shop}\nspec:\n  targetRefs: [{group: \"\", kind: Service, name: web}]\n  action: CUSTOM\n  provider: {name: sample-ext-authz-grpc}\n  rules: [{to: [{operation: {paths: [\"/grpc-guarded/*\"]}}]}]\n",
        )?;
        mesh.apply(
            "ext-authz.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: ext-authz, namespace: shop}\nspec:\n  clusterIP: 10.96.0.30\n  selector: {app: ext-authz}\n  ports: [{name: http, port: 8000, targetPort: 8000}, {name: grpc, port: 9001, targetPort: 9001}]\n---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: ext-authz, namespace: shop}\nspec:\n  targetRefs: [{group: \"\", kind: Service, name: web}]\n  action: CUSTOM\n  provider: {name: sample-ext-authz-http}\n  rules: [{to: [{operation: {paths: [\"/protected/*\"]}}]}]\n",
        )?;
        let get = |path: &str, allow: bool| -> Result<Value> {
            let mut extra = Vec::new();
            if allow {
                extra.extend(["--header", "x-ext-authz: allow"]);
            }
            http(
                c,
                &shop.client,
                &format!("http://10.96.0.10{path}"),
                1,
                &extra,
            )
        };
        let status = |r: &Value| first_status(r);
        eventually(
            "the authorizer to deny /protected without its header",
            Duration::from_secs(20),
            || Ok(status(&get("/protected/x", false)?) == "403"),
        )?;
        let denied = get("/protected/x", false)?;
        ensure!(
            denied["last_headers"]["x-ext-authz-check-result"] == "denied"
                && denied["last_body"]
                    .as_str()
                    .is_some_and(|b| b.contains("denied by ext_authz")),
            "the authorizer's answer reaches the client: {denied}"
        );
        let allowed = get("/protected/x", true)?;
        ensure!(status(&allowed) == "200", "allowed: {allowed}");
        ensure!(
            allowed["last_body"]["headers"]["x-ext-authz-check-result"] == "allowed",
            "the authorizer's header goes upstream: {allowed}"
        );
        // The gRPC authorizer (Envoy's Check API) decides /grpc-guarded the same way.
        let denied = get("/grpc-guarded/x", false)?;
        ensure!(
            status(&denied) == "403"
                && denied["last_headers"]["x-ext-authz-check-result"] == "denied"
                && denied["last_body"]
                    .as_str()
                    .is_some_and(|b| b.contains("denied by ext_authz (gRPC)")),
            "the gRPC authorizer's denial reaches the client: {denied}"
        );
        let allowed = get("/grpc-guarded/x", true)?;
        ensure!(
            status(&allowed) == "200"
                && allowed["last_body"]["headers"]["x-ext-authz-check-result"] == "allowed",
            "the gRPC authorizer allows and its header goes upstream: {allowed}"
        );
        // Requests the policy's rules do not match are not checked.
        ensure!(status(&get("/open", false)?) == "200");
        eventually("the authorizer's log", Duration::from_secs(5), || {
            let out = authorizer.output();
            Ok(out.contains("check GET /protected/x") && !out.contains("/open"))
        })?;
        ensure!(
            status(&get("/lenient/x", false)?) == "403",
            "the lenient provider's authorizer still decides while it answers"
        );
        // The authorizer stopped: fail closed (failOpen is false), except for the provider
        // with failOpen.
        authorizer.stop(Duration::from_secs(2))?;
        let r = get("/protected/x", true)?;
        ensure!(
            status(&r) == "403",
            "an unreachable authorizer fails closed: {r}"
        );
        let r = get("/lenient/x", false)?;
        ensure!(
            status(&r) == "200",
            "failOpen lets the request through: {r}"
        );
        ensure!(status(&get("/open", false)?) == "200");
        let _ = (&shop.s1, &shop.s2, &shop.wp);
        Ok(())
    });
}

/// One case of the authorization matrix: who, what, and the status expected.
struct Case {
    from: &'static str,
    method: &'static str,
    path: &'static str,
    headers: &'static [&'static str],
    want: &'static str,
}

#[test]
fn an_authorization_matrix_of_sources_operations_conditions_and_actions() {
    with_cluster("waypoint_authz_matrix", 2, |c| {
        let mesh = Mesh::start_with_mesh_config(
            c,
            Some(
                "extensionProviders:\n- name: ext\n  envoyExtAuthzHttp:\n    service: ext-authz.shop.svc.cluster.local\n    port: 8000\n    timeout: 2s\n    includeRequestHeadersInCheck: [x-ext-authz]\n",
            ),
        )?;
        let shop = shop(c, &mesh)?;
        let mut clients = std::collections::BTreeMap::new();
        clients.insert("shop", shop.client.clone());
        for ns in ["dev", "ops"] {
            mesh.namespace(ns, true)?;
            let name = format!("{ns}-client");
            let p = c.add_pod(&c.nodes()[0], ns, &name, &name, &[])?;
            mesh.register_pod(c, &p)?;
            mesh.wait_captured(c, &p, true)?;
            clients.insert(ns, p);
        }
        let mut authorizer = external_authorizer(c, &mesh)?;
        let policy = |name: &str, body: &str| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n{body}---\n"
            )
        };
        let web = "  targetRefs: [{group: \"\", kind: Service, name: web}]\n";
        let gw =
            "  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n";
        let mut all = String::from(
            "apiVersion: v1\nkind: Service\nmetadata: {name: ext-authz, namespace: shop}\nspec:\n  clusterIP: 10.96.0.30\n  selector: {app: ext-authz}\n  ports: [{name: http, port: 8000, targetPort: 8000}]\n---\n",
        );
        // The seed's DENY of POST from dev (namespace-wide).
        all += &policy(
            "no-post-from-dev",
            "  action: DENY\n  rules: [{from: [{source: {namespaces: [dev]}}], to: [{operation: {methods: [POST]}}]}]\n",
        );
        all += &policy(
            "allow",
            &format!(
                "{web}  action: ALLOW\n  rules:\n  - from: [{{source: {{namespaces: [shop]}}}}]\n  - from: [{{source: {{namespaces: [dev]}}}}]\n    to: [{{operation: {{methods: [GET], paths: [\"/public/*\", \"/items/{{*}}/view\"]}}}}]\n  - from: [{{source: {{principals: [\"cluster.local/ns/ops/*\"]}}}}]\n    when: [{{key: \"request.headers[x-ticket]\", values: [\"*\"]}}]\n"
            ),
        );
        all += &policy(
            "admin-for-ops",
            &format!(
                "{gw}  action: DENY\n  rules: [{{from: [{{source: {{notNamespaces: [ops]}}}}], to: [{{operation: {{paths: [\"/admin*\"]}}}}]}}]\n"
            ),
        );
        all += &policy(
            "blocked",
            &format!(
                "{web}  action: DENY\n  rules: [{{when: [{{key: \"request.headers[x-block]\", values: [\"yes\"]}}]}}]\n"
            ),
        );
        all += &policy(
            "guarded",
            &format!(
                "{web}  action: CUSTOM\n  provider: {{name: ext}}\n  rules: [{{to: [{{operation: {{paths: [\"/guarded/*\"]}}}}]}}]\n"
            ),
        );
        all += &format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: dry, namespace: shop, annotations: {{istio.io/dry-run: \"true\"}}}}\nspec:\n{web}  action: DENY\n  rules: [{{to: [{{operation: {{paths: [\"/public/dry\"]}}}}]}}]\n---\n"
        );
        all += &policy(
            "audit-deletes",
            &format!(
                "{web}  action: AUDIT\n  rules: [{{to: [{{operation: {{methods: [DELETE]}}}}]}}]\n"
            ),
        );
        mesh.apply("matrix.yaml", &all)?;

        let run = |k: &Case| -> Result<String> {
            let mut extra = vec!["--method", k.method];
            for h in k.headers {
                extra.extend(["--header", h]);
            }
            let r = http(
                c,
                &clients[k.from],
                &format!("http://10.96.0.10{}", k.path),
                1,
                &extra,
            )?;
            Ok(first_status(&r))
        };
        let case = |from, method, path, headers, want| Case {
            from,
            method,
            path,
            headers,
            want,
        };
        eventually(
            "the policies to be in force",
            Duration::from_secs(30),
            || {
                Ok(run(&case("dev", "GET", "/", &[], "403"))? == "403"
                    && run(&case("shop", "GET", "/guarded/x", &[], "403"))? == "403")
            },
        )?;
        let t: &[&str] = &["x-ticket: 1"];
        let cases = [
            // shop: allowed by namespace, except what DENY, CUSTOM and the Gateway's DENY say.
            case("shop", "GET", "/", &[], "200"),
            case("shop", "POST", "/", &[], "200"),
            case("shop", "DELETE", "/", &[], "200"),
            case("shop", "PUT", "/anything", &[], "200"),
            case("shop", "GET", "/admin", &[], "403"),
            case("shop", "GET", "/admin/x", &[], "403"),
            case("shop", "GET", "/Admin", &[], "200"),
            case("shop", "GET", "/", &["x-block: yes"], "403"),
            case("shop", "GET", "/", &["x-block: no"], "200"),
            case("shop", "GET", "/guarded/x", &[], "403"),
            case("shop", "GET", "/guarded/x", &["x-ext-authz: allow"], "200"),
            case("shop", "GET", "/guarded/x", &["x-ext-authz: deny"], "403"),
            case("shop", "GET", "/public/dry", &[], "200"),
            // dev: GET on /public/* and /items/{*}/view only; never POST.
            case("dev", "GET", "/public/a", &[], "200"),
            case("dev", "GET", "/public/", &[], "200"),
            case("dev", "GET", "/items/42/view", &[], "200"),
            case("dev", "GET", "/items/42/edit", &[], "403"),
            case("dev", "GET", "/items/42/x/view", &[], "403"),
            case("dev", "POST", "/public/a", &[], "403"),
            case("dev", "PUT", "/public/a", &[], "403"),
            case("dev", "DELETE", "/public/a", &[], "403"),
            case("dev", "GET", "/", &[], "403"),
            case("dev", "GET", "/admin", &[], "403"),
            case("dev", "GET", "/PUBLIC/a", &[], "403"),
            case("dev", "GET", "/public/a", &["x-block: yes"], "403"),
            case("dev", "GET", "/public/../admin", &[], "403"),
            case("dev", "GET", "//public/a", &[], "200"),
            case("dev", "GET", "/public/%61", &[], "200"),
            case("dev", "GET", "/guarded/x", &["x-ext-authz: allow"], "403"),
            // ops: allowed with a ticket header; the only ones allowed on /admin.
            case("ops", "GET", "/", &[], "403"),
            case("ops", "GET", "/", t, "200"),
            case("ops", "GET", "/admin", t, "200"),
            case("ops", "POST", "/admin", t, "200"),
            case("ops", "GET", "/admin", &[], "403"),
            case(
                "ops",
                "GET",
                "/admin",
                &["x-ticket: 1", "x-block: yes"],
                "403",
            ),
            case("ops", "PATCH", "/", t, "200"),
            case("ops", "GET", "/guarded/z", t, "403"),
            case(
                "ops",
                "GET",
                "/guarded/z",
                &["x-ticket: 1", "x-ext-authz: allow"],
                "200",
            ),
            case("ops", "GET", "/public/dry", t, "200"),
        ];
        let mut wrong = Vec::new();
        for k in &cases {
            let got = run(k)?;
            if got != k.want {
                wrong.push(format!(
                    "{} {} {} {:?}: {got}, want {}",
                    k.from, k.method, k.path, k.headers, k.want
                ));
            }
        }
        // TCP (the echo port) is judged on connection attributes only: the DENY policies
        // whose rules name HTTP fields (paths, a header) count as matching — they deny at
        // least what was written — so every TCP connection here is denied, shop's too.
        let echoed = |from: &str| -> Result<bool> {
            let mut cmd = testapp();
            cmd.args([
                "tcp",
                "10.96.0.10:9000",
                "--message",
                "hi",
                "--timeout",
                "5",
            ]);
            Ok(match c.run(&clients[from], "tcp", cmd) {
                Ok(out) => {
                    serde_json::from_str::<Value>(out.trim())
                        .with_context(|| format!("not JSON: {out}"))?["reply"]
                        == "hi"
                }
                Err(_) => false,
            })
        };
        for from in ["shop", "dev", "ops"] {
            if echoed(from)? {
                wrong.push(format!("{from} TCP: echoed, want denied"));
            }
        }
        ensure!(
            wrong.is_empty(),
            "{} of {} cases wrong:\n{}",
            wrong.len(),
            cases.len() + 3,
            wrong.join("\n")
        );
        eventually(
            "the AUDIT and dry-run lines",
            Duration::from_secs(5),
            || {
                let out = shop.wp.output();
                Ok(out.contains("AUDIT policy matched") && out.contains("would-deny"))
            },
        )?;
        let _ = (&shop.s1, &shop.s2, &mut authorizer);
        Ok(())
    });
}

#[test]
fn the_secure_default_keeps_calls_within_the_namespace_unless_allowed() {
    with_cluster("waypoint_secure_default", 2, |c| {
        let mesh = Mesh::start_with_mesh_config(c, Some("secureDefault: true\n"))?;
        let shop = shop(c, &mesh)?;
        mesh.namespace("dev", true)?;
        let dev = c.add_pod(&c.nodes()[0], "dev", "dev-client", "dev-client", &[])?;
        mesh.register_pod(c, &dev)?;
        mesh.wait_captured(c, &dev, true)?;
        // What each client gets from a URL: the status, or "refused" when no HTTP answer
        // comes (the connection refused by ztunnel's policy).
        let status = |from: &Pod, url: &str, extra: &[&str]| -> String {
            match http(c, from, url, 1, extra) {
                Ok(r) => first_status(&r),
                Err(_) => "refused".into(),
            }
        };
        let web = "http://10.96.0.10/"; // through the waypoint
        let v1 = "http://10.96.0.11/"; // no waypoint: ztunnel decides
        eventually("shop's own calls to pass", Duration::from_secs(20), || {
            Ok(status(&shop.client, web, &[]) == "200" && status(&shop.client, v1, &[]) == "200")
        })?;
        ensure!(status(&dev, web, &[]) == "403", "dev through the waypoint");
        ensure!(
            status(&dev, v1, &[]) == "refused",
            "dev to a Service without waypoint"
        );
        // An ALLOW policy allows more: dev to web (at the waypoint) and to the pods (ztunnel).
        mesh.apply(
            "allow-dev.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow-dev, namespace: shop}\nspec:\n  action: ALLOW\n  rules: [{from: [{source: {namespaces: [dev]}}]}]\n",
        )?;
        eventually("dev allowed by the policy", Duration::from_secs(20), || {
            Ok(status(&dev, web, &[]) == "200" && status(&dev, v1, &[]) == "200")
        })?;
        // Where a RequestAuthentication applies, a token is required.
        mesh.apply(
            "jwt.yaml",
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: shop}\nspec:\n  targetRefs: [{group: \"\", kind: Service, name: web}]\n  jwtRules: [{issuer: \"https://issuer.example.com\", jwks: '{\"keys\": []}'}]\n",
        )?;
        eventually("a token to be required", Duration::from_secs(20), || {
            Ok(status(&shop.client, web, &[]) == "401")
        })?;
        ensure!(
            status(&shop.client, v1, &[]) == "200",
            "no RequestAuthentication there"
        );
        let _ = (&shop.s1, &shop.s2, &shop.wp, &shop.waypoint);
        Ok(())
    });
}

#[test]
fn masked_values_never_reach_the_waypoint_logs() {
    with_cluster("waypoint_masking", 2, |c| {
        let mesh = Mesh::start(c)?;
        // As the controller passes the mesh config's accessLogMasking.regexes and
        // auditLog.allows.
        let shop = shop_with(
            c,
            &mesh,
            &["--mask-regex", r"\b[0-9]{13,16}\b", "--audit-allows"],
        )?;
        mesh.apply(
            "deny-pay.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-refunds, namespace: shop}\nspec:\n  targetRefs: [{group: \"\", kind: Service, name: web}]\n  action: DENY\n  rules: [{to: [{operation: {paths: [\"/refund/*\"]}}]}]\n",
        )?;
        let card = "4111111111111111";
        eventually("the refund to be denied", Duration::from_secs(20), || {
            let r = http(
                c,
                &shop.client,
                &format!("http://10.96.0.10/refund/{card}"),
                1,
                &[],
            );
            // (Until the Service is known the request may not get through at all.)
            Ok(r.is_ok_and(|r| count(&r, "statuses", "403") == 1))
        })?;
        http(
            c,
            &shop.client,
            &format!("http://10.96.0.10/pay?card={card}"),
            1,
            &["--expect-status", "200"],
        )?;
        eventually(
            "both requests in the access log",
            Duration::from_secs(5),
            || {
                let out = shop.wp.output();
                Ok(out.contains("/pay?card=****") && out.contains("/refund/****"))
            },
        )?;
        // The audit trail: the deny and (auditLog.allows) the allow, each one line naming
        // who, what and the decision.
        eventually("both decisions audited", Duration::from_secs(5), || {
            let out = shop.wp.output();
            let line = |what: &str| {
                out.lines().any(|l| {
                    l.contains(what)
                        && l.contains(r#""principal":"cluster.local/ns/shop/sa/client""#)
                        && l.contains(r#""method":"GET""#)
                        && l.contains(r#""target":"audit""#)
                })
            };
            Ok(line("request denied by policy") && line("request allowed by policy"))
        })?;
        ensure!(
            !shop.wp.output().contains(card),
            "a masked value reached the waypoint's log"
        );
        let _ = (&shop.s1, &shop.s2);
        Ok(())
    });
}

#[test]
fn the_end_users_token_is_checked_again_at_the_next_hop() {
    with_cluster("waypoint_jwt_hops", 2, |c| {
        let mesh = Mesh::start(c)?;
        let shop = shop(c, &mesh)?;
        let k1 = idp_key("k1");
        let (idp, _idp_server, _) = identity_provider(c, &mesh, &[&k1], None)?;
        // A second Service bound to the waypoint: web's pods call it with the end user's
        // token (`/forward/10.96.0.20:80/...`), so the request crosses the waypoint twice.
        let rules = |forward: bool| {
            format!(
                "  jwtRules:\n  - issuer: \"https://issuer.example.com\"\n    jwksUri: \"http://{}:8080/keys\"\n    forwardOriginalToken: {forward}\n",
                idp.ip
            )
        };
        let ra_web = |forward: bool| {
            format!(
                "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: web, namespace: shop}}\nspec:\n  targetRefs: [{{group: \"\", kind: Service, name: web}}]\n{}",
                rules(forward)
            )
        };
        mesh.apply("web-jwt.yaml", &ra_web(true))?;
        mesh.apply(
            "api.yaml",
            &format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: api, namespace: shop, labels: {{istio.io/use-waypoint: waypoint}}}}\nspec:\n  clusterIP: 10.96.0.20\n  selector: {{app: web, version: v2}}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {{name: api, namespace: shop}}\nspec:\n  targetRefs: [{{group: \"\", kind: Service, name: api}}]\n{}---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: api-needs-a-user, namespace: shop}}\nspec:\n  targetRefs: [{{group: \"\", kind: Service, name: api}}]\n  action: ALLOW\n  rules: [{{from: [{{source: {{requestPrincipals: [\"https://issuer.example.com/*\"]}}}}]}}]\n",
                rules(false)
            ),
        )?;
        let claims = serde_json::json!({
            "iss": "https://issuer.example.com", "sub": "alice", "exp": unix_now() + 600,
        });
        let token = sign(&k1, "k1", &claims);
        let call = |token: Option<&str>| -> Result<String> {
            let auth = token.map(|t| format!("authorization: Bearer {t}"));
            let mut extra = Vec::new();
            if let Some(a) = &auth {
                extra.extend(["--header", a.as_str()]);
            }
            let r = http(
                c,
                &shop.client,
                "http://10.96.0.10/forward/10.96.0.20:80/hello",
                1,
                &extra,
            )?;
            Ok(first_status(&r))
        };
        eventually(
            "the second hop to require the end user",
            Duration::from_secs(20),
            || Ok(call(None)? == "403"),
        )?;
        ensure!(
            call(Some(&token))? == "200",
            "the forwarded token passes both hops"
        );
        ensure!(
            call(Some("not.a.token"))? == "401",
            "an invalid token stops at the first hop"
        );
        // Without forwardOriginalToken the first waypoint strips the token: the next hop
        // sees no end user.
        mesh.apply("web-jwt.yaml", &ra_web(false))?;
        eventually(
            "the token to be stripped at the first hop",
            Duration::from_secs(20),
            || Ok(call(Some(&token))? == "403"),
        )?;
        let _ = (&shop.s1, &shop.s2, &shop.wp);
        Ok(())
    });
}

/// The seed articles' policies, applied unchanged (`examples/seed-policies.yaml`): in `foo`
/// behind a waypoint, the DENY of `POST` from `dev` denies exactly that, and the
/// RequestAuthentication's `jwksUri` (`https://issuer.example.com/keys`) is fetched over
/// HTTPS from an identity provider pod. The cluster has no DNS server: the waypoint pod's
/// /etc/hosts names the provider (a pod's `hostAliases`), and the waypoint trusts the
/// provider's CA through `--jwks-ca-file` (`SSL_CERT_FILE`), as a Deployment mounting a CA
/// bundle would.
#[test]
fn the_seed_articles_policies_work_as_written_at_the_waypoint() {
    with_cluster("waypoint_seed", 2, |c| {
        let (n1, n2) = (&c.nodes()[0], &c.nodes()[1]);
        let mesh = Mesh::start(c)?;
        // The identity provider's web PKI: a CA of its own and a certificate for its name.
        let ca = trellis_core::testing::TestCa::named("example.com", "Example issuer CA");
        let (chain, key) = ca.issue_dns("issuer.example.com");
        let dir = c.log_dir();
        let (cert_file, key_file, ca_file) = (
            dir.join("issuer.crt"),
            dir.join("issuer.key"),
            dir.join("issuer-ca.crt"),
        );
        std::fs::write(&cert_file, pem("CERTIFICATE", &chain[0]))?;
        std::fs::write(&key_file, pem("PRIVATE KEY", key.secret_der()))?;
        std::fs::write(&ca_file, ca.root_pem())?;
        let k1 = idp_key("k1");
        let (idp, _idp_server, _) =
            identity_provider(c, &mesh, &[&k1], Some((&cert_file, &key_file)))?;

        mesh.namespace("foo", true)?;
        mesh.namespace("dev", true)?;
        let app = c.add_pod(n2, "foo", "my-app", "my-app", &[("app", "my-app")])?;
        let foo_client = c.add_pod(n1, "foo", "client", "client", &[])?;
        let dev = c.add_pod(n1, "dev", "client", "client", &[])?;
        for p in [&app, &foo_client, &dev] {
            mesh.register_pod(c, p)?;
            mesh.wait_captured(c, p, true)?;
        }
        let _app_server = serve(c, &app)?;
        let ca_path = ca_file.to_str().context("CA file path")?;
        let (waypoint, _wp) = mesh.start_waypoint(
            c,
            n1,
            "foo",
            "waypoint",
            "10.96.0.51",
            &["--jwks-ca-file", ca_path],
        )?;
        c.add_host_alias(&waypoint, "issuer.example.com", idp.ip.into())?;
        mesh.apply(
            "my-app.yaml",
            "apiVersion: v1\nkind: Service\nmetadata: {name: my-app, namespace: foo, labels: {istio.io/use-waypoint: waypoint}}\nspec:\n  clusterIP: 10.96.0.20\n  selector: {app: my-app}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
        )?;
        mesh.apply(
            "seed.yaml",
            include_str!("../../examples/seed-policies.yaml"),
        )?;
        wait_route(
            &mesh,
            c,
            &waypoint,
            "foo/my-app.foo.svc.cluster.local:80",
            0,
        )?;

        let call = |from: &Pod, method: &str, token: Option<&str>| -> Result<(String, Value)> {
            let auth = token.map(|t| format!("authorization: Bearer {t}"));
            let mut extra = vec!["--method", method];
            if let Some(a) = &auth {
                extra.extend(["--header", a.as_str()]);
            }
            let r = http(c, from, "http://10.96.0.20/", 1, &extra)?;
            Ok((first_status(&r), r["last_body"].clone()))
        };
        let claims = |extra: Value| {
            let mut v = serde_json::json!({
                "iss": "https://issuer.example.com", "sub": "alice", "exp": unix_now() + 600,
            });
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        let valid = sign(&k1, "k1", &claims(serde_json::json!({})));
        // The keys come from https://issuer.example.com/keys: a valid token is accepted
        // once they are fetched (the policies are in place by then).
        eventually(
            "a valid token to be accepted",
            Duration::from_secs(20),
            || Ok(call(&foo_client, "GET", Some(&valid)).is_ok_and(|(s, _)| s == "200")),
        )?;
        let (code, body) = call(&dev, "POST", None)?;
        ensure!(code == "403", "POST from dev: {code} {body}");
        ensure!(body == "RBAC: access denied\n", "the denial's body: {body}");
        for (what, from, method) in [
            ("GET from dev", &dev, "GET"),
            ("POST from foo", &foo_client, "POST"),
            ("GET from foo", &foo_client, "GET"),
        ] {
            let (code, body) = call(from, method, None)?;
            ensure!(code == "200", "{what}: {code} {body}");
        }
        ensure!(
            call(&dev, "POST", Some(&valid))?.0 == "403",
            "a valid token does not lift the DENY of POST from dev"
        );
        ensure!(
            call(&dev, "GET", Some(&valid))?.0 == "200",
            "GET from dev with a valid token"
        );
        for (what, token) in [
            (
                "expired",
                sign(
                    &k1,
                    "k1",
                    &claims(serde_json::json!({"exp": unix_now() - 600})),
                ),
            ),
            (
                "wrong issuer",
                sign(
                    &k1,
                    "k1",
                    &claims(serde_json::json!({"iss": "https://evil.example"})),
                ),
            ),
            (
                "bad signature",
                sign(&idp_key("k1"), "k1", &claims(serde_json::json!({}))),
            ),
            (
                "unknown key",
                sign(&idp_key("k9"), "k9", &claims(serde_json::json!({}))),
            ),
            ("malformed", "not.a.token".to_string()),
        ] {
            let (code, body) = call(&foo_client, "GET", Some(&token))?;
            ensure!(code == "401", "{what}: {code} {body}");
        }
        Ok(())
    });
}

/// Retries (issue 16): an HTTPRoute rule's `retry` masks a backend that fails half its
/// requests, and the retry budget keeps a backend that fails everything from being
/// hammered (the attempts its server counts stay close to what the client sent).
#[test]
fn retries_mask_a_flaky_backend_and_the_budget_spares_a_failing_one() {
    with_cluster("waypoint_retries", 2, |c| {
        let mesh = Mesh::start(c)?;
        let shop = shop(c, &mesh)?;
        mesh.apply(
            "retry-route.yaml",
            r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /flaky}}]
      retry: {codes: [503], attempts: 10, backoff: 1ms}
      backendRefs: [{name: web-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /status}}]
      retry: {codes: [503], attempts: 5, backoff: 1ms}
      backendRefs: [{name: web-v2, port: 80}]
"#,
        )?;
        wait_route(
            &mesh,
            c,
            &shop.waypoint,
            "shop/web.shop.svc.cluster.local:80",
            2,
        )?;
        let requests = |out: &str, what: &str| {
            out.lines()
                .filter(|l| l.starts_with(&format!("request GET {what}")))
                .count()
        };
        // Half of web-v1's answers are 503: the client sees (nearly) only 200s.
        let r = http(c, &shop.client, "http://10.96.0.10/flaky/50", 1000, &[])?;
        let ok = count(&r, "statuses", "200");
        ensure!(ok >= 990, "{ok} of 1000 succeeded: {r}");
        let served = requests(&shop.s1.output(), "/flaky/50");
        ensure!(
            served > 1200,
            "web-v1 saw {served} requests: the failures were not retried"
        );

        // web-v2 answers 503 to everything: each request would be tried 6 times without
        // a budget; with it, about once.
        let sent = 300;
        let r = http(c, &shop.client, "http://10.96.0.10/status/503", sent, &[])?;
        ensure!(
            count(&r, "statuses", "503") == sent as u64,
            "a failing backend's status reaches the client: {r}"
        );
        eventually(
            "web-v2's server to have logged every attempt",
            Duration::from_secs(5),
            || Ok(requests(&shop.s2.output(), "/status/503") >= sent),
        )?;
        std::thread::sleep(Duration::from_millis(500));
        let attempts = requests(&shop.s2.output(), "/status/503");
        ensure!(
            // (The budget's allowance, `trellis_waypoint::retry::ALLOWANCE`, is 10 retries
            // per 10 s window; the run spans at most two windows.)
            attempts <= sent + 2 * 10,
            "web-v2 got {attempts} attempts for {sent} requests: retries amplified the outage"
        );
        wait_logged(&shop.wp, &["/status/503", "URX"])?;
        Ok(())
    });
}

/// A DestinationRule (issue 16) at the waypoint: its connection-pool limits answer 503
/// `UO` past the configured concurrency (against a backend that holds requests), and its
/// outlier detection ejects the endpoint that keeps failing, then lets it back after the
/// ejection time.
#[test]
fn a_destination_rule_breaks_the_circuit_and_ejects_a_failing_endpoint() {
    with_cluster("waypoint_dr", 2, |c| {
        let mesh = Mesh::start(c)?;
        let shop = shop(c, &mesh)?;
        mesh.apply(
            "dr.yaml",
            r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: shop}
spec:
  host: web.shop.svc.cluster.local
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3, baseEjectionTime: 4s, maxEjectionPercent: 50}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-v1, namespace: shop}
spec:
  host: web-v1
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 2}
      http: {http1MaxPendingRequests: 1, http2MaxRequests: 3}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
    - matches: [{path: {type: PathPrefix, value: /delay}}]
      backendRefs: [{name: web-v1, port: 80}]
"#,
        )?;
        eventually(
            "the waypoint to have the traffic policies",
            Duration::from_secs(20),
            || {
                let r = dumped_route(&mesh, c, &shop.waypoint, WEB_80)?;
                Ok(!r["traffic_policy"].is_null()
                    && r["rules"].as_array().is_some_and(|x| x.len() == 1))
            },
        )?;

        // Six at once to a backend that holds each for 1.5 s: three are let through
        // (two on connections, one waiting for one), three overflow.
        let statuses: Vec<String> = std::thread::scope(|s| {
            let calls: Vec<_> = (0..6)
                .map(|_| {
                    s.spawn(|| {
                        http(c, &shop.client, "http://10.96.0.10/delay/1500", 1, &[])
                            .map(|r| first_status(&r))
                            .unwrap_or_else(|e| format!("error {e:#}"))
                    })
                })
                .collect();
            calls.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let overflowed = statuses.iter().filter(|s| *s == "503").count();
        let served = statuses.iter().filter(|s| *s == "200").count();
        ensure!(
            (overflowed, served) == (3, 3),
            "the circuit breaker: {statuses:?}"
        );
        wait_logged(&shop.wp, &["/delay/1500", "\"UO\""])?;

        // web-v1 fails every request to /fail-on/web-v1: after three in a row it is
        // ejected, and web-v2 takes everything.
        let hits = |p: &Proc| {
            p.output()
                .lines()
                .filter(|l| l.starts_with("request GET /fail-on/web-v1"))
                .count()
        };
        let r = http(c, &shop.client, "http://10.96.0.10/fail-on/web-v1", 20, &[])?;
        ensure!(
            count(&r, "statuses", "200") == 20,
            "retries and ejection keep the failing endpoint from the client: {r}"
        );
        let before = hits(&shop.s1);
        let r = http(c, &shop.client, "http://10.96.0.10/fail-on/web-v1", 40, &[])?;
        ensure!(count(&r, "statuses", "200") == 40, "{r}");
        let during = hits(&shop.s1) - before;
        ensure!(
            during == 0,
            "the ejected endpoint got {during} of 40 requests"
        );
        ensure!(
            (1..=3).contains(&before),
            "ejected after three failures (web-v1 saw {before})"
        );
        // After the ejection time it is tried again.
        std::thread::sleep(Duration::from_millis(4500));
        let again = hits(&shop.s1);
        http(c, &shop.client, "http://10.96.0.10/fail-on/web-v1", 20, &[])?;
        ensure!(
            hits(&shop.s1) > again,
            "the endpoint did not come back after its ejection time"
        );
        Ok(())
    });
}

/// A LocalTrafficPolicy (issue 16) at the waypoint: a token bucket on the Service answers
/// 429 with `retry-after` past its budget and recovers after a fill; fault injection on
/// one HTTPRoute rule delays and aborts its share of 1,000 requests (±3 points) and
/// leaves the other rules alone.
#[test]
fn a_local_traffic_policy_limits_the_rate_and_injects_faults() {
    with_cluster("waypoint_local", 2, |c| {
        let mesh = Mesh::start(c)?;
        let shop = shop(c, &mesh)?;
        mesh.apply(
            "route.yaml",
            r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
    - name: faulty
      matches: [{path: {type: PathPrefix, value: /faulty}}]
      backendRefs: [{name: web-v1, port: 80}]
    - name: calm
      matches: [{path: {type: PathPrefix, value: /calm}}]
      backendRefs: [{name: web-v1, port: 80}]
"#,
        )?;
        mesh.apply(
            "local.yaml",
            r#"apiVersion: trellis.dev/v1alpha1
kind: LocalTrafficPolicy
metadata: {name: limit, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: web, sectionName: http}]
  rateLimit: {tokens: 10, tokensPerFill: 5, fillInterval: 2s}
"#,
        )?;
        let dump_route = || dumped_route(&mesh, c, &shop.waypoint, WEB_80);
        eventually(
            "the waypoint to have the Service's rate limit",
            Duration::from_secs(20),
            || {
                let r = dump_route()?;
                Ok(r["rate_limit"] == true && r["rules"].as_array().is_some_and(|x| x.len() == 2))
            },
        )?;

        // 30 requests in well under a fill interval: the bucket's 10 (15 if a fill falls
        // inside), the rest 429 with retry-after.
        let r = http(c, &shop.client, "http://10.96.0.10/anything", 30, &[])?;
        let ok = count(&r, "statuses", "200");
        let limited = count(&r, "statuses", "429");
        ensure!(
            (ok == 10 || ok == 15) && ok + limited == 30,
            "the bucket let {ok} through and limited {limited}: {r}"
        );
        let retry_after = r["last_headers"]["retry-after"]
            .as_str()
            .unwrap_or_default();
        ensure!(
            retry_after == "1" || retry_after == "2",
            "a limited response's retry-after: {r}"
        );
        // The bucket is the port's: a rule's requests draw from it too.
        let r = http(c, &shop.client, "http://10.96.0.10/calm/x", 1, &[])?;
        ensure!(first_status(&r) == "429", "{r}");
        // After a fill, requests pass again.
        std::thread::sleep(Duration::from_millis(2200));
        let r = http(c, &shop.client, "http://10.96.0.10/anything", 5, &[])?;
        ensure!(
            count(&r, "statuses", "200") == 5,
            "the bucket did not refill: {r}"
        );
        wait_logged(&shop.wp, &["/anything", "\"RL\""])?;

        // The policy replaced by fault injection on the rule named `faulty`.
        mesh.apply(
            "local.yaml",
            r#"apiVersion: trellis.dev/v1alpha1
kind: LocalTrafficPolicy
metadata: {name: chaos, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: web, sectionName: faulty}]
  fault:
    delay: {fixedDelay: 50ms, percentage: 10}
    abort: {httpStatus: 503, percentage: 5}
"#,
        )?;
        eventually(
            "the waypoint to have the rule's fault",
            Duration::from_secs(20),
            || {
                let r = dump_route()?;
                Ok(r["rate_limit"] == false
                    && r["rules_with_local_policy"] == serde_json::json!(["shop/web/0"]))
            },
        )?;
        let sent = 1000;
        let r = http(
            c,
            &shop.client,
            "http://10.96.0.10/faulty/x",
            sent,
            &["--slow-ms", "50", "--timeout", "120"],
        )?;
        let aborted = count(&r, "statuses", "503");
        let ok = count(&r, "statuses", "200");
        let slow = r["slow"].as_u64().unwrap_or(0);
        ensure!(
            aborted + ok == sent as u64,
            "only 200s and injected 503s: {r}"
        );
        ensure!(
            (20..=80).contains(&aborted),
            "{aborted} of {sent} aborted, not 5% ± 3 points: {r}"
        );
        ensure!(
            (70..=130).contains(&slow),
            "{slow} of {sent} took 50 ms or more, not 10% ± 3 points: {r}"
        );
        // The injected 503s are the waypoint's own: the backend never saw them.
        let served = shop
            .s1
            .output()
            .lines()
            .filter(|l| l.starts_with("request GET /faulty/x"))
            .count() as u64;
        ensure!(
            served == ok,
            "web-v1 served {served} requests, the client got {ok} 200s"
        );
        // Another rule of the route is not touched.
        let r = http(
            c,
            &shop.client,
            "http://10.96.0.10/calm/x",
            200,
            &["--slow-ms", "50"],
        )?;
        ensure!(
            count(&r, "statuses", "200") == 200 && r["slow"].as_u64() < Some(10),
            "{r}"
        );
        wait_logged(&shop.wp, &["/faulty/x", "FI\""])?;
        wait_logged(&shop.wp, &["/faulty/x", "\"DI"])?;
        Ok(())
    });
}

/// Tracing (issue 16): the waypoint exports a span per request over OTLP/gRPC to a
/// collector the test runs; the span continues the client's trace (its parent is the
/// client's span), and the backend receives the waypoint's span as its parent — the links
/// across the waypoint. New traces are sampled at the configured rate (100% here); an
/// unsampled parent is honoured (no span, header passed on unchanged).
#[test]
fn spans_reach_an_otlp_collector_with_links_across_the_waypoint() {
    with_cluster("waypoint_tracing", 2, |c| {
        let mesh = Mesh::start(c)?;
        // The collector: a pod outside the mesh, as an OpenTelemetry Collector would be.
        let otel = c.add_pod(&c.nodes()[1], "observability", "otel", "otel", &[])?;
        let mut cmd = testapp();
        cmd.args(["otlp-collector", "--listen", "0.0.0.0:4317"]);
        let mut collector = c.spawn(&otel, "otel", cmd)?;
        collector.wait_for_output("listening otlp", Duration::from_secs(10))?;
        let endpoint = format!("http://{}:4317", otel.ip);
        let shop = shop_with(
            c,
            &mesh,
            &["--tracing-endpoint", &endpoint, "--tracing-sampling", "100"],
        )?;
        wait_route(
            &mesh,
            c,
            &shop.waypoint,
            "shop/web.shop.svc.cluster.local:80",
            0,
        )?;
        let spans = |collector: &Proc| -> Vec<Value> {
            collector
                .output()
                .lines()
                .filter_map(|l| l.strip_prefix("span "))
                .filter_map(|j| serde_json::from_str(j).ok())
                .collect()
        };
        let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let client_span = "00f067aa0ba902b7";
        let r = eventually_value(
            "a traced request to be served",
            Duration::from_secs(20),
            || {
                let r = http(
                    c,
                    &shop.client,
                    "http://10.96.0.10/traced",
                    1,
                    &[
                        "--header",
                        &format!("traceparent: 00-{trace}-{client_span}-01"),
                    ],
                )?;
                Ok((first_status(&r) == "200").then_some(r))
            },
        )?;
        // What the backend got: the same trace, a new parent (the waypoint's span).
        let upstream = r["last_body"]["headers"]["traceparent"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let parts: Vec<&str> = upstream.split('-').collect();
        ensure!(
            parts.len() == 4 && parts[1] == trace && parts[2] != client_span && parts[3] == "01",
            "the backend's traceparent: {upstream:?}"
        );
        let waypoint_span = parts[2].to_string();
        let span = eventually_value(
            "the waypoint's span at the collector",
            Duration::from_secs(10),
            || {
                Ok(spans(&collector)
                    .into_iter()
                    .find(|s| s["trace_id"] == trace && s["attributes"]["url.path"] == "/traced"))
            },
        )?;
        ensure!(
            span["span_id"] == waypoint_span.as_str()
                && span["parent_span_id"] == client_span
                && span["service"] == "waypoint.shop"
                && span["kind"] == 2
                && span["attributes"]["http.response.status_code"] == 200
                && span["attributes"]["http.request.method"] == "GET"
                && span["attributes"]["upstream_cluster"] == "web.shop.svc.cluster.local",
            "the waypoint's span links the client's to the backend's: {span}"
        );
        ensure!(
            span["end"].as_u64() >= span["start"].as_u64() && span["start"].as_u64() > Some(0),
            "{span}"
        );

        // No traceparent: a new trace, sampled (100%), a root span.
        let r = http(c, &shop.client, "http://10.96.0.10/fresh", 3, &[])?;
        ensure!(count(&r, "statuses", "200") == 3, "{r}");
        let fresh = eventually_value("three root spans", Duration::from_secs(10), || {
            let roots: Vec<Value> = spans(&collector)
                .into_iter()
                .filter(|s| s["attributes"]["url.path"] == "/fresh")
                .collect();
            Ok((roots.len() == 3).then_some(roots))
        })?;
        ensure!(
            fresh
                .iter()
                .all(|s| s["parent_span_id"] == "" && s["trace_id"] != trace),
            "{fresh:?}"
        );
        let last = r["last_body"]["headers"]["traceparent"]
            .as_str()
            .unwrap_or_default();
        ensure!(
            fresh.iter().any(|s| {
                last == format!(
                    "00-{}-{}-01",
                    s["trace_id"].as_str().unwrap_or(""),
                    s["span_id"].as_str().unwrap_or("")
                )
            }),
            "the backend's parent is the waypoint's root span: {last} vs {fresh:?}"
        );

        // An unsampled parent is honoured: no span, the header goes on as it was.
        let unsampled = format!("00-{trace}-{client_span}-00");
        let r = http(
            c,
            &shop.client,
            "http://10.96.0.10/unsampled",
            1,
            &["--header", &format!("traceparent: {unsampled}")],
        )?;
        ensure!(
            r["last_body"]["headers"]["traceparent"] == unsampled.as_str(),
            "{r}"
        );
        // A span for a later request arrives; none for the unsampled one.
        http(c, &shop.client, "http://10.96.0.10/after", 1, &[])?;
        eventually_value("the later span", Duration::from_secs(10), || {
            Ok(spans(&collector)
                .into_iter()
                .find(|s| s["attributes"]["url.path"] == "/after"))
        })?;
        ensure!(
            !spans(&collector)
                .iter()
                .any(|s| s["attributes"]["url.path"] == "/unsampled"),
            "a span for an unsampled request"
        );
        Ok(())
    });
}

/// A DestinationRule's `loadBalancer` (issue 16) at the waypoint: a consistent hash on a
/// header keeps each user on one endpoint while users spread over both; ROUND_ROBIN takes
/// the endpoints in turn.
#[test]
fn a_destination_rules_load_balancer_picks_the_endpoint() {
    with_cluster("waypoint_lb", 2, |c| {
        let mesh = Mesh::start(c)?;
        let shop = shop(c, &mesh)?;
        let rule = |lb: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: web, namespace: shop}}\nspec:\n  host: web\n  trafficPolicy:\n    loadBalancer: {lb}\n"
            )
        };
        let has_balancer = |want: &str| -> Result<bool> {
            Ok(
                dumped_route(&mesh, c, &shop.waypoint, WEB_80)?["traffic_policy"]["load_balancer"]
                    == want,
            )
        };
        mesh.apply(
            "dr.yaml",
            &rule("{consistentHash: {httpHeaderName: x-user}}"),
        )?;
        eventually("the waypoint to hash", Duration::from_secs(20), || {
            has_balancer("CONSISTENT_HASH")
        })?;
        let pods = |r: &Value| -> Vec<(String, u64)> {
            r["pods"]
                .as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut endpoints_seen = std::collections::BTreeSet::new();
        for user in [
            "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi",
        ] {
            let r = http(
                c,
                &shop.client,
                "http://10.96.0.10/hashed",
                20,
                &["--header", &format!("x-user: {user}")],
            )?;
            let p = pods(&r);
            ensure!(
                p.len() == 1 && p[0].1 == 20,
                "user {user} was spread over endpoints: {p:?}"
            );
            endpoints_seen.insert(p[0].0.clone());
        }
        ensure!(
            endpoints_seen.len() == 2,
            "eight users all hashed to one endpoint: {endpoints_seen:?}"
        );

        mesh.apply("dr.yaml", &rule("{simple: ROUND_ROBIN}"))?;
        eventually(
            "the waypoint to take turns",
            Duration::from_secs(20),
            || has_balancer("ROUND_ROBIN"),
        )?;
        let r = http(c, &shop.client, "http://10.96.0.10/turns", 40, &[])?;
        ensure!(
            pods(&r).iter().map(|(_, n)| *n).collect::<Vec<_>>() == [20, 20],
            "round robin over two endpoints: {:?}",
            pods(&r)
        );

        // connectionPool.http.maxRequestsPerConnection: 2 — each endpoint's connection is
        // retired after two requests, so its ten requests arrive on five connections
        // (without the limit, on one).
        let ports = |p: &Proc, path: &str| -> std::collections::BTreeSet<String> {
            p.output()
                .lines()
                .filter(|l| l.starts_with(&format!("request GET {path} from ")))
                .filter_map(|l| l.rsplit(' ').next().map(str::to_string))
                .collect()
        };
        let r = http(c, &shop.client, "http://10.96.0.10/reused", 20, &[])?;
        ensure!(count(&r, "statuses", "200") == 20, "{r}");
        ensure!(
            (
                ports(&shop.s1, "/reused").len(),
                ports(&shop.s2, "/reused").len()
            ) == (1, 1),
            "without a limit, one connection per endpoint: {:?} {:?}",
            ports(&shop.s1, "/reused"),
            ports(&shop.s2, "/reused")
        );
        mesh.apply(
            "dr.yaml",
            &rule(
                "{simple: ROUND_ROBIN}\n    connectionPool: {http: {maxRequestsPerConnection: 2}}",
            ),
        )?;
        eventually(
            "the waypoint to limit requests per connection",
            Duration::from_secs(20),
            || {
                Ok(
                    dumped_route(&mesh, c, &shop.waypoint, WEB_80)?["traffic_policy"]["circuit_breaker"]
                        == true,
                )
            },
        )?;
        let r = http(c, &shop.client, "http://10.96.0.10/retired", 20, &[])?;
        ensure!(count(&r, "statuses", "200") == 20, "{r}");
        eventually("both servers to log", Duration::from_secs(5), || {
            Ok(ports(&shop.s1, "/retired").len() + ports(&shop.s2, "/retired").len() >= 10)
        })?;
        ensure!(
            (
                ports(&shop.s1, "/retired").len(),
                ports(&shop.s2, "/retired").len()
            ) == (5, 5),
            "two requests per connection: {:?} {:?}",
            ports(&shop.s1, "/retired"),
            ports(&shop.s2, "/retired")
        );
        Ok(())
    });
}
