//! The data path (issue 6): the same client/server pair through two ztunnels (two nodes,
//! HBONE) and directly (pods of a namespace outside the mesh), in one run, as ratios to
//! direct. Real binaries on the network-namespace cluster; needs root.
//!
//! Scenarios: bulk echo throughput with 1 and 4 parallel streams; request/response
//! ping-pong p50/p99 with 1 B and 1 KiB; a new connection per 1 KiB request p50/p99;
//! ztunnel CPU seconds (both nodes) per GB and per 1,000 requests; ztunnel RSS idle and
//! after the run.
//!
//! Run: `sudo cargo bench -p trellis-bench --bench datapath` (after `cargo build
//! --workspace --release --bins`: it runs the release binaries next to it). Under
//! `cargo test`/nextest it does nothing.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;
use trellis_e2e::app::{cpu_and_rss, testapp};
use trellis_e2e::mesh::Mesh;
use trellis_e2e::{Cluster, Pod};

const BULK: u64 = 512 << 20;
const RR: usize = 2000;

/// Round trips per latency measurement: `DATAPATH_COUNT` overrides (for profiling).
fn rr_count() -> usize {
    std::env::var("DATAPATH_COUNT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RR)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if let Err(e) = run() {
        eprintln!("datapath bench failed: {e:#}");
        std::process::exit(1);
    }
}

/// A `/proc/PID/status` field in kB.
fn status_kb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
}

fn json_out(c: &Cluster, from: &Pod, name: &str, cmd: Command) -> Result<Value> {
    let out = c.run(from, name, cmd)?;
    serde_json::from_str(out.trim()).with_context(|| format!("not JSON: {out}"))
}

/// Bulk echo with `streams` parallel connections; returns Mbit/s (both directions counted
/// once: bytes sent / wall time).
fn bulk(c: &Cluster, from: &Pod, to: &str, streams: usize) -> Result<f64> {
    let per = BULK / streams as u64;
    let t = Instant::now();
    let mut procs = Vec::new();
    for i in 0..streams {
        let mut cmd = testapp();
        cmd.args(["tcp", to, "--bytes", &per.to_string(), "--timeout", "300"]);
        procs.push(c.spawn(from, &format!("bulk-{i}"), cmd)?);
    }
    for mut p in procs {
        let st = p.wait(Duration::from_secs(300))?;
        if !st.success() {
            bail!("bulk stream failed: {}", p.output());
        }
    }
    Ok(BULK as f64 * 8.0 / 1e6 / t.elapsed().as_secs_f64())
}

fn rr(c: &Cluster, from: &Pod, to: &str, size: usize, new_conn: bool) -> Result<(f64, f64)> {
    let mut cmd = testapp();
    cmd.args([
        "rr",
        to,
        "--size",
        &size.to_string(),
        "--count",
        &rr_count().to_string(),
    ]);
    if new_conn {
        cmd.arg("--new-connection");
    }
    let v = json_out(c, from, "rr", cmd)?;
    Ok((
        v["p50_us"].as_f64().unwrap_or(0.0),
        v["p99_us"].as_f64().unwrap_or(0.0),
    ))
}

fn run() -> Result<()> {
    let c = Cluster::builder("bench-datapath").nodes(2).build()?;
    let result = measure(&c);
    if result.is_err() {
        c.mark_failed();
    }
    c.teardown()?;
    result
}

