//! Giving freed heap memory back to the operating system when ztunnel goes idle.
//!
//! A burst of connections grows the heap (copy buffers, HTTP/2 windows, TLS records);
//! glibc's allocator keeps the freed pages mapped for reuse, so the RSS a node sees stays at
//! the burst's high-water mark long after. Once every connection of the burst has closed,
//! ztunnel asks the allocator to release what it holds free (`malloc_trim`), so its idle
//! footprint comes back down. Checked once a second; only after connections closed and
//! none are open, so a busy proxy never pays for it.

// `malloc_trim` is a C function; calling it is `unsafe` in Rust (see the block below).
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

static OPEN: AtomicUsize = AtomicUsize::new(0);
static CLOSED_SINCE_TRIM: AtomicUsize = AtomicUsize::new(0);

/// Counts a connection as open until dropped.
pub(crate) struct Open(());

impl Open {
    pub(crate) fn new() -> Open {
        OPEN.fetch_add(1, Ordering::Relaxed);
        Open(())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
        CLOSED_SINCE_TRIM.fetch_add(1, Ordering::Relaxed);
    }
}

/// Connections open now.
pub fn open_connections() -> usize {
    OPEN.load(Ordering::Relaxed)
}

/// Runs for ever: trims the heap when ztunnel has gone idle after connections.
pub async fn trim_when_idle() {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        metrics::gauge!("trellis_connections_open").set(OPEN.load(Ordering::Relaxed) as f64);
        if OPEN.load(Ordering::Relaxed) == 0 && CLOSED_SINCE_TRIM.swap(0, Ordering::Relaxed) > 0 {
            trim();
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim takes a plain integer, touches only the allocator's own state
    // (under its locks, like any malloc/free), and is documented as safe to call at any
    // time from any thread.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}
