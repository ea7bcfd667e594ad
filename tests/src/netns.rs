//! Doing things from inside a network namespace without starting a process.

use std::fs::File;
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use nix::sched::{CloneFlags, setns};

/// Something with a network namespace of the cluster: a node, a pod, the underlay.
pub trait Netns {
    /// The namespace's name under `/run/netns`.
    fn netns(&self) -> &str;
}

/// Runs `f` on a fresh thread that has entered network namespace `name`.
///
/// `setns(CLONE_NEWNET)` changes only the calling thread, and the thread ends with `f`, so
/// no other code ever runs in the wrong namespace.
pub fn in_netns<T, F>(name: &str, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let path = format!("/run/netns/{name}");
    let file = File::open(&path).with_context(|| format!("cannot open {path}"))?;
    thread::scope(|s| {
        s.spawn(move || {
            setns(&file, CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("cannot enter network namespace {name}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("thread inside network namespace {name} panicked"))?
    })
}

/// Waits until a TCP connection from inside `from` to `addr` succeeds.
pub fn wait_tcp(from: &impl Netns, addr: SocketAddr, timeout: Duration) -> Result<()> {
    let ns = from.netns().to_string();
    let last_err = in_netns(&ns, move || {
        let deadline = Instant::now() + timeout;
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(_) => return None,
                Err(e) if Instant::now() >= deadline => return Some(e),
                Err(_) => thread::sleep(Duration::from_millis(20)),
            }
        }
    })?;
    if let Some(e) = last_err {
        bail!("no TCP connection from {ns} to {addr} within {timeout:?}: {e}");
    }
    Ok(())
}
