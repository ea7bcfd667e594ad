//! Control plane at scale (issue 4): 10,000 pods, 2,000 services, 1,000 policies in 100
//! namespaces, 50 connected xDS clients.
//!
//! The control plane (manifests parsed by the loader, model, snapshot, delta xDS server)
//! runs in a child process of this binary, so its memory is its own; the parent runs the 50
//! clients (trellis-core's `XdsClient`, the one ztunnel uses) over loopback gRPC and reports:
//! - initial full sync of one client (target ≤ 1 s);
//! - one pod added → every client's store holds it: p50/p99 over 50 additions (target
//!   p99 ≤ 50 ms);
//! - the control plane's peak RSS (target ≤ 300 MB).
//!
//! Run: `cargo bench -p trellis-bench --bench xds_scale`. Under `cargo test`/nextest it
//! lists no test and does nothing.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use trellis_control_plane::config::load::{Document, parse_file};
use trellis_control_plane::config::model::{MeshConfig, Model};
use trellis_control_plane::config::snapshot::Snapshot;
use trellis_control_plane::xds::{AckTracker, Publisher, XdsServer};
use trellis_core::xds::{XdsClient, XdsConfig};
use trellis_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use trellis_proto::type_url::{ADDRESS, AUTHORIZATION};

const NAMESPACES: usize = 100;
const PODS_PER_NS: usize = 100;
const SERVICES_PER_NS: usize = 20;
const POLICIES_PER_NS: usize = 10;
const CLIENTS: usize = 50;
const UPDATES: usize = 50;
const CHILD: &str = "TRELLIS_BENCH_CONTROL_PLANE";

fn main() {
    if std::env::var_os(CHILD).is_some() {
        control_plane();
        return;
    }
    // `cargo bench` passes --bench; test runners (nextest --list, cargo test) do not.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(measure());
}

fn manifests() -> String {
    let mut y = String::with_capacity(8 << 20);
    y.push_str("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n");
    for n in 0..NAMESPACES {
        y.push_str(&format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}, labels: {{istio.io/dataplane-mode: ambient}}}}\n"));
        for p in 0..PODS_PER_NS {
            y.push_str(&pod(
                n,
                &format!("pod-{p}"),
                p % SERVICES_PER_NS,
                (n * PODS_PER_NS + p) as u32,
            ));
        }
        for s in 0..SERVICES_PER_NS {
            let vip = n * SERVICES_PER_NS + s;
            y.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{s}, namespace: ns-{n}}}\nspec: {{clusterIP: 10.96.{}.{}, selector: {{app: svc-{s}}}, ports: [{{port: 80, targetPort: 8080}}]}}\n",
                vip / 250,
                vip % 250 + 1
            ));
        }
        for q in 0..POLICIES_PER_NS {
            let body = if q % 2 == 0 {
                format!(
                    "rules: [{{from: [{{source: {{namespaces: [ns-{}]}}}}]}}]",
                    (n + 1) % NAMESPACES
                )
            } else {
                format!(
                    "selector: {{matchLabels: {{app: svc-{q}}}}}\n  action: DENY\n  rules: [{{to: [{{operation: {{ports: [\"9{q:03}\"]}}}}]}}]"
                )
            };
            y.push_str(&format!(
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: pol-{q}, namespace: ns-{n}}}\nspec:\n  {body}\n"
            ));
        }
    }
    y
}

fn pod(ns: usize, name: &str, app: usize, index: u32) -> String {
    let ip = 0x0af4_0000 + index + 2; // 10.244.0.0/16 and up
    let [a, b, c, d] = ip.to_be_bytes();
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: ns-{ns}, labels: {{app: svc-{app}}}}}\nspec: {{nodeName: node-{}, serviceAccountName: sa-{app}, containers: [{{name: app, image: x}}]}}\nstatus: {{podIP: {a}.{b}.{c}.{d}, phase: Running}}\n",
        index % 20
    )
}

fn apply(model: &mut Model, yaml: &str) {
    for doc in parse_file(Path::new("bench.yaml"), yaml) {
        match doc {
            Document::Loaded(l) => model.apply(&l.id, l.object),
            other => panic!("bench manifests must load: {other:?}"),
        }
    }
}

