//! The log writer: lines go into a buffer that one background thread writes to stderr
//! every 100 ms (woken early past 64 KiB), so the per-request access-log line costs a copy,
//! not a `write(2)`, and no proxy thread ever blocks on a slow log pipe (Envoy's file access
//! log is buffered the same way). Lines are never split or reordered; past 8 MiB waiting
//! (a log reader that stopped) lines are dropped and counted; what is buffered is written
//! at exit ([`flush`]); a crash loses at most the last 100 ms.

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Past this much buffered output the writer is woken.
const HIGH_WATER: usize = 64 * 1024;
/// Past this much, lines are dropped (and counted).
const CAP: usize = 8 << 20;

static BUFFER: Mutex<Vec<u8>> = Mutex::new(Vec::new());
static WAKE: std::sync::Condvar = std::sync::Condvar::new();
static DROPPED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn drain(b: &mut Vec<u8>) -> Vec<u8> {
    std::mem::take(b)
}

fn write_out(out: &[u8]) {
    let mut err = std::io::stderr().lock();
    let _ = err.write_all(out);
    let dropped = DROPPED.swap(0, std::sync::atomic::Ordering::Relaxed);
    if dropped > 0 {
        let _ = writeln!(
            err,
            "log-writer: {dropped} lines dropped (the log reader fell behind)"
        );
    }
}

/// Writes out what is buffered (at exit).
pub fn flush() {
    let out = drain(&mut BUFFER.lock().unwrap_or_else(|p| p.into_inner()));
    write_out(&out);
}

/// Starts the background writer; returns the `MakeWriter` for the subscriber.
pub fn start() -> Buffered {
    let _ = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(|| {
            loop {
                let out = {
                    let guard = BUFFER.lock().unwrap_or_else(|p| p.into_inner());
                    let (mut guard, _) = WAKE
                        .wait_timeout(guard, Duration::from_millis(100))
                        .unwrap_or_else(|p| p.into_inner());
                    drain(&mut guard)
                };
                if !out.is_empty() {
                    write_out(&out);
                }
            }
        });
    Buffered
}

/// The subscriber's writer (see the module documentation).
#[derive(Debug, Clone, Copy)]
pub struct Buffered;

/// One event's output, appended whole to the buffer when dropped.
#[derive(Debug, Default)]
pub struct Line(Vec<u8>);

impl Write for Line {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        let full = {
            let mut b = BUFFER.lock().unwrap_or_else(|p| p.into_inner());
            if b.len() + self.0.len() > CAP {
                DROPPED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return;
            }
            b.extend_from_slice(&self.0);
            b.len() >= HIGH_WATER
        };
        if full {
            WAKE.notify_one();
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buffered {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line(Vec::with_capacity(512))
    }
}
