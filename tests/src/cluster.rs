//! The cluster: nodes and pods as network namespaces, pods wired by the real CNI plugins.
//!
//! ```text
//!   underlay netns <id>-underlay: bridge br0
//!     ├─ veth n1 ── eth0 172.18.0.2  node netns <id>-node1  (cni0 10.244.1.1/24, pods 10.244.1.x)
//!     └─ veth n2 ── eth0 172.18.0.3  node netns <id>-node2  (cni0 10.244.2.1/24, pods 10.244.2.x)
//! ```
//! Each node routes every other node's pod CIDR via that node's underlay address, so pods
//! reach each other by pod IP across nodes without NAT, as in a kind cluster.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::cleanup::{self, NAME_PREFIX};
use crate::cni::{self, Attachment, Runtime};
use crate::exec::{Proc, append_log, describe, ip, run_with_timeout, tail};
use crate::netns::Netns;

/// Name of the CNI network in every node's configuration list.
pub const NETWORK_NAME: &str = "trellis-e2e";
/// Where the CNI reference plugins are installed on Debian.
pub const CNI_PLUGIN_DIR: &str = "/usr/lib/cni";
/// Interface name of the pod side, as container runtimes use.
const POD_IFNAME: &str = "eth0";
/// Default deadline of [`Cluster::run`].
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long processes get to exit on SIGTERM at teardown before they are killed.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// A node: a network namespace with an underlay interface, a CNI configuration and bin
/// directory of its own, and a pod CIDR.
#[derive(Debug, Clone)]
pub struct Node {
    name: String,
    netns: String,
    underlay_ip: Ipv4Addr,
    pod_subnet: Ipv4Addr,
    index: u16,
    dir: PathBuf,
}

impl Node {
    /// `node1`, `node2`, ...
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The node's address on the underlay network.
    pub fn underlay_ip(&self) -> Ipv4Addr {
        self.underlay_ip
    }
    /// The node's pod CIDR (always a /24).
    pub fn pod_cidr(&self) -> String {
        format!("{}/24", self.pod_subnet)
    }
    /// The pod network's gateway on this node (the `cni0` bridge address).
    pub fn pod_gateway(&self) -> Ipv4Addr {
        let [a, b, c, _] = self.pod_subnet.octets();
        Ipv4Addr::new(a, b, c, 1)
    }
    /// The node's IPv6 address on the underlay (dual-stack clusters).
    pub fn underlay_ip6(&self) -> std::net::Ipv6Addr {
        std::net::Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 1 + self.index)
    }
    /// The node's IPv6 pod CIDR (dual-stack clusters; a /64).
    pub fn pod_cidr6(&self) -> String {
        format!("fd00:10:{:x}::/64", self.index)
    }
    /// The IPv6 pod gateway (`cni0`) on this node (dual-stack clusters).
    pub fn pod_gateway6(&self) -> std::net::Ipv6Addr {
        std::net::Ipv6Addr::new(0xfd00, 0x10, self.index, 0, 0, 0, 0, 1)
    }
    /// The node's own folder for state (sockets, credentials of what runs on it).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.clone()
    }
    /// The node's CNI configuration directory (its `/etc/cni/net.d`).
    pub fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("net.d")
    }
    /// A CNI bin directory of the node's own (its `/opt/cni/bin`), searched before the
    /// reference plugins; empty until something installs a plugin there.
    pub fn cni_bin_dir(&self) -> PathBuf {
        self.dir.join("bin")
    }
    /// host-local's lease directory for this node.
    pub fn ipam_dir(&self) -> PathBuf {
        self.dir.join("ipam")
    }
    fn runtime(&self) -> Runtime {
        Runtime {
            exec_netns: self.netns.clone(),
            conf_dir: self.cni_conf_dir(),
            bin_dirs: vec![self.cni_bin_dir(), PathBuf::from(CNI_PLUGIN_DIR)],
            cache_dir: self.dir.join("results"),
        }
    }
}

impl Netns for Node {
    fn netns(&self) -> &str {
        &self.netns
    }
}

/// A pod: a network namespace attached to its node's pod network by CNI ADD.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Service account (its identity in the mesh).
    pub service_account: String,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// Name of the node it runs on.
    pub node: String,
    /// Pod UID (`K8S_POD_UID`).
    pub uid: String,
    /// Sandbox container id (`CNI_CONTAINERID`).
    pub container_id: String,
    /// Pod IP assigned by IPAM.
    pub ip: Ipv4Addr,
    /// Its IPv6 address, in a dual-stack cluster.
    pub ip6: Option<std::net::Ipv6Addr>,
    /// The CNI ADD result of the whole plugin list.
    pub cni_result: Value,
    netns: String,
}