/// The child: control plane serving the generated cluster; reads `add N` lines on stdin.
fn control_plane() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mesh = MeshConfig::default();
        let t = Instant::now();
        let mut model = Model::default();
        apply(&mut model, &manifests());
        let parsed = t.elapsed();
        let t = Instant::now();
        let mut snap = Arc::new(Snapshot::build(&model, &mesh));
        model.take_dirty();
        let built = t.elapsed();
        let (publish, snaps) = Publisher::new((*snap).clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = XdsServer::new(snaps, Arc::new(AckTracker::default()));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(AggregatedDiscoveryServiceServer::new(server))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        println!(
            "addr {addr} parse_ms {} build_ms {}",
            parsed.as_millis(),
            built.as_millis()
        );
        // Commands arrive one at a time; read them on a blocking thread.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        while let Some(line) = rx.recv().await {
            let Some(n) = line
                .strip_prefix("add ")
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            let t = Instant::now();
            apply(&mut model, &pod(0, &format!("extra-{n}"), 0, 20_000 + n));
            let dirty = model.take_dirty();
            let next = Snapshot::rebuild(&snap, &model, &mesh, &dirty);
            publish.publish(next);
            snap = publish.current();
            println!("rebuilt_us {}", t.elapsed().as_micros());
        }
    });
}

fn client(addr: &str) -> XdsClient {
    let channel = Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect_lazy();
    XdsClient::start(
        channel,
        XdsConfig {
            node_id: "bench".into(),
            types: vec![ADDRESS.into(), AUTHORIZATION.into()],
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(1),
            credential: None,
        },
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

async fn measure() {
    let exe = std::env::current_exe().expect("exe");
    let mut child = Command::new(exe)
        .env(CHILD, "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("control plane child");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let header = out.next().expect("child header").expect("read");
    let addr = header.split_whitespace().nth(1).expect("addr").to_string();
    println!("control plane: {header}");
    let pid = child.id();
    let rss = move |when: &str| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let kb = |key: &str| {
            status
                .lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        println!(
            "control plane RSS {when}: {} MB (peak so far {} MB)",
            kb("VmRSS:") / 1024,
            kb("VmHWM:") / 1024
        );
    };
    rss("after loading");

    // 1. Initial full sync of one client.
    let t = Instant::now();
    let first = client(&addr);
    first.wait_synced().await;
    let initial = t.elapsed();
    let (w, s, p) = first.store().len();
    println!(
        "initial full sync of one client: {initial:?} ({w} workloads, {s} services, {p} policies)"
    );
    rss("with one client");

    // 2. The other 49 connect.
    let t = Instant::now();
    let mut clients = vec![first];
    for _ in 1..CLIENTS {
        clients.push(client(&addr));
    }
    for c in &clients {
        c.wait_synced().await;
    }
    println!("{CLIENTS} clients synced in {:?}", t.elapsed());
    rss("with all clients synced");

    // 3. One pod at a time, until every client holds it.
    let mut latencies = Vec::with_capacity(UPDATES);
    let mut rebuilds = Vec::with_capacity(UPDATES);
    for n in 0..UPDATES {
        let uid = format!("Kubernetes//Pod/ns-0/extra-{n}");
        let t = Instant::now();
        writeln!(stdin, "add {n}").expect("send command");
        stdin.flush().expect("flush");
        for c in &clients {
            let mut changes = c.changes();
            loop {
                if c.store().workload(&uid).is_some() {
                    break;
                }
                changes.changed().await.expect("client alive");
            }
        }
        latencies.push(t.elapsed());
        let line = out.next().expect("rebuild line").expect("read");
        rebuilds.push(line);
    }
    latencies.sort();
    let rebuild_us: Vec<u64> = rebuilds
        .iter()
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    let mean_rebuild = rebuild_us.iter().sum::<u64>() / rebuild_us.len().max(1) as u64;
    println!(
        "pod added -> all {CLIENTS} clients updated: p50 {:?}, p99 {:?}, max {:?} (control-plane rebuild mean {} ms)",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies[latencies.len() - 1],
        mean_rebuild / 1000
    );

    // 4. The control plane's memory.
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
    for key in ["VmHWM", "VmRSS"] {
        if let Some(line) = status.lines().find(|l| l.starts_with(key)) {
            println!("control plane {line}");
        }
    }
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
}
