//! `trellisctl`: `trellisctl waypoint generate|apply` deploys a waypoint on Kubernetes (see
//! [`waypoint`]); `trellisctl demo` — a two-node mesh on network namespaces with
//! the real control plane, node agents, CNI plugin and ztunnels, walked through step by
//! step with real traffic: mTLS on the wire (a capture on the underlay finds no plaintext),
//! an AuthorizationPolicy applied from a file denies a call (the deny is in the log), and
//! removing it allows the call again. Ctrl-C (or the end, without `--wait`) tears it down.

use std::io::Write;
use std::process::{Command, ExitCode};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use trellis_e2e::mesh::{Mesh, eventually, workspace_bin};
use trellis_e2e::{Cluster, Pod, Proc};

mod waypoint;

#[derive(Parser)]
#[command(name = "trellisctl", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the local demo (root; Linux network namespaces).
    Demo {
        /// After the walk-through, keep the mesh up until Ctrl-C.
        #[arg(long)]
        wait: bool,
    },
    /// Waypoints on Kubernetes (as `istioctl waypoint`).
    Waypoint {
        #[command(subcommand)]
        command: WaypointCmd,
    },
}

#[derive(Subcommand)]
enum WaypointCmd {
    /// Print the waypoint's Gateway (and namespace label) as YAML, for kubectl apply.
    Generate(waypoint::WaypointArgs),
    /// Write them to the cluster of the kubeconfig (server-side apply).
    Apply {
        #[command(flatten)]
        args: waypoint::WaypointArgs,
        /// Wait until the control plane reports the waypoint programmed.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, in seconds.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
    },
}

fn main() -> ExitCode {
    let (what, result) = match Cli::parse().command {
        Cmd::Demo { wait } => ("demo", demo(wait)),
        Cmd::Waypoint { command } => ("waypoint", waypoint_cmd(command)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\ntrellisctl {what} failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn waypoint_cmd(command: WaypointCmd) -> Result<()> {
    match command {
        WaypointCmd::Generate(args) => {
            print!("{}", waypoint::generate(&args)?);
            Ok(())
        }
        WaypointCmd::Apply {
            args,
            wait,
            timeout,
        } => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let client = kube::Client::try_default()
                    .await
                    .context("connecting to the Kubernetes API (kubeconfig or in-cluster)")?;
                for note in waypoint::apply(&client, &args).await? {
                    eprintln!("note: {note}");
                }
                println!("waypoint {}/{} applied", args.namespace, args.name);
                if args.enroll_namespace {
                    println!(
                        "namespace {} labelled istio.io/use-waypoint={}",
                        args.namespace, args.name
                    );
                }
                if wait {
                    let addr =
                        waypoint::wait_programmed(&client, &args, Duration::from_secs(timeout))
                            .await?;
                    println!(
                        "waypoint {}/{} is ready at {addr}",
                        args.namespace, args.name
                    );
                }
                Ok(())
            })
        }
    }
}

fn step(n: u32, text: &str) {
    println!("\n== Step {n}: {text}");
    let _ = std::io::stdout().flush();
}

fn testapp() -> Result<Command> {
    Ok(Command::new(workspace_bin("trellis-testapp")?))
}

fn call(c: &Cluster, from: &Pod, to: &str, message: &str) -> Result<String> {
    let mut cmd = testapp()?;
    cmd.args(["tcp", to, "--message", message, "--timeout", "5"]);
    c.run(from, &format!("{}-call", from.name), cmd)
}

