//! `trellis-testapp`: the workload the end-to-end tests run in pods.
//!
//! - `serve`: a TCP echo server and an HTTP/1.1 + HTTP/2 (cleartext, prior knowledge)
//!   server that answers with what it saw: method, path, headers, the peer address, its own
//!   pod name. `/status/CODE` answers with that status, `/delay/MS` answers after a delay.
//! - `tcp`: a client that sends a message or N pseudo-random bytes to an echo server and
//!   checks that exactly those bytes come back.
//! - `relay`: a plain TCP relay (accept, connect to a fixed target, copy both ways): the
//!   smallest user-space proxy hop, which the data-path benchmark puts in the path as the
//!   floor a proxy cannot go below on the machine.
//! - `http`: a client that sends N requests over one connection and prints the status
//!   counts, latency percentiles and the last response.
//!
//! Results are printed as one JSON object on stdout; the exit status is non-zero when the
//! check asked for fails, so tests can assert on either.

mod grpc;
mod http;
mod tcp;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "trellis-testapp",
    about = "Test workload for Trellis end-to-end tests"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve TCP echo and/or HTTP until SIGTERM.
    Serve {
        /// The name it reports (its pod name).
        #[arg(long, env = "POD_NAME", default_value = "testapp")]
        name: String,
        /// Address of a TCP echo listener (repeatable).
        #[arg(long = "tcp-echo")]
        tcp_echo: Vec<SocketAddr>,
        /// Address of an HTTP/1.1 + HTTP/2 listener (repeatable).
        #[arg(long)]
        http: Vec<SocketAddr>,
        /// A JWKS file served (read again for each request) at `/keys`: the test's
        /// identity provider.
        #[arg(long)]
        jwks: Option<std::path::PathBuf>,
        /// Address of an HTTPS listener (HTTP/1.1 + HTTP/2 over TLS; repeatable) with the
        /// certificate chain of `--tls-cert` and the key of `--tls-key`.
        #[arg(long, requires_all = ["tls_cert", "tls_key"])]
        https: Vec<SocketAddr>,
        /// PEM certificate chain of the HTTPS listeners.
        #[arg(long)]
        tls_cert: Option<std::path::PathBuf>,
        /// PEM private key of the HTTPS listeners.
        #[arg(long)]
        tls_key: Option<std::path::PathBuf>,
    },
    /// Talk to a TCP echo server.
    Tcp {
        /// Server address.
        addr: SocketAddr,
        /// Send this text and print what comes back.
        #[arg(long, conflicts_with = "bytes")]
        message: Option<String>,
        /// Send this many pseudo-random bytes and verify the echo.
        #[arg(long)]
        bytes: Option<u64>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Request/response latency against a TCP echo server: `count` round trips of `size`
    /// bytes, on one connection or a new connection each; prints p50/p99 in microseconds.
    Rr {
        /// Server address.
        addr: SocketAddr,
        /// Bytes per request (and response).
        #[arg(long, default_value_t = 1)]
        size: usize,
        /// Round trips measured (after 10% warm-up).
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Open a new connection for every request.
        #[arg(long)]
        new_connection: bool,
    },
    /// Relay every connection accepted on `listen` to `target` (plain TCP, no inspection)
    /// until SIGTERM.
    Relay {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Where each accepted connection is relayed.
        #[arg(long)]
        target: SocketAddr,
    },
    /// Make one gRPC call over HTTP/2 (prior knowledge); prints the messages and the
    /// status from the trailers.
    Grpc {
        /// `http://IP:PORT`.
        url: hyper::Uri,
        /// Method path, e.g. `/test.Echo/Stream`.
        #[arg(long, default_value = "/test.Echo/Unary")]
        method: String,
        /// The request message.
        #[arg(long, default_value = "hello")]
        message: String,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Closed-loop HTTP load: `concurrency` requests in flight for `duration_ms`; prints
    /// requests per second and latency percentiles.
    Load {
        /// `http://IP:PORT/path`.
        url: hyper::Uri,
        /// Requests in flight.
        #[arg(long, default_value_t = 1)]
        concurrency: usize,
        /// How long, in milliseconds.
        #[arg(long, default_value_t = 3000)]
        duration_ms: u64,
        /// HTTP/2 (prior knowledge; one connection) instead of HTTP/1.1 (one per request
        /// in flight).
        #[arg(long)]
        http2: bool,
    },
    /// An external authorizer (Envoy's HTTP ext_authz, as Istio's sample): allows a check
    /// carrying `x-ext-authz: allow` (200, `x-ext-authz-check-result: allowed`), denies
    /// the rest (403, `x-ext-authz-check-result: denied`).
    ExtAuthz {
        /// Address of the HTTP authorizer (Envoy's HTTP ext_authz).
        #[arg(long)]
        http: Option<SocketAddr>,
        /// Address of the gRPC authorizer (`envoy.service.auth.v3.Authorization/Check`).
        #[arg(long)]
        grpc: Option<SocketAddr>,
    },
    /// An OTLP/gRPC trace receiver: prints `span {json}` per span exported to it.
    OtlpCollector {
        /// Listen address (an OpenTelemetry Collector's OTLP/gRPC port is 4317).
        #[arg(long, default_value = "0.0.0.0:4317")]
        listen: SocketAddr,
    },
    /// Send HTTP requests over one connection.
    Http {
        /// `http://IP:PORT/path?query`.
        url: hyper::Uri,
        /// Number of requests, sent one after the other.
        #[arg(long, default_value_t = 1)]
        requests: usize,
        /// Use HTTP/2 (prior knowledge) instead of HTTP/1.1.
        #[arg(long)]
        http2: bool,
        /// Request method.
        #[arg(long, default_value = "GET")]
        method: hyper::Method,
        /// Extra request header `name: value` (repeatable).
        #[arg(long = "header")]
        headers: Vec<String>,
        /// Fail (exit 1) unless every response has this status.
        #[arg(long)]
        expect_status: Option<u16>,
        /// Count the responses that took at least this many milliseconds (`slow`).
        #[arg(long)]
        slow_ms: Option<u64>,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
}

fn main() {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("trellis-testapp: cannot start the runtime: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("trellis-testapp: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Cmd::OtlpCollector { listen } => {
            let listener = tokio::net::TcpListener::bind(listen).await?;
            println!("listening otlp {}", listener.local_addr()?);
            grpc::otlp_collector(listener).await
        }
        Cmd::ExtAuthz { http: h, grpc: g } => {
            let mut tasks = tokio::task::JoinSet::new();
            if let Some(addr) = h {
                let listener = tokio::net::TcpListener::bind(addr).await?;
                println!("listening ext-authz {}", listener.local_addr()?);
                tasks.spawn(http::ext_authz_server(listener));
            }
            if let Some(addr) = g {
                let listener = tokio::net::TcpListener::bind(addr).await?;
                println!("listening ext-authz-grpc {}", listener.local_addr()?);
                tasks.spawn(grpc::ext_authz_server(listener));
            }
            match tasks.join_next().await {
                Some(r) => r?,
                None => anyhow::bail!("give --http and/or --grpc"),
            }
        }
        Cmd::Serve {
            name,
            tcp_echo,
            http,
            jwks,
            https,
            tls_cert,
            tls_key,
        } => {
            if let Some(path) = jwks {
                let _ = http::JWKS_FILE.set(path);
            }
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => Some(http::tls_acceptor(&cert, &key)?),
                _ => None,
            };
            serve(name, tcp_echo, http, https, tls).await
        }
        Cmd::Tcp {
            addr,
            message,
            bytes,
            timeout,
        } => {
            let work = async {
                match bytes {
                    Some(n) => tcp::verify_echo(addr, n).await,
                    None => tcp::send_message(addr, message.as_deref().unwrap_or("hello")).await,
                }
            };
            tokio::time::timeout(Duration::from_secs(timeout), work)
                .await
                .map_err(|_| anyhow::anyhow!("no answer from {addr} within {timeout}s"))?
        }
        Cmd::Rr {
            addr,
            size,
            count,
            new_connection,
        } => tcp::round_trips(addr, size, count, new_connection).await,
        Cmd::Relay { listen, target } => {
            tokio::task::spawn_blocking(move || tcp::relay(listen, target)).await?
        }
        Cmd::Grpc {
            url,
            method,
            message,
            timeout,
        } => tokio::time::timeout(
            Duration::from_secs(timeout),
            grpc::call(url, &method, &message),
        )
        .await
        .map_err(|_| anyhow::anyhow!("the gRPC call did not finish within {timeout}s"))?,
        Cmd::Load {
            url,
            concurrency,
            duration_ms,
            http2,
        } => http::load(url, concurrency, Duration::from_millis(duration_ms), http2).await,
        Cmd::Http {
            url,
            requests,
            http2,
            method,
            headers,
            expect_status,
            slow_ms,
            timeout,
        } => {
            let opts = http::ClientOptions {
                url,
                requests,
                http2,
                method,
                headers,
                expect_status,
                slow: slow_ms.map(Duration::from_millis),
            };
            tokio::time::timeout(Duration::from_secs(timeout), http::client(opts))
                .await
                .map_err(|_| anyhow::anyhow!("HTTP requests did not finish within {timeout}s"))?
        }
    }
}

async fn serve(
    name: String,
    tcp_echo: Vec<SocketAddr>,
    http: Vec<SocketAddr>,
    https: Vec<SocketAddr>,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Result<()> {
    if tcp_echo.is_empty() && http.is_empty() && https.is_empty() {
        anyhow::bail!("nothing to serve: give --tcp-echo, --http and/or --https");
    }
    let mut tasks = tokio::task::JoinSet::new();
    for addr in tcp_echo {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("listening tcp-echo {}", listener.local_addr()?);
        tasks.spawn(tcp::echo_server(listener));
    }
    for addr in http {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("listening http {}", listener.local_addr()?);
        tasks.spawn(http::server(listener, name.clone(), None));
    }
    for addr in https {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        println!("listening https {}", listener.local_addr()?);
        tasks.spawn(http::server(listener, name.clone(), tls.clone()));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {
            println!("stopping on SIGTERM");
            Ok(())
        }
        Some(res) = tasks.join_next() => res?,
    }
}