impl Pod {
    /// Path of the pod's network namespace (`CNI_NETNS`).
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }
    fn attachment(&self) -> Attachment {
        Attachment {
            container_id: self.container_id.clone(),
            netns_path: self.netns_path(),
            ifname: POD_IFNAME.to_string(),
            // What kubelet/containerd pass: IgnoreUnknown lets plugins that do not know
            // the K8S_* keys accept them.
            args: vec![
                ("IgnoreUnknown".into(), "1".into()),
                ("K8S_POD_NAMESPACE".into(), self.namespace.clone()),
                ("K8S_POD_NAME".into(), self.name.clone()),
                (
                    "K8S_POD_INFRA_CONTAINER_ID".into(),
                    self.container_id.clone(),
                ),
                ("K8S_POD_UID".into(), self.uid.clone()),
            ],
        }
    }
}

impl Netns for Pod {
    fn netns(&self) -> &str {
        &self.netns
    }
}

/// The underlay network namespace that joins the nodes.
#[derive(Debug, Clone)]
pub struct Underlay {
    netns: String,
}

impl Netns for Underlay {
    fn netns(&self) -> &str {
        &self.netns
    }
}

/// Builds a [`Cluster`].
#[derive(Debug)]
pub struct ClusterBuilder {
    test_name: String,
    nodes: usize,
    dual_stack: bool,
}

impl ClusterBuilder {
    /// Number of nodes (1 to 200; default 2).
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// Pods get an IPv6 address too (the underlay and the pod networks are dual-stack).
    pub fn dual_stack(mut self) -> Self {
        self.dual_stack = true;
        self
    }

    /// Creates the namespaces, the underlay and the nodes' CNI configuration.
    pub fn build(self) -> Result<Cluster> {
        if !(1..=200).contains(&self.nodes) {
            bail!("a cluster has 1 to 200 nodes, not {}", self.nodes);
        }
        crate::preflight()?;
        cleanup::install_signal_handler()?;
        cleanup::sweep_stale().context("removing what earlier runs left behind")?;

        std::fs::create_dir_all(cleanup::STATE_ROOT)?;
        // The state directory doubles as the lock on the id: create_dir fails if it exists.
        let id = loop {
            let id = format!("{NAME_PREFIX}{}", &random_hex(3));
            match std::fs::create_dir(cleanup::state_dir(&id)) {
                Ok(()) => break id,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e).context("cannot create the cluster state directory"),
            }
        };
        let state_dir = cleanup::state_dir(&id);
        if let Err(e) = cleanup::write_owner(&state_dir) {
            let _ = std::fs::remove_dir_all(&state_dir);
            return Err(e);
        }
        cleanup::register(&id);

        let log_root = std::env::var_os("TRELLIS_E2E_LOG_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("trellis-e2e-logs"));
        let log_dir = log_root.join(format!("{}-{id}", sanitize(&self.test_name)));
        if let Err(e) = std::fs::create_dir_all(&log_dir) {
            let _ = cleanup::destroy(&id);
            return Err(e).with_context(|| format!("cannot create {}", log_dir.display()));
        }

        let nodes = (1..=self.nodes)
            .map(|i| {
                let i8 = u8::try_from(i).expect("at most 200 nodes");
                Node {
                    name: format!("node{i}"),
                    netns: format!("{id}-node{i}"),
                    underlay_ip: Ipv4Addr::new(172, 18, 0, 1 + i8),
                    pod_subnet: Ipv4Addr::new(10, 244, i8, 0),
                    index: u16::from(i8),
                    dir: state_dir.join("nodes").join(format!("node{i}")),
                }
            })
            .collect();
        let cluster = Cluster {
            underlay: Underlay {
                netns: format!("{id}-underlay"),
            },
            id,
            log_dir,
            nodes,
            dual_stack: self.dual_stack,
            pods: Mutex::new(BTreeMap::new()),
            pod_created: PodCreatedHook::default(),
            seq: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            torn_down: AtomicBool::new(false),
        };
        // On error the cluster is dropped here, which tears down what was built.
        cluster.wire().context("building the cluster network")?;
        Ok(cluster)
    }
}