fn demo(wait: bool) -> Result<()> {
    if !nix_is_root() {
        bail!("the demo creates network namespaces: run it as root (sudo ./scripts/demo.sh)");
    }
    let c = Cluster::builder("demo").nodes(2).build()?;
    let result = walk(&c, wait);
    if result.is_err() {
        c.mark_failed(); // keep the logs
    }
    let teardown = c.teardown();
    println!("\nCleaned up: namespaces, processes and state of the demo are gone.");
    if let Err(e) = &result {
        println!("Logs of every process: {}", c.log_dir().display());
        return Err(anyhow::anyhow!("{e:#}"));
    }
    teardown
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn walk(c: &Cluster, wait: bool) -> Result<()> {
    let (n1, n2) = (&c.nodes()[0], &c.nodes()[1]);
    step(
        1,
        "a two-node cluster of network namespaces, with Trellis installed",
    );
    let mesh = Mesh::start(c)?;
    println!(
        "control plane on {} (xDS + CA on :15012); a ztunnel and a node agent on node1 and node2;\nthe agents installed trellis-cni into each node's CNI configuration.",
        n1.underlay_ip()
    );

    step(
        2,
        "namespaces shop and dev join the mesh (istio.io/dataplane-mode=ambient); pods start",
    );
    mesh.namespace("shop", true)?;
    mesh.namespace("dev", true)?;
    mesh.namespace("legacy", false)?;
    let web = c.add_pod(n2, "shop", "web", "web", &[("app", "web")])?;
    let old = c.add_pod(n1, "legacy", "old", "old", &[("app", "old")])?;
    mesh.register_pod(c, &old)?;
    println!(
        "  legacy/old on node1 at {}: not in the mesh (its namespace has no label)",
        old.ip
    );
    let client = c.add_pod(n1, "shop", "client", "client", &[("app", "client")])?;
    let tool = c.add_pod(n1, "dev", "tool", "tool", &[("app", "tool")])?;
    for p in [&web, &client, &tool] {
        mesh.register_pod(c, p)?;
    }
    for p in [&web, &client, &tool] {
        mesh.wait_captured(c, p, true)?;
        println!(
            "  {}/{} on {} at {}: captured",
            p.namespace, p.name, p.node, p.ip
        );
    }
    let mut server_cmd = testapp()?;
    server_cmd.args(["serve", "--tcp-echo", "0.0.0.0:9000"]);
    let mut server: Proc = c.spawn(&web, "web-server", server_cmd)?;
    server.wait_for_output("listening", Duration::from_secs(10))?;
    let target = format!("{}:9000", web.ip);

    step(
        3,
        "traffic between pods is mutual TLS: a capture on the wire between the nodes finds no plaintext",
    );
    let pcap = c.log_dir().join("underlay.pcap");
    let mut dump = Command::new("tcpdump");
    // -Z root: tcpdump otherwise drops to its own user before writing the file.
    dump.args([
        "-i",
        "any",
        "--immediate-mode",
        "-U",
        "-s",
        "0",
        "-Z",
        "root",
        "-w",
    ])
    .arg(&pcap)
    .arg("tcp");
    let mut tcpdump = c
        .spawn(c.underlay(), "tcpdump", dump)
        .context("tcpdump (apt-get install tcpdump; scripts/demo.sh installs it)")?;
    tcpdump.wait_for_output("listening on", Duration::from_secs(10))?;
    let secret = "the-secret-order-4242";
    let answer = call(c, &client, &target, secret)?;
    println!(
        "  shop/client → shop/web ({target}) sent {secret:?}; web answered {:?}",
        answer.trim()
    );
    // For contrast, the same kind of call from outside the mesh crosses the wire in clear
    // (the capture does see plaintext when there is some).
    let clear = "plaintext-from-legacy-77";
    call(c, &old, &target, clear)?;
    println!("  legacy/old → shop/web sent {clear:?} (no mesh on its side)");
    std::thread::sleep(Duration::from_millis(500));
    tcpdump.stop(Duration::from_secs(5))?;
    let captured = std::fs::read(&pcap).with_context(|| format!("reading {}", pcap.display()))?;
    let found = |m: &str| captured.windows(m.len()).any(|w| w == m.as_bytes());
    println!(
        "  captured {} bytes between the nodes: {secret:?} {}, {clear:?} {}",
        captured.len(),
        if found(secret) {
            "FOUND in clear"
        } else {
            "not found (encrypted)"
        },
        if found(clear) {
            "found in clear"
        } else {
            "not found"
        },
    );
    if found(secret) {
        bail!("the mesh message crossed the wire in plaintext");
    }
    if !found(clear) {
        bail!("the capture did not see the plaintext call: it proves nothing");
    }
    let line = mesh
        .access_log("node2")?
        .into_iter()
        .rev()
        .find(|l| l["fields"]["dst"] == target.as_str() && l["fields"]["route"] == "hbone")
        .context("no HBONE access-log line at the destination")?;
    let f = &line["fields"];
    println!(
        "  node2's ztunnel: route={} peer={} dst={} bytes={}/{}",
        f["route"], f["peer_identity"], f["dst"], f["bytes_sent"], f["bytes_received"]
    );

    step(
        4,
        "an AuthorizationPolicy applied from a file denies dev → shop",
    );
    let policy = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-dev\n  namespace: shop\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [\"dev\"]\n";
    println!(
        "{}",
        policy
            .lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    mesh.apply("deny-dev.yaml", policy)?;
    eventually("the policy in effect", Duration::from_secs(20), || {
        Ok(call(c, &tool, &target, "hello").is_err())
    })?;
    println!("  dev/tool → shop/web: refused");
    let deny = mesh
        .access_log("node2")?
        .into_iter()
        .rev()
        .find(|l| {
            l["fields"]["result"]
                .as_str()
                .unwrap_or("")
                .contains("shop/deny-dev")
        })
        .context("no deny in the destination's log")?;
    println!("  node2's ztunnel logged: {}", deny["fields"]["result"]);
    call(c, &client, &target, "still fine")?;
    println!("  shop/client → shop/web: still allowed");

    step(5, "the policy is removed: dev → shop is allowed again");
    let file = n1.state_dir().join("control-plane/config/deny-dev.yaml");
    std::fs::remove_file(&file)?;
    eventually("the policy lifted", Duration::from_secs(20), || {
        Ok(call(c, &tool, &target, "hello again").is_ok())
    })?;
    println!("  dev/tool → shop/web: allowed");

    step(
        6,
        "L7: a waypoint for shop/api; an HTTPRoute splits 90/10 across two versions, a header picks v2",
    );
    let mut servers = Vec::new();
    for version in ["v1", "v2"] {
        let pod = c.add_pod(
            n2,
            "shop",
            &format!("api-{version}"),
            "api",
            &[("app", "api"), ("version", version)],
        )?;
        mesh.register_pod(c, &pod)?;
        mesh.wait_captured(c, &pod, true)?;
        let mut cmd = testapp()?;
        cmd.args(["serve", "--http", "0.0.0.0:8080"])
            .env("POD_NAME", &pod.name);
        let mut p = c.spawn(&pod, &format!("api-{version}-server"), cmd)?;
        p.wait_for_output("listening http", Duration::from_secs(10))?;
        servers.push(p);
    }
    let (waypoint, _waypoint_proc) =
        mesh.start_waypoint(c, n1, "shop", "waypoint", "10.96.0.50", &[])?;
    println!(
        "  waypoint shop/waypoint on node1 at {} (identity spiffe://cluster.local/ns/shop/sa/waypoint): ready",
        waypoint.ip
    );
    let l7 = "apiVersion: v1\nkind: Service\nmetadata: {name: api, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}\nspec: {clusterIP: 10.96.0.20, selector: {app: api}, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: api-v1, namespace: shop}\nspec: {clusterIP: 10.96.0.21, selector: {app: api, version: v1}, ports: [{name: http, port: 80, targetPort: 8080}]}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: api-v2, namespace: shop}\nspec: {clusterIP: 10.96.0.22, selector: {app: api, version: v2}, ports: [{name: http, port: 80, targetPort: 8080}]}\n";
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: api, namespace: shop}\nspec:\n  parentRefs: [{group: \"\", kind: Service, name: api, port: 80}]\n  rules:\n  - matches: [{headers: [{name: x-version, value: v2}]}]\n    backendRefs: [{name: api-v2, port: 80}]\n  - backendRefs:\n    - {name: api-v1, port: 80, weight: 90}\n    - {name: api-v2, port: 80, weight: 10}\n";
    println!(
        "{}",
        route
            .lines()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    mesh.apply("api.yaml", l7)?;
    mesh.apply("api-route.yaml", route)?;
    let http = |extra: &[&str], n: usize| -> Result<serde_json::Value> {
        let mut cmd = testapp()?;
        cmd.args([
            "http",
            "http://10.96.0.20/",
            "--requests",
            &n.to_string(),
            "--expect-status",
            "200",
        ])
        .args(extra);
        Ok(serde_json::from_str(
            c.run(&client, "api-call", cmd)?.trim(),
        )?)
    };
    eventually("the route at the waypoint", Duration::from_secs(20), || {
        Ok(http(&["--header", "x-version: v2"], 5).is_ok_and(|v| v["pods"]["api-v2"] == 5))
    })?;
    let split = http(&[], 200)?;
    let n = |v: &serde_json::Value, k: &str| v["pods"][k].as_u64().unwrap_or(0);
    println!(
        "  shop/client → api (10.96.0.20:80), 200 requests: api-v1 answered {}, api-v2 answered {}",
        n(&split, "api-v1"),
        n(&split, "api-v2")
    );
    let header = http(&["--header", "x-version: v2"], 10)?;
    println!(
        "  with x-version: v2, 10 requests: api-v2 answered {}",
        n(&header, "api-v2")
    );
    let peer = header["last_body"]["peer"]
        .as_str()
        .unwrap_or("")
        .to_string();
    println!("  api-v2 saw its caller as {peer}: the waypoint, which its ztunnel verified");

    if wait {
        println!(
            "\nThe mesh keeps running. Logs: {}\nTry: ip netns exec {}-shop-client curl ... | Ctrl-C tears everything down.",
            c.log_dir().display(),
            c.id()
        );
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    drop(server);
    drop(servers);
    Ok(())
}
