//! TCP echo server and clients.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Echoes every byte back until the client closes its side, then closes ours.
pub(crate) async fn echo_server(listener: TcpListener) -> Result<()> {
    loop {
        let (mut stream, peer) = listener.accept().await?;
        tokio::spawn(async move {
            let (mut r, mut w) = stream.split();
            match tokio::io::copy(&mut r, &mut w).await {
                Ok(n) => println!("echoed {n} bytes to {peer}"),
                Err(e) => println!("echo to {peer} failed: {e}"),
            }
            let _ = w.shutdown().await;
        });
    }
}

/// Relays each connection accepted on `listen` to `target` with the least work a user-space
/// hop can do: blocking sockets, a thread per direction, read then write (Nagle off on
/// both sockets), half-close passed on. Runs until the process ends.
pub(crate) fn relay(listen: SocketAddr, target: SocketAddr) -> Result<()> {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    fn pump(mut from: TcpStream, mut to: TcpStream) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    }
    let listener =
        TcpListener::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    println!("listening relay {} -> {target}", listener.local_addr()?);
    loop {
        let (client, peer) = listener.accept()?;
        std::thread::spawn(move || {
            let upstream = match TcpStream::connect(target) {
                Ok(s) => s,
                Err(e) => {
                    println!("relay {peer} -> {target}: connect failed: {e}");
                    return;
                }
            };
            let _ = client.set_nodelay(true);
            let _ = upstream.set_nodelay(true);
            let (Ok(c2), Ok(u2)) = (client.try_clone(), upstream.try_clone()) else {
                return;
            };
            let back = std::thread::spawn(move || pump(u2, c2));
            pump(client, upstream);
            let _ = back.join();
        });
    }
}

/// Sends `message`, half-closes, and prints everything the server sends back.
pub(crate) async fn send_message(addr: SocketAddr, message: &str) -> Result<()> {
    let mut stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let local = stream.local_addr()?;
    stream.write_all(message.as_bytes()).await?;
    stream.shutdown().await?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await?;
    println!(
        "{}",
        json!({"local": local.to_string(), "peer": addr.to_string(),
               "reply": String::from_utf8_lossy(&reply)})
    );
    Ok(())
}

/// A deterministic byte stream (xorshift64), so the reader can regenerate what the writer
/// sent without buffering it.
struct Pattern(u64);

impl Pattern {
    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            chunk.copy_from_slice(&self.0.to_le_bytes()[..chunk.len()]);
        }
    }
}

const SEED: u64 = 0x7472_656c_6c69_7321;
const CHUNK: usize = 64 * 1024;

/// Sends `total` pattern bytes while reading the echo back, and checks every byte.
pub(crate) async fn verify_echo(addr: SocketAddr, total: u64) -> Result<()> {
    let start = Instant::now();
    let stream = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let (mut r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        let mut pattern = Pattern(SEED);
        let mut buf = vec![0u8; CHUNK];
        let mut left = total;
        while left > 0 {
            let n = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
            pattern.fill(&mut buf[..n]);
            w.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        w.shutdown().await?;
        anyhow::Ok(())
    });
    let mut expected = Pattern(SEED);
    let mut want = vec![0u8; CHUNK];
    let mut got = vec![0u8; CHUNK];
    let mut received: u64 = 0;
    let mut first_mismatch: Option<u64> = None;
    loop {
        let n = r.read(&mut got).await?;
        if n == 0 {
            break;
        }
        // Compare in pattern-sized steps: `read` may return any split of the stream.
        let mut off = 0;
        while off < n {
            let pos = usize::try_from(received % CHUNK as u64).unwrap_or(0);
            if pos == 0 {
                expected.fill(&mut want);
            }
            let take = (CHUNK - pos).min(n - off);
            if first_mismatch.is_none() && got[off..off + take] != want[pos..pos + take] {
                first_mismatch = Some(received);
            }
            off += take;
            received += take as u64;
        }
    }
    writer.await??;
    let secs = start.elapsed().as_secs_f64();
    let intact = received == total && first_mismatch.is_none();
    println!(
        "{}",
        json!({"sent": total, "received": received, "intact": intact,
               "first_mismatch": first_mismatch, "seconds": secs,
               "mbit_per_s": (total as f64 * 8.0 / 1e6) / secs.max(1e-9)})
    );
    if !intact {
        bail!(
            "echo from {addr} was not intact: sent {total} bytes, received {received}, first mismatch at {first_mismatch:?}"
        );
    }
    Ok(())
}

/// `count` request/response round trips of `size` bytes (after a tenth as warm-up), on one
/// connection or a new one each; prints the latency percentiles as JSON.
pub(crate) async fn round_trips(
    addr: SocketAddr,
    size: usize,
    count: usize,
    new_connection: bool,
) -> Result<()> {
    let req = vec![0x5au8; size.max(1)];
    let mut resp = vec![0u8; size.max(1)];
    let warm = count / 10;
    let mut samples = Vec::with_capacity(count);
    let connect = || async {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        s.set_nodelay(true)?;
        anyhow::Ok(s)
    };
    let mut conn = if new_connection {
        None
    } else {
        Some(connect().await?)
    };
    for i in 0..warm + count {
        let t = Instant::now();
        let mut fresh;
        let s = match conn.as_mut() {
            Some(s) => s,
            None => {
                fresh = connect().await?;
                &mut fresh
            }
        };
        s.write_all(&req).await?;
        s.read_exact(&mut resp).await?;
        if i >= warm {
            samples.push(t.elapsed());
        }
    }
    samples.sort();
    let pct = |p: f64| {
        let i = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len()) - 1;
        samples[i].as_secs_f64() * 1e6
    };
    println!(
        "{}",
        json!({"count": samples.len(), "size": size, "new_connection": new_connection,
               "p50_us": pct(0.5), "p99_us": pct(0.99)})
    );
    Ok(())
}
