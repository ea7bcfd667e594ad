//! The full ambient L7 path (issue 14) on the network-namespace cluster, in one run: HTTP
//! requests client → ztunnel → waypoint → ztunnel → server, against the same client and
//! server directly (a namespace outside the mesh) and through the ztunnels only (a Service
//! of the mesh without a waypoint). Real binaries; needs root.
//!
//! Figures per path, HTTP/1.1 at concurrency 1 and 16 (closed loop, `trellis-testapp
//! load`): requests per second, p50/p99 latency, and the mesh's CPU per 1,000 requests
//! (both ztunnels, plus the waypoint on its path).
//!
//! Run: `cargo build --workspace --release --bins && sudo cargo bench -p trellis-bench
//! --bench ambient_l7`. `AMBIENT_BENCH_SECONDS` sets each measurement's length (3). Under
//! `cargo test`/nextest it does nothing.

use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;
use trellis_e2e::app::{cpu_and_rss, testapp};
use trellis_e2e::mesh::{Mesh, eventually};
use trellis_e2e::{Cluster, Pod};

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if let Err(e) = run() {
        eprintln!("ambient_l7 bench failed: {e:#}");
        std::process::exit(1);
    }
}

fn run() -> Result<()> {
    let c = Cluster::builder("bench-ambient-l7").nodes(2).build()?;
    let result = measure(&c);
    if result.is_err() {
        c.mark_failed();
    }
    c.teardown()?;
    result
}

fn load(c: &Cluster, from: &Pod, url: &str, concurrency: usize, secs: u64) -> Result<Value> {
    let mut cmd = testapp();
    cmd.args([
        "load",
        url,
        "--concurrency",
        &concurrency.to_string(),
        "--duration-ms",
        &(secs * 1000).to_string(),
    ]);
    let out = c.run(from, "load", cmd)?;
    serde_json::from_str(out.trim()).with_context(|| format!("not JSON: {out}"))
}

fn measure(c: &Cluster) -> Result<()> {
    let secs: u64 = std::env::var("AMBIENT_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let (n1, n2) = (&c.nodes()[0], &c.nodes()[1]);
    let mesh = Mesh::start(c)?;
    mesh.namespace("mesh", true)?;
    mesh.namespace("direct", false)?;
    let mc = c.add_pod(n1, "mesh", "client", "client", &[])?;
    let ms = c.add_pod(n2, "mesh", "server", "server", &[("app", "server")])?;
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
        cmd.args(["serve", "--http", "0.0.0.0:8080"])
            .env("POD_NAME", &p.name);
        let mut s = c.spawn(p, &format!("{}-server", p.namespace), cmd)?;
        s.wait_for_output("listening http", Duration::from_secs(10))?;
        servers.push(s);
    }
    let (waypoint, wp) = mesh.start_waypoint(c, n1, "mesh", "waypoint", "10.96.0.50", &[])?;
    mesh.apply(
        "services.yaml",
        "apiVersion: v1\nkind: Service\nmetadata: {name: l7, namespace: mesh, labels: {istio.io/use-waypoint: waypoint}}\nspec: {clusterIP: 10.96.0.10, selector: {app: server}, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: l4, namespace: mesh}\nspec: {clusterIP: 10.96.0.11, selector: {app: server}, ports: [{name: http, port: 80, targetPort: 8080}]}\n",
    )?;
    eventually("the waypoint's route", Duration::from_secs(20), || {
        let dump = mesh.waypoint_config(c, &waypoint)?;
        Ok(dump["routes"].as_array().is_some_and(|r| {
            r.iter()
                .any(|r| r["name"] == "mesh/l7.mesh.svc.cluster.local:80")
        }))
    })?;
    let zt: Vec<u32> = ["node1", "node2"]
        .iter()
        .map(|n| mesh.ztunnel(n).map(|p| p.pid()))
        .collect::<Result<_>>()?;
    let paths: [(&str, &Pod, String, bool); 3] = [
        ("direct", &dc, format!("http://{}:8080/", ds.ip), false),
        ("ztunnels", &mc, "http://10.96.0.11/".to_string(), false),
        (
            "ztunnels + waypoint",
            &mc,
            "http://10.96.0.10/".to_string(),
            true,
        ),
    ];
    println!(
        "\n{:<20} {:>4} | {:>8} | {:>7} {:>7} | {:>18}",
        "path", "conc", "rps", "p50 µs", "p99 µs", "mesh CPU s / 1k req"
    );
    let mut rows = Vec::new();
    for concurrency in [1usize, 16] {
        for (name, from, url, through_waypoint) in &paths {
            // Warm-up (connections, certificates), then the measurement.
            load(c, from, url, concurrency, 1)?;
            let before: f64 =
                zt.iter().map(|p| cpu_and_rss(*p).0).sum::<f64>() + cpu_and_rss(wp.pid()).0;
            let v = load(c, from, url, concurrency, secs)?;
            let after: f64 =
                zt.iter().map(|p| cpu_and_rss(*p).0).sum::<f64>() + cpu_and_rss(wp.pid()).0;
            let requests = v["requests"].as_f64().unwrap_or(0.0);
            let per_k = if *name == "direct" {
                0.0
            } else {
                (after - before) / requests.max(1.0) * 1000.0
            };
            println!(
                "{:<20} {:>4} | {:>8.0} | {:>7} {:>7} | {:>18.3}{}",
                name,
                concurrency,
                v["rps"].as_f64().unwrap_or(0.0),
                v["p50_us"],
                v["p99_us"],
                per_k,
                if v["errors"].as_u64().unwrap_or(0) > 0 {
                    format!("  ({} errors)", v["errors"])
                } else {
                    String::new()
                }
            );
            rows.push(serde_json::json!({
                "path": name, "concurrency": concurrency, "waypoint": through_waypoint,
                "rps": v["rps"], "p50_us": v["p50_us"], "p99_us": v["p99_us"], "mesh_cpu_s_per_1k": per_k,
            }));
        }
    }
    println!("{}", serde_json::json!({"rows": rows}));
    drop(servers);
    drop(wp);
    Ok(())
}
