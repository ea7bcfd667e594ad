//! The test app (`trellis-testapp`) as tests and benchmarks start it, and what they read
//! of a running process.

use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use crate::{Cluster, Pod, Proc};

/// A command running the test app built next to the test binary (its path, when it is
/// not built, is the bare name: starting it then fails naming it).
pub fn testapp() -> Command {
    let bin =
        crate::mesh::workspace_bin("trellis-testapp").unwrap_or_else(|_| "trellis-testapp".into());
    Command::new(bin)
}

/// Starts the test app in `pod` with a TCP echo listener on 9000 and HTTP on 8080,
/// answering as the pod (`POD_NAME`); returns once it listens.
pub fn serve(c: &Cluster, pod: &Pod) -> Result<Proc> {
    let mut cmd = testapp();
    cmd.args([
        "serve",
        "--tcp-echo",
        "0.0.0.0:9000",
        "--http",
        "0.0.0.0:8080",
    ])
    .env("POD_NAME", &pod.name);
    let mut p = c.spawn(pod, &format!("{}-server", pod.name), cmd)?;
    p.wait_for_output("listening http", Duration::from_secs(10))?;
    Ok(p)
}

/// CPU seconds used so far (user + system) and resident memory in MB of process `pid`,
/// from `/proc` (zeros for a process that is gone).
pub fn cpu_and_rss(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // Fields after the name: state is 0; utime 11, stime 12 (man proc), in clock ticks.
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0;
    (cpu, rss)
}
