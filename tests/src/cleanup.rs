//! Making sure nothing of ours outlives a test: teardown of one cluster by its id, a sweep of
//! clusters whose test process died (SIGKILL, crash), and SIGINT/SIGTERM handling.
//!
//! Everything a cluster creates lives inside its own network namespaces (links, bridges,
//! addresses, routes) or under its state directory (IPAM leases, CNI results, config), and
//! every namespace is named `<id>-...`. So a cluster is destroyed completely, with or without
//! the `Cluster` value, by: killing every process in its namespaces, deleting the namespaces
//! (which destroys the links inside them), and removing the state directory.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;

use crate::exec::{ip, signal};

/// Every namespace and state directory of ours starts with this.
pub const NAME_PREFIX: &str = "trl-";

/// Per-cluster state (owner, IPAM leases, CNI config and cached results). `/run` is a tmpfs,
/// so even a machine crash leaves nothing behind after reboot.
pub const STATE_ROOT: &str = "/run/trellis-e2e";

/// Clusters alive in this process, for the signal handler.
static LIVE: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

pub(crate) fn state_dir(id: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(id)
}

pub(crate) fn register(id: &str) {
    LIVE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.to_string());
}

pub(crate) fn unregister(id: &str) {
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).remove(id);
}

/// On SIGINT, SIGTERM or SIGHUP (Ctrl-C, nextest's timeout, a closed terminal) destroys the
/// clusters of this process, then exits with the conventional 128+signal status.
pub(crate) fn install_signal_handler() -> Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
            Ok(mut signals) => {
                thread::spawn(move || {
                    if let Some(sig) = signals.forever().next() {
                        let ids: Vec<String> = LIVE
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .iter()
                            .cloned()
                            .collect();
                        for id in ids {
                            if let Err(e) = destroy(&id) {
                                eprintln!("trellis-e2e: cleanup of {id} after signal {sig}: {e:#}");
                            }
                        }
                        std::process::exit(128 + sig);
                    }
                });
            }
            Err(e) => result = Err(e).context("cannot install the signal handler"),
        }
    });
    result
}

/// Records this process as the owner of cluster `id` (pid and start time, so a recycled pid
/// is not mistaken for a live owner).
pub(crate) fn write_owner(dir: &Path) -> Result<()> {
    let pid = std::process::id();
    let start = start_time(pid).context("cannot read our own start time")?;
    // Written aside and renamed, so a concurrent sweep never reads a half-written owner.
    let tmp = dir.join("owner.tmp");
    std::fs::write(&tmp, format!("{pid} {start}\n"))?;
    std::fs::rename(tmp, dir.join("owner"))?;
    Ok(())
}

fn owner_alive(dir: &Path) -> bool {
    let owner = std::fs::read_to_string(dir.join("owner"))
        .ok()
        .and_then(|text| {
            let mut parts = text.split_whitespace();
            let pid = parts.next()?.parse::<u32>().ok()?;
            let start = parts.next()?.parse::<u64>().ok()?;
            Some((pid, start))
        });
    match owner {
        Some((pid, start)) => start_time(pid) == Some(start),
        // No readable owner: the directory is being created right now (the owner is
        // written first thing) or is debris; its age decides.
        None => dir
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().unwrap_or_default() < Duration::from_secs(60)),
    }
}

/// Field 22 of `/proc/PID/stat`: the process's start time in clock ticks since boot.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` is still a running (not zombie) process.
fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

/// Names of every network namespace of ours on the machine.
pub fn our_netns() -> Result<Vec<String>> {
    Ok(ip(&["netns", "list"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NAME_PREFIX))
        .map(str::to_string)
        .collect())
}

/// Namespaces of cluster `id`.
pub(crate) fn cluster_netns(id: &str) -> Result<Vec<String>> {
    let prefix = format!("{id}-");
    Ok(our_netns()?
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect())
}

/// Processes whose network namespace is `ns`.
pub(crate) fn netns_pids(ns: &str) -> Result<Vec<u32>> {
    Ok(ip(&["netns", "pids", ns])?
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}

fn netns_inode(ns: &str) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(format!("/run/netns/{ns}"))
        .ok()
        .map(|m| m.ino())
}

