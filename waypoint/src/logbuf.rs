//! The log writer: lines go into a buffer that a background thread writes to stderr every
//! 100 ms (or at once past 64 KiB), so the per-request access-log line costs a copy, not a
//! `write(2)` (Envoy's file access log is buffered the same way). Lines are never split or
//! reordered; what is buffered is written at exit ([`flush`]); a crash loses at most the
//! last 100 ms.

use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Past this much buffered output the writer writes at once.
const HIGH_WATER: usize = 64 * 1024;

static BUFFER: Mutex<Vec<u8>> = Mutex::new(Vec::new());

fn drain() {
    let out = {
        let mut b = BUFFER.lock().unwrap_or_else(|p| p.into_inner());
        if b.is_empty() {
            return;
        }
        std::mem::take(&mut *b)
    };
    let _ = std::io::stderr().lock().write_all(&out);
}

/// Writes out what is buffered (at exit).
pub fn flush() {
    drain();
}

/// Starts the background writer; returns the `MakeWriter` for the subscriber.
pub fn start() -> Buffered {
    let _ = std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(|| {
            loop {
                std::thread::sleep(Duration::from_millis(100));
                drain();
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
            b.extend_from_slice(&self.0);
            b.len() >= HIGH_WATER
        };
        if full {
            drain();
        }
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Buffered {
    type Writer = Line;

    fn make_writer(&'a self) -> Line {
        Line(Vec::with_capacity(512))
    }
}