/// What [`Cluster::on_pod_created`] runs.
pub type PodCreated = std::sync::Arc<dyn Fn(&Pod) -> Result<()> + Send + Sync>;

/// The hook slot (closures have no `Debug`).
#[derive(Default)]
struct PodCreatedHook(Mutex<Option<PodCreated>>);

impl std::fmt::Debug for PodCreatedHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PodCreatedHook")
    }
}

/// A multi-node cluster made of network namespaces. Dropping it tears everything down
/// (processes, pods via CNI DEL, namespaces, state); the log folder stays when the test
/// failed.
#[derive(Debug)]
pub struct Cluster {
    id: String,
    log_dir: PathBuf,
    underlay: Underlay,
    nodes: Vec<Node>,
    dual_stack: bool,
    pods: Mutex<BTreeMap<(String, String), Pod>>,
    /// Called for each new pod before its CNI ADD (the Pod object exists before the
    /// runtime sets up its sandbox; see [`Cluster::on_pod_created`]).
    pod_created: PodCreatedHook,
    seq: AtomicUsize,
    failed: AtomicBool,
    torn_down: AtomicBool,
}

impl Cluster {
    /// Starts building a cluster for the test `test_name` (used to name its log folder).
    pub fn builder(test_name: &str) -> ClusterBuilder {
        ClusterBuilder {
            test_name: test_name.to_string(),
            nodes: 2,
            dual_stack: false,
        }
    }

    /// The cluster's unique id; every namespace of the cluster is named `<id>-...`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The per-test folder holding every process's output.
    pub fn log_dir(&self) -> &Path {
        &self.log_dir
    }