/// The inode of a process's network namespace (`/proc/PID/ns/net` reads `net:[INODE]`).
fn pid_netns_inode(pid: u32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok()?;
    let text = link.to_string_lossy();
    text.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// Sends `sig` to every process in the namespaces `nss`, then waits up to `grace` for them
/// to go; returns those still running.
pub(crate) fn signal_all(nss: &[String], sig: Signal, grace: Duration) -> Result<Vec<u32>> {
    let mut pids = Vec::new();
    for ns in nss {
        let Some(inode) = netns_inode(ns) else {
            continue; // gone already
        };
        for pid in netns_pids(ns)? {
            // Re-checked just before the signal: a pid that exited and was reused by a
            // process outside the namespace is left alone.
            if pid_netns_inode(pid) == Some(inode) {
                signal(pid, sig);
                pids.push(pid);
            }
        }
    }
    let deadline = Instant::now() + grace;
    loop {
        pids.retain(|&p| running(p));
        if pids.is_empty() || Instant::now() >= deadline {
            return Ok(pids);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Destroys cluster `id` completely: processes, namespaces (and with them every link,
/// bridge, address and route), state directory. Safe to call more than once.
pub(crate) fn destroy(id: &str) -> Result<()> {
    let nss = cluster_netns(id)?;
    let left = signal_all(&nss, Signal::SIGKILL, Duration::from_secs(5))?;
    if !left.is_empty() {
        bail!("processes {left:?} in the namespaces of {id} survived SIGKILL");
    }
    for ns in &nss {
        // A namespace that vanished meanwhile (its owner tearing down at the same time) is
        // fine; the check below is what counts.
        let _ = ip(&["netns", "delete", ns]);
    }
    // The pods' /etc files (hosts), whether or not their namespace is still there.
    let prefix = format!("{id}-");
    if let Ok(entries) = std::fs::read_dir("/etc/netns") {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let dir = state_dir(id);
    if dir.exists() {
        std::fs::remove_dir_all(&dir)
            .with_context(|| format!("cannot remove {}", dir.display()))?;
    }
    let left = cluster_netns(id)?;
    if !left.is_empty() {
        bail!("namespaces {left:?} of {id} are still there after deletion");
    }
    unregister(id);
    Ok(())
}

/// Destroys every cluster whose owning test process is gone, and namespaces of ours that
/// belong to no cluster at all. Returns the ids it destroyed.
pub fn sweep_stale() -> Result<Vec<String>> {
    // Namespaces are listed before state directories: a cluster creates its state directory
    // before its first namespace, so every namespace listed here whose cluster is alive has a
    // state directory by the time the directories are read.
    let namespaces = our_netns()?;
    let mut swept = Vec::new();
    let mut known = BTreeSet::new();
    // Only a missing state root means "no clusters": any other error aborts the sweep,
    // which would otherwise take every live cluster for debris.
    let entries = match std::fs::read_dir(STATE_ROOT) {
        Ok(e) => Some(e),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot list {STATE_ROOT}")),
    };
    if let Some(entries) = entries {
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list {STATE_ROOT}"))?;
            let id = entry.file_name().to_string_lossy().into_owned();
            if !id.starts_with(NAME_PREFIX) {
                continue;
            }
            if owner_alive(&entry.path()) {
                known.insert(id);
            } else {
                destroy(&id).with_context(|| format!("sweeping stale cluster {id}"))?;
                swept.push(id);
            }
        }
    }
    // A state directory is created before any namespace and removed after all of them, so a
    // namespace whose cluster has no state directory is debris.
    for ns in namespaces {
        // Only names of exactly our shape: trl-<6 hex>-...
        let Some(id) = cluster_id_of(&ns) else {
            continue;
        };
        if !known.contains(&id) && !swept.contains(&id) {
            destroy(&id).with_context(|| format!("sweeping orphan namespace {ns}"))?;
            swept.push(id);
        }
    }
    Ok(swept)
}

/// The cluster id in a namespace name of ours (`trl-<6 hex digits>-...`).
fn cluster_id_of(ns: &str) -> Option<String> {
    let rest = ns.strip_prefix(NAME_PREFIX)?;
    let (hex, tail) = rest.split_at_checked(6)?;
    if !hex
        .bytes()
        .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        || !tail.starts_with('-')
    {
        return None;
    }
    Some(format!("{NAME_PREFIX}{hex}"))
}