fn measure(c: &Cluster) -> Result<()> {
    let (n1, n2) = (&c.nodes()[0], &c.nodes()[1]);
    let mesh = Mesh::start(c)?;
    mesh.namespace("mesh", true)?;
    mesh.namespace("direct", false)?;
    let mc = c.add_pod(n1, "mesh", "client", "client", &[])?;
    let ms = c.add_pod(n2, "mesh", "server", "server", &[])?;
    let dc = c.add_pod(n1, "direct", "client", "client", &[])?;
    let ds = c.add_pod(n2, "direct", "server", "server", &[])?;
    for p in [&mc, &ms, &dc, &ds] {
        mesh.register_pod(c, p)?;
    }
    mesh.wait_captured(c, &mc, true)?;
    mesh.wait_captured(c, &ms, true)?;
    let mut servers = Vec::new();
    for p in [&ms, &ds] {
        let mut cmd = testapp();
        cmd.args(["serve", "--tcp-echo", "0.0.0.0:9000"]);
        let mut s = c.spawn(p, &format!("{}-server", p.namespace), cmd)?;
        s.wait_for_output("listening", Duration::from_secs(10))?;
        servers.push(s);
    }
    let zt: Vec<u32> = ["node1", "node2"]
        .iter()
        .map(|n| mesh.ztunnel(n).map(|p| p.pid()))
        .collect::<Result<_>>()?;
    let zt_usage = || {
        zt.iter()
            .map(|p| cpu_and_rss(*p))
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1))
    };
    let (_, idle_rss) = zt_usage();
    // The floor: the direct pair with two plain user-space TCP relays in the path (one in
    // a pod on each node, like the two ztunnels), no capture, TLS or HTTP/2. What the mesh
    // adds beyond this is what ztunnel's own work costs.
    let r1 = c.add_pod(n1, "direct", "relay1", "relay", &[])?;
    let r2 = c.add_pod(n2, "direct", "relay2", "relay", &[])?;
    for (p, target) in [
        (&r2, format!("{}:9000", ds.ip)),
        (&r1, format!("{}:9001", r2.ip)),
    ] {
        mesh.register_pod(c, p)?;
        let mut cmd = testapp();
        cmd.args(["relay", "--listen", "0.0.0.0:9001", "--target", &target]);
        let mut s = c.spawn(p, &format!("{}-relay", p.name), cmd)?;
        s.wait_for_output("listening", Duration::from_secs(10))?;
        servers.push(s);
    }
    let mesh_to = format!("{}:9000", ms.ip);
    let direct_to = format!("{}:9000", ds.ip);
    let relay_to = format!("{}:9001", r1.ip);
    // Warm-up: the first HBONE connection and certificates.
    bulk(c, &mc, &mesh_to, 1)?;

    println!("| Scenario | direct | through 2 plain relays (floor) | through 2 ztunnels | ratio |");
    println!("|---|---|---|---|---|");
    // `DATAPATH_ONLY=connect` runs only the new-connection scenario (for profiling it),
    // `DATAPATH_ONLY=latency` ping-pong and new connections, `DATAPATH_ONLY=throughput` the
    // bulk echoes, `DATAPATH_ONLY=pingpong` only ping-pong.
    let only = std::env::var("DATAPATH_ONLY").unwrap_or_default();
    let only_connect = only == "connect";
    let only_throughput = only == "throughput";
    let mut cpu_bulk = 0.0;
    let mut bulk_runs = 0.0;
    for streams in [1usize, 4]
        .into_iter()
        .filter(|_| !only_connect && only != "latency" && only != "pingpong")
    {
        let d = bulk(c, &dc, &direct_to, streams)?;
        let r = bulk(c, &dc, &relay_to, streams)?;
        let (cpu0, _) = zt_usage();
        let m = bulk(c, &mc, &mesh_to, streams)?;
        cpu_bulk += zt_usage().0 - cpu0;
        bulk_runs += 1.0;
        println!(
            "| echo throughput, {streams} stream(s) | {d:.0} Mbit/s | {r:.0} Mbit/s ({:.0}%) | {m:.0} Mbit/s | {:.0}% of direct |",
            100.0 * r / d,
            100.0 * m / d
        );
    }
    // Each bulk run echoes BULK bytes (each byte through each ztunnel both ways); CPU is
    // summed over the runs made.

    let gb = bulk_runs * 2.0 * BULK as f64 / 1e9;
    for (size, label) in [(1usize, "1 B"), (1024, "1 KiB")]
        .into_iter()
        .filter(|_| !only_connect && !only_throughput)
    {
        let (d50, d99) = rr(c, &dc, &direct_to, size, false)?;
        let (r50, r99) = rr(c, &dc, &relay_to, size, false)?;
        let (m50, m99) = rr(c, &mc, &mesh_to, size, false)?;
        println!(
            "| ping-pong {label} p50 / p99 | {d50:.0} / {d99:.0} µs | {r50:.0} / {r99:.0} µs (+{:.0}) | {m50:.0} / {m99:.0} µs | +{:.0} µs p50 |",
            r50 - d50,
            m50 - d50
        );
    }
    let mut cpu_conn = 0.0;
    if !only_throughput && only != "pingpong" {
        let (d50, d99) = rr(c, &dc, &direct_to, 1024, true)?;
        let (r50, r99) = rr(c, &dc, &relay_to, 1024, true)?;
        let (cpu0, _) = zt_usage();
        let (m50, m99) = rr(c, &mc, &mesh_to, 1024, true)?;
        cpu_conn = zt_usage().0 - cpu0;
        println!(
            "| new connection per 1 KiB request p50 / p99 | {d50:.0} / {d99:.0} µs | {r50:.0} / {r99:.0} µs (+{:.0}) | {m50:.0} / {m99:.0} µs | +{:.0} µs p50 |",
            r50 - d50,
            m50 - d50
        );
    }
    let (_, rss) = zt_usage();
    // Once idle again (ztunnel returns freed heap to the system a second after its last
    // connection closes), and the peak over the whole run.
    std::thread::sleep(Duration::from_secs(3));
    let (_, rss_idle) = zt_usage();
    let peak: f64 = zt.iter().map(|p| status_kb(*p, "VmHWM:") / 1024.0).sum();
    if std::env::var("DATAPATH_METRICS").is_ok() {
        for n in [n1, n2] {
            let m = mesh.metrics(c, n)?;
            for l in m.lines().filter(|l| {
                l.starts_with("trellis_hbone") || l.starts_with("istio_tcp_connections_opened")
            }) {
                println!("{}: {}", n.name(), &l[..l.len().min(200)]);
            }
        }
    }
    println!(
        "\nztunnel CPU (both nodes): {:.2} s per GB echoed (each byte both ways), {:.3} s per 1,000 new-connection requests",
        if gb > 0.0 { cpu_bulk / gb } else { 0.0 },
        cpu_conn / (rr_count() as f64 / 1000.0)
    );
    println!(
        "ztunnel RSS (per node, mean of two): idle {:.1} MB, right after the run {:.1} MB, 3 s after the run {:.1} MB, peak {:.1} MB",
        idle_rss / 2.0,
        rss / 2.0,
        rss_idle / 2.0,
        peak / 2.0
    );
    drop(servers);
    Ok(())
}