    /// The nodes, `node1` first.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> Result<&Node> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .ok_or_else(|| anyhow!("no node {name:?} in this cluster"))
    }

    /// The underlay namespace (to capture traffic between nodes, for instance).
    pub fn underlay(&self) -> &Underlay {
        &self.underlay
    }

    fn wire(&self) -> Result<()> {
        let ul = &self.underlay.netns;
        ip(&["netns", "add", ul])?;
        ip(&["-n", ul, "link", "set", "lo", "up"])?;
        ip(&["-n", ul, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", ul, "link", "set", "br0", "up"])?;
        for node in &self.nodes {
            let ns = &node.netns;
            let port = format!("n{}", &node.name[4..]);
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            ip(&[
                "-n", ul, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ])?;
            ip(&["-n", ul, "link", "set", &port, "master", "br0", "up"])?;
            let addr = format!("{}/24", node.underlay_ip);
            ip(&["-n", ns, "addr", "add", &addr, "dev", "eth0"])?;
            if self.dual_stack {
                // No duplicate address detection: addresses are usable at once.
                for knob in ["all", "default", "eth0"] {
                    sysctl_in(ns, &format!("net.ipv6.conf.{knob}.accept_dad=0"))?;
                }
                sysctl_in(ns, "net.ipv6.conf.all.forwarding=1")?;
                let addr6 = format!("{}/64", node.underlay_ip6());
                ip(&["-n", ns, "addr", "add", &addr6, "dev", "eth0", "nodad"])?;
            }
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            for other in self.nodes.iter().filter(|o| o.name != node.name) {
                let via = other.underlay_ip.to_string();
                ip(&["-n", ns, "route", "add", &other.pod_cidr(), "via", &via])?;
                if self.dual_stack {
                    let via6 = other.underlay_ip6().to_string();
                    ip(&[
                        "-n",
                        ns,
                        "-6",
                        "route",
                        "add",
                        &other.pod_cidr6(),
                        "via",
                        &via6,
                    ])?;
                }
            }
            // The node forwards between its pods (cni0) and the underlay (eth0).
            let mut sysctl = Command::new("ip");
            sysctl.args([
                "netns",
                "exec",
                ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ]);
            let out = run_with_timeout(&mut sysctl, None, Duration::from_secs(10))?;
            if !out.status.success() {
                bail!(
                    "enabling forwarding on {}: {}",
                    node.name,
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            for dir in [node.cni_conf_dir(), node.cni_bin_dir(), node.ipam_dir()] {
                std::fs::create_dir_all(dir)?;
            }
            let conflist = self.conflist(node);
            std::fs::write(
                node.cni_conf_dir().join("10-trellis-e2e.conflist"),
                serde_json::to_vec_pretty(&conflist)?,
            )?;
        }
        Ok(())
    }

    /// The node's network configuration list: the reference `bridge` plugin with
    /// `host-local` IPAM. It is a list so that Trellis's own plugin can be chained after it.
    fn conflist(&self, node: &Node) -> Value {
        let mut ranges = vec![json!([{
            "subnet": node.pod_cidr(),
            "gateway": node.pod_gateway().to_string(),
        }])];
        let mut routes = vec![json!({"dst": "0.0.0.0/0"})];
        if self.dual_stack {
            ranges.push(json!([{
                "subnet": node.pod_cidr6(),
                "gateway": node.pod_gateway6().to_string(),
            }]));
            routes.push(json!({"dst": "::/0"}));
        }
        json!({
            "cniVersion": "1.0.0",
            "name": NETWORK_NAME,
            "plugins": [{
                "type": "bridge",
                "bridge": "cni0",
                "isGateway": true,
                // No masquerading: pod IPs stay visible across nodes, as in kind.
                "ipMasq": false,
                "hairpinMode": true,
                "ipam": {
                    "type": "host-local",
                    "dataDir": node.ipam_dir(),
                    "ranges": ranges,
                    "routes": routes,
                },
            }],
        })
    }

    /// Runs `f` for every pod created from now on, before its CNI ADD, with the pod as it
    /// is then (no IP yet): on Kubernetes the Pod object exists, scheduled, before the
    /// kubelet asks the runtime for its sandbox (the mesh harness publishes it then).
    pub fn on_pod_created(&self, f: PodCreated) {
        *self.pod_created.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(f);
    }

    /// Creates pod `namespace/name` on `node`: a new network namespace, attached by running
    /// the node's CNI list (ADD) the way a container runtime does.
    pub fn add_pod(
        &self,
        node: &Node,
        namespace: &str,
        name: &str,
        service_account: &str,
        labels: &[(&str, &str)],
    ) -> Result<Pod> {
        for (what, v) in [
            ("namespace", namespace),
            ("name", name),
            ("service account", service_account),
        ] {
            if !is_dns_label(v) {
                bail!("pod {what} {v:?} is not a DNS label (lowercase letters, digits, '-')");
            }
        }
        let key = (namespace.to_string(), name.to_string());
        if self.lock_pods().contains_key(&key) {
            bail!("pod {namespace}/{name} already exists");
        }
        let netns = format!("{}-{namespace}-{name}", self.id);
        ip(&["netns", "add", &netns])?;
        let mut pod = Pod {
            name: name.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            node: node.name.clone(),
            uid: uuid(),
            container_id: random_hex(32),
            ip: Ipv4Addr::UNSPECIFIED,
            ip6: None,
            cni_result: Value::Null,
            netns,
        };
        let created = self
            .pod_created
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if self.dual_stack {
            for knob in ["all", "default"] {
                sysctl_in(&pod.netns, &format!("net.ipv6.conf.{knob}.accept_dad=0"))?;
            }
        }
        let attached = ip(&["-n", &pod.netns, "link", "set", "lo", "up"])
            .and_then(|_| created.map_or(Ok(()), |f| f(&pod)))
            .and_then(|_| node.runtime().add(&pod.attachment()));
        let attached = attached.and_then(|result| {
            let ip = cni::result_ipv4(&result)
                .ok_or_else(|| anyhow!("CNI ADD result has no IPv4 address: {result}"));
            if ip.is_err() {
                let _ = node.runtime().del(&pod.attachment());
            }
            Ok((result, ip?))
        });
        let (result, pod_ip) = match attached {
            Ok(r) => r,
            Err(e) => {
                let _ = ip(&["netns", "delete", &pod.netns]);
                return Err(e.context(format!(
                    "CNI ADD of pod {namespace}/{name} on {}",
                    node.name
                )));
            }
        };
        pod.ip = pod_ip;
        pod.ip6 = cni::result_ipv6(&result);
        if self.dual_stack && pod.ip6.is_none() {
            bail!("CNI ADD result of {namespace}/{name} has no IPv6 address: {result}");
        }
        pod.cni_result = result;
        // The pod's /etc/hosts, managed as the kubelet does: `ip netns exec` binds
        // /etc/netns/<netns>/hosts over /etc/hosts for every process started in the pod.
        let hosts = format!(
            "# managed by the test cluster (as the kubelet manages a pod's /etc/hosts)\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{name}\n",
            pod.ip
        );
        let dir = pod_etc(&pod.netns);
        std::fs::create_dir_all(&dir)
            .and_then(|_| std::fs::write(dir.join("hosts"), hosts))
            .with_context(|| format!("cannot write {}/hosts", dir.display()))?;
        self.lock_pods().insert(key, pod.clone());
        Ok(pod)
    }

    /// Adds `host` resolving to `ip` to the pod's /etc/hosts, as a pod spec's
    /// `hostAliases` does (the test cluster has no DNS server: this is its name service).
    /// Processes of the pod see it at their next lookup.
    pub fn add_host_alias(&self, pod: &Pod, host: &str, ip: std::net::IpAddr) -> Result<()> {
        use std::io::Write;
        let path = pod_etc(&pod.netns).join("hosts");
        let mut file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        writeln!(file, "{ip}\t{host}").with_context(|| format!("cannot write {}", path.display()))
    }

    /// Removes a pod as a runtime does: its processes are stopped, then CNI DEL releases its
    /// network (and IP), then its namespace is deleted.
    pub fn remove_pod(&self, pod: &Pod) -> Result<()> {
        let node = self.node(&pod.node)?;
        let ns = [pod.netns.clone()];
        cleanup::signal_all(&ns, Signal::SIGTERM, STOP_GRACE)?;
        cleanup::signal_all(&ns, Signal::SIGKILL, STOP_GRACE)?;
        node.runtime()
            .del(&pod.attachment())
            .with_context(|| format!("CNI DEL of pod {}/{}", pod.namespace, pod.name))?;
        ip(&["netns", "delete", &pod.netns])?;
        let _ = std::fs::remove_dir_all(pod_etc(&pod.netns));
        self.lock_pods()
            .remove(&(pod.namespace.clone(), pod.name.clone()));
        Ok(())
    }

    /// Runs CNI CHECK for a pod: every plugin verifies the pod's network is as it set it up.
    pub fn check_pod(&self, pod: &Pod) -> Result<()> {
        self.node(&pod.node)?.runtime().check(&pod.attachment())
    }

    /// The pods that exist now.
    pub fn pods(&self) -> Vec<Pod> {
        self.lock_pods().values().cloned().collect()
    }

    /// host-local's lease file for the pod's IP (present while the IP is allocated).
    pub fn ipam_lease(&self, pod: &Pod) -> Result<PathBuf> {
        Ok(cni::ipam_lease(
            &self.node(&pod.node)?.ipam_dir(),
            NETWORK_NAME,
            pod.ip,
        ))
    }

    /// Starts `cmd` inside the network namespace of `at`; output goes to `<log_dir>/NN-name.log`.
    pub fn spawn(&self, at: &impl Netns, name: &str, cmd: Command) -> Result<Proc> {
        let wrapped = wrap_in_netns(at.netns(), &cmd);
        Proc::spawn(name, wrapped, self.next_log(name))
    }

    /// Runs `cmd` inside `at` to completion (two minutes at most) and returns its stdout.
    /// Output is logged; a failure's error holds the exit status and the output's tail.
    pub fn run(&self, at: &impl Netns, name: &str, cmd: Command) -> Result<String> {
        self.run_timeout(at, name, cmd, RUN_TIMEOUT)
    }

    /// [`Cluster::run`] with an explicit deadline.
    pub fn run_timeout(
        &self,
        at: &impl Netns,
        name: &str,
        cmd: Command,
        timeout: Duration,
    ) -> Result<String> {
        self.run_inner(at, name, cmd, None, timeout)
    }

    /// [`Cluster::run`] with `input` on the command's stdin.
    pub fn run_with_input(
        &self,
        at: &impl Netns,
        name: &str,
        cmd: Command,
        input: &[u8],
    ) -> Result<String> {
        self.run_inner(at, name, cmd, Some(input), RUN_TIMEOUT)
    }

    fn run_inner(
        &self,
        at: &impl Netns,
        name: &str,
        cmd: Command,
        input: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<String> {
        let mut wrapped = wrap_in_netns(at.netns(), &cmd);
        let log = self.next_log(name);
        append_log(&log, &format!("$ {}\n", describe(&wrapped)))?;
        let out = run_with_timeout(&mut wrapped, input, timeout).inspect_err(|e| {
            let _ = append_log(&log, &format!("{e:#}\n"));
        })?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        append_log(&log, &format!("{stdout}{stderr}[{}]\n", out.status))?;
        if !out.status.success() {
            bail!(
                "{name} in {} failed ({}); output (log {}):\n{}",
                at.netns(),
                out.status,
                log.display(),
                tail(&format!("{stdout}{stderr}"), 40)
            );
        }
        Ok(stdout)
    }

    fn next_log(&self, name: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.log_dir.join(format!("{n:02}-{}.log", sanitize(name)))
    }

    fn lock_pods(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String), Pod>> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the test as failed: the log folder is kept at teardown.
    pub fn mark_failed(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }

    /// Where the logs are and the tail of each, for a failure message.
    pub fn report(&self) -> String {
        let mut s = format!(
            "logs of cluster {} kept in {}\n",
            self.id,
            self.log_dir.display()
        );
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.log_dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        files.sort();
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            s.push_str(&format!(
                "--- {} (last lines) ---\n{}\n",
                f.display(),
                tail(&text, 20)
            ));
        }
        s
    }

    /// Tears the cluster down: stops every process in its namespaces (SIGTERM, then
    /// SIGKILL), removes every pod with CNI DEL, deletes every namespace and the state
    /// directory, and verifies nothing is left. Idempotent; `Drop` calls it too.
    pub fn teardown(&self) -> Result<()> {
        if self.torn_down.load(Ordering::SeqCst) {
            return Ok(());
        }
        let mut errors = Vec::new();
        match cleanup::cluster_netns(&self.id) {
            Ok(nss) => {
                if let Err(e) = cleanup::signal_all(&nss, Signal::SIGTERM, STOP_GRACE) {
                    errors.push(format!("{e:#}"));
                }
            }
            Err(e) => errors.push(format!("{e:#}")),
        }
        for pod in self.pods() {
            let res = self
                .node(&pod.node)
                .and_then(|n| n.runtime().del(&pod.attachment()));
            if let Err(e) = res {
                errors.push(format!("CNI DEL of {}/{}: {e:#}", pod.namespace, pod.name));
            }
        }
        self.lock_pods().clear();
        if let Err(e) = cleanup::destroy(&self.id) {
            errors.push(format!("{e:#}"));
        }
        if errors.is_empty() {
            // Only a complete teardown counts: after a failure, Drop tries again.
            self.torn_down.store(true, Ordering::SeqCst);
            Ok(())
        } else {
            Err(anyhow!(
                "teardown of cluster {}: {}",
                self.id,
                errors.join("; ")
            ))
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        let result = self.teardown();
        let failed = panicking || self.failed.load(Ordering::Relaxed) || result.is_err();
        if failed {
            eprintln!("{}", self.report());
        } else {
            let _ = std::fs::remove_dir_all(&self.log_dir);
        }
        if let Err(e) = result {
            eprintln!("{e:#}");
            if !panicking {
                panic!("{e:#}");
            }
        }
    }
}

/// The directory whose files `ip netns exec` binds over /etc for processes in `netns`.
pub(crate) fn pod_etc(netns: &str) -> std::path::PathBuf {
    std::path::Path::new("/etc/netns").join(netns)
}

/// `ip netns exec NS PROGRAM ARGS...` with `cmd`'s environment and working directory.
fn wrap_in_netns(ns: &str, cmd: &Command) -> Command {
    let mut wrapped = Command::new("ip");
    wrapped
        .args(["netns", "exec", ns])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => wrapped.env(k, v),
            None => wrapped.env_remove(k),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `n` random bytes from the kernel, hex-encoded.
pub(crate) fn random_hex(n: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("reading /dev/urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random (version 4) UUID, as Kubernetes uses for pod UIDs.
fn uuid() -> String {
    let h = random_hex(16);
    // Version nibble 4, variant bits 10xx.
    let variant = (u8::from_str_radix(&h[16..17], 16).unwrap_or(0) & 0x3) | 0x8;
    format!(
        "{}-{}-4{}-{variant:x}{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

/// Sets a sysctl inside network namespace `ns`.
fn sysctl_in(ns: &str, setting: &str) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns, "sysctl", "-qw", setting]);
    let out = run_with_timeout(&mut cmd, None, Duration::from_secs(10))?;
    if !out.status.success() {
        bail!(
            "sysctl {setting} in {ns}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
