//! The test cluster itself: pods reach each other by pod IP on one node and across nodes,
//! CNI DEL releases a pod's IP, and nothing of ours survives a teardown, a panic, or a test
//! process that was killed. These run as root on network namespaces; without root they fail.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use trellis_e2e::app::{serve, testapp};
use trellis_e2e::{Cluster, Netns, cni::CniError, with_cluster};

fn json(out: &str) -> Result<Value> {
    serde_json::from_str(out.trim()).with_context(|| format!("not JSON: {out}"))
}

fn in_subnet(ip: std::net::Ipv4Addr, cidr: &str) -> bool {
    let prefix = cidr.trim_end_matches(".0/24");
    ip.to_string().rsplit_once('.').map(|(p, _)| p) == Some(prefix)
}

#[test]
fn pod_to_pod_within_a_node_and_across_nodes() {
    with_cluster("pod_to_pod", 2, |c| {
        let (n1, n2) = (&c.nodes()[0], &c.nodes()[1]);
        let client = c.add_pod(n1, "default", "client", "default", &[("app", "client")])?;
        let near = c.add_pod(n1, "default", "near", "near", &[("app", "near")])?;
        let far = c.add_pod(n2, "other", "far", "far", &[("app", "far")])?;
        ensure!(
            in_subnet(client.ip, &n1.pod_cidr()),
            "{} not in {}",
            client.ip,
            n1.pod_cidr()
        );
        ensure!(
            in_subnet(near.ip, &n1.pod_cidr()),
            "{} not in {}",
            near.ip,
            n1.pod_cidr()
        );
        ensure!(
            in_subnet(far.ip, &n2.pod_cidr()),
            "{} not in {}",
            far.ip,
            n2.pod_cidr()
        );

        let _near_srv = serve(c, &near)?;
        let _far_srv = serve(c, &far)?;

        for target in [&near, &far] {
            // 8 MiB through the echo server, every byte checked.
            let mut cmd = testapp();
            cmd.args(["tcp", &format!("{}:9000", target.ip), "--bytes", "8388608"]);
            let out = json(&c.run(&client, &format!("tcp-to-{}", target.name), cmd)?)?;
            ensure!(
                out["intact"] == true && out["received"] == 8388608,
                "echo from {}: {out}",
                target.name
            );

            // HTTP/1.1 and HTTP/2: the server is who we meant, and it saw the client's own
            // pod IP (routed, not NATed).
            for http2 in [false, true] {
                let mut cmd = testapp();
                cmd.args([
                    "http",
                    &format!("http://{}:8080/hello?x=1", target.ip),
                    "--requests",
                    "5",
                ]);
                cmd.args(["--header", "x-test: yes", "--expect-status", "200"]);
                if http2 {
                    cmd.arg("--http2");
                }
                let out = json(&c.run(&client, &format!("http-to-{}", target.name), cmd)?)?;
                let body = &out["last_body"];
                ensure!(
                    body["pod"] == target.name.as_str(),
                    "answered by {}",
                    body["pod"]
                );
                ensure!(body["path"] == "/hello?x=1", "path {}", body["path"]);
                ensure!(
                    body["headers"]["x-test"] == "yes",
                    "headers {}",
                    body["headers"]
                );
                let want_version = if http2 { "HTTP/2.0" } else { "HTTP/1.1" };
                ensure!(
                    body["version"] == want_version,
                    "version {}",
                    body["version"]
                );
                let peer = body["peer"].as_str().unwrap_or_default();
                ensure!(
                    peer.starts_with(&format!("{}:", client.ip)),
                    "{} saw peer {peer}, expected the client pod {}",
                    target.name,
                    client.ip
                );
                ensure!(out["statuses"]["200"] == 5, "statuses {}", out["statuses"]);
            }
        }

        // A node reaches its own pods, and the underlay carries nothing addressed to pods
        // directly: the other node's pods are reached only through node routing.
        let mut cmd = testapp();
        cmd.args([
            "tcp",
            &format!("{}:9000", far.ip),
            "--message",
            "from-node2",
        ]);
        let out = json(&c.run(n2, "node2-to-far", cmd)?)?;
        ensure!(out["reply"] == "from-node2", "reply {}", out["reply"]);
        Ok(())
    });
}

#[test]
fn cni_del_releases_the_pod_ip() {
    with_cluster("cni_del", 1, |c| {
        let node = &c.nodes()[0];
        let pod = c.add_pod(node, "default", "short-lived", "default", &[])?;
        let lease = c.ipam_lease(&pod)?;
        let held = std::fs::read_to_string(&lease)
            .with_context(|| format!("no IPAM lease {} for {}", lease.display(), pod.ip))?;
        ensure!(
            held.contains(&pod.container_id),
            "lease {} holds {held:?}",
            lease.display()
        );
        c.check_pod(&pod).context("CNI CHECK of a healthy pod")?;

        c.remove_pod(&pod)?;
        ensure!(!lease.exists(), "IP {} still leased after CNI DEL", pod.ip);
        ensure!(
            !trellis_e2e::our_netns()?.contains(&pod.netns().to_string()),
            "pod namespace {} still exists",
            pod.netns()
        );
        ensure!(c.pods().is_empty(), "cluster still lists {:?}", c.pods());

        // The node keeps working: a new pod gets an address and a lease.
        let next = c.add_pod(node, "default", "next", "default", &[])?;
        ensure!(c.ipam_lease(&next)?.exists(), "no lease for the next pod");
        Ok(())
    });
}

#[test]
fn bad_cni_config_and_plugin_errors_are_reported() {
    with_cluster("bad_cni", 1, |c| {
        let node = &c.nodes()[0];
        // A runtime picks the first list in lexical order: a broken one shadows ours.
        let broken = node.cni_conf_dir().join("00-broken.conflist");
        std::fs::write(&broken, "{ not json")?;
        let err = c.add_pod(node, "default", "a", "default", &[]).unwrap_err();
        ensure!(
            format!("{err:#}").contains("00-broken.conflist"),
            "error does not name the file: {err:#}"
        );

        // A list the plugin rejects: the plugin's CNI error object comes back typed.
        std::fs::write(
            &broken,
            r#"{"cniVersion":"1.0.0","name":"broken","plugins":[{"type":"bridge","bridge":"broken0",
               "ipam":{"type":"host-local","ranges":[[{"subnet":"not-a-cidr"}]]}}]}"#,
        )?;
        let err = c.add_pod(node, "default", "b", "default", &[]).unwrap_err();
        let cni = err
            .chain()
            .find_map(|e| e.downcast_ref::<CniError>())
            .with_context(|| format!("not a CNI error: {err:#}"))?;
        ensure!(
            cni.plugin == "bridge" && cni.command == "ADD" && cni.code > 0,
            "{cni:?}"
        );
        ensure!(!cni.msg.is_empty(), "{cni:?}");
        let left: Vec<String> = trellis_e2e::our_netns()?
            .into_iter()
            .filter(|n| n.starts_with(&format!("{}-default-", c.id())))
            .collect();
        ensure!(left.is_empty(), "failed pods left namespaces {left:?}");

        std::fs::remove_file(&broken)?;
        c.add_pod(node, "default", "c", "default", &[])
            .context("the good list works again")?;
        Ok(())
    });
}

fn host_links() -> BTreeSet<String> {
    let out = Command::new("ip")
        .args(["-o", "link"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|s| s.trim().to_string()))
        .collect()
}

fn assert_gone(id: &str) {
    let left: Vec<String> = trellis_e2e::our_netns()
        .unwrap()
        .into_iter()
        .filter(|n| n.starts_with(&format!("{id}-")))
        .collect();
    assert!(left.is_empty(), "namespaces of {id} left: {left:?}");
    let state = std::path::Path::new(trellis_e2e::STATE_ROOT).join(id);
    assert!(!state.exists(), "state directory {} left", state.display());
}

#[test]
fn teardown_leaves_nothing() {
    let links_before = host_links();
    let c = Cluster::builder("teardown").nodes(2).build().unwrap();
    let id = c.id().to_string();
    let a = c
        .add_pod(&c.nodes()[0], "default", "a", "default", &[])
        .unwrap();
    c.add_pod(&c.nodes()[1], "default", "b", "default", &[])
        .unwrap();
    let mut server = serve(&c, &a).unwrap();
    // A process on a node, too (ztunnel and the node agent will run there).
    let mut cmd = testapp();
    cmd.args(["serve", "--http", "0.0.0.0:8080"]);
    let mut on_node = c.spawn(&c.nodes()[1], "node-server", cmd).unwrap();
    on_node
        .wait_for_output("listening", Duration::from_secs(10))
        .unwrap();
    let log_dir = c.log_dir().to_path_buf();

    c.teardown().unwrap();
    assert_gone(&id);
    assert!(!server.is_running(), "pod process survived teardown");
    assert!(!on_node.is_running(), "node process survived teardown");
    drop(c);
    assert!(!log_dir.exists(), "logs of a passing test are removed");
    // Everything lived inside the cluster's namespaces: the host's links never changed.
    assert_eq!(host_links(), links_before);
}

#[test]
fn a_panicking_test_is_cleaned_up_and_keeps_its_logs() {
    let seen: Mutex<Option<(String, std::path::PathBuf)>> = Mutex::new(None);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let c = Cluster::builder("panics").nodes(1).build().unwrap();
        let pod = c
            .add_pod(&c.nodes()[0], "default", "p", "default", &[])
            .unwrap();
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo output-before-the-panic; exec sleep 600"]);
        let mut p = c.spawn(&pod, "sleeper", cmd).unwrap();
        p.wait_for_output("output-before-the-panic", Duration::from_secs(5))
            .unwrap();
        *seen.lock().unwrap() = Some((c.id().to_string(), c.log_dir().to_path_buf()));
        std::mem::forget(p); // even a leaked process handle must not leave the process
        panic!("deliberate failure");
    }));
    assert!(result.is_err(), "the closure was meant to panic");
    let (id, log_dir) = seen.lock().unwrap().take().expect("cluster was built");
    assert_gone(&id);
    let logs: String = std::fs::read_dir(&log_dir)
        .expect("log folder kept after a failure")
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    assert!(
        logs.contains("output-before-the-panic"),
        "kept logs: {logs}"
    );
    std::fs::remove_dir_all(&log_dir).unwrap();
}

#[test]
fn clusters_of_a_killed_test_process_are_swept() {
    let c = Cluster::builder("killed").nodes(2).build().unwrap();
    let id = c.id().to_string();
    let pod = c
        .add_pod(&c.nodes()[0], "default", "orphan", "default", &[])
        .unwrap();
    let mut cmd = Command::new("sleep");
    cmd.arg("600");
    let p = c.spawn(&pod, "orphan-sleeper", cmd).unwrap();
    let pid = p.pid();
    let log_dir = c.log_dir().to_path_buf();
    // What SIGKILL of the test process leaves: no teardown ran, and the owner is gone
    // (a pid that is not running).
    std::mem::forget(p);
    std::mem::forget(c);
    let owner = std::path::Path::new(trellis_e2e::STATE_ROOT)
        .join(&id)
        .join("owner");
    std::fs::write(&owner, "999999999 1\n").unwrap();

    let swept = trellis_e2e::sweep_stale().unwrap();
    assert!(swept.contains(&id), "sweep did not take {id}: {swept:?}");
    assert_gone(&id);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .next();
    assert!(
        matches!(state, None | Some("Z")),
        "orphan process {pid} still running: {stat}"
    );
    let _ = std::fs::remove_dir_all(log_dir);
}

/// Set in the child half of [`sigterm_tears_the_cluster_down`].
const SIGNAL_CHILD: &str = "TRELLIS_E2E_SIGNAL_CHILD";

#[test]
fn sigterm_tears_the_cluster_down() {
    if std::env::var_os(SIGNAL_CHILD).is_some() {
        // Child: a test process in the middle of its work, as nextest's timeout or Ctrl-C
        // finds it.
        let c = Cluster::builder("sigterm-child").nodes(1).build().unwrap();
        let pod = c
            .add_pod(&c.nodes()[0], "default", "p", "default", &[])
            .unwrap();
        let mut cmd = Command::new("sleep");
        cmd.arg("600");
        let _p = c.spawn(&pod, "sleeper", cmd).unwrap();
        println!("cluster-id {}", c.id());
        std::thread::sleep(Duration::from_secs(600));
        unreachable!("the parent sends SIGTERM long before");
    }
    use std::io::BufRead;
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "sigterm_tears_the_cluster_down",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(SIGNAL_CHILD, "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let id = std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
        // libtest prints "test NAME ... " before the test's own output on the same line.
        .find_map(|l| l.split("cluster-id ").nth(1).map(str::to_string))
        .expect("child printed its cluster id");
    assert!(
        trellis_e2e::our_netns()
            .unwrap()
            .iter()
            .any(|n| n.starts_with(&id)),
        "the child's cluster exists before the signal"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(128 + 15),
        "exit status after SIGTERM: {status}"
    );
    assert_gone(&id);
}
