//! Trellis running on the test cluster: the control plane (YAML-directory source) on
//! node1's network, and a ztunnel and a node agent on every node, all the real binaries.
//! The agent installs `trellis-cni` into each node's CNI list itself, so pods added after
//! [`Mesh::start`] go through the real plugin.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use serde_json::Value;

use crate::{Cluster, Node, Pod, Proc};

/// The path of a workspace binary built next to the test binary (`cargo build --workspace`
/// and `cargo nextest run --workspace` build them all).
pub fn workspace_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // A test binary lives in target/<profile>/deps/, a binary in target/<profile>/.
    let here = exe
        .parent()
        .ok_or_else(|| anyhow!("unexpected binary location {}", exe.display()))?;
    let candidates = [Some(here), here.parent()];
    for dir in candidates.into_iter().flatten() {
        let bin = dir.join(name);
        if bin.exists() {
            return Ok(bin);
        }
    }
    bail!(
        "{name} is not built next to {}: run the tests with `cargo nextest run --workspace` (or `cargo build --workspace` first)",
        exe.display()
    )
}

/// Per-node processes.
pub struct NodeMesh {
    /// The node's name.
    pub node: String,
    /// Its ztunnel.
    pub ztunnel: Proc,
    /// Its node agent.
    pub agent: Proc,
}

/// Trellis on a cluster.
pub struct Mesh {
    /// The control plane.
    pub control_plane: Proc,
    /// Per node, in node order.
    pub nodes: Vec<NodeMesh>,
    config_dir: PathBuf,
    cp_dir: PathBuf,
    /// Extra arguments for ztunnels (re)started from now on.
    ztunnel_args: Vec<String>,
}

const CP_PORT: u16 = 15012;

fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if check()? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Mesh {
    /// Starts the control plane on node1 and ztunnel + node agent on every node, and waits
    /// until each agent has installed the plugin.
    pub fn start(c: &Cluster) -> Result<Mesh> {
        Self::start_with_mesh_config(c, None)
    }

    /// [`Mesh::start`], the control plane reading `mesh_config` (YAML) as its
    /// `--mesh-config` file.
    pub fn start_with_mesh_config(c: &Cluster, mesh_config: Option<&str>) -> Result<Mesh> {
        let n1 = &c.nodes()[0];
        let cp_dir = n1.state_dir().join("control-plane");
        let config_dir = cp_dir.join("config");
        std::fs::create_dir_all(&config_dir)?;
        if let Some(yaml) = mesh_config {
            std::fs::write(cp_dir.join("mesh.yaml"), yaml)?;
        }
        let roots = cp_dir.join("roots.pem");
        let control_plane = Self::spawn_control_plane(c, &cp_dir)?;
        let mut nodes = Vec::new();
        for node in c.nodes() {
            nodes.push(Self::start_node(c, node, &cp_dir, &roots, n1)?);
        }
        // Pods are published as the API server has them: scheduled, without an IP, before
        // their CNI ADD runs (`register_pod` adds the IP after).
        let dir = config_dir.clone();
        c.on_pod_created(std::sync::Arc::new(move |pod: &Pod| {
            write_manifest(&dir, &pod_file(pod), &pod_manifest(pod, false))
        }));
        let mesh = Mesh {
            control_plane,
            nodes,
            config_dir,
            cp_dir,
            ztunnel_args: Vec::new(),
        };
        for node in c.nodes() {
            wait_until(
                "the agent to install trellis-cni",
                Duration::from_secs(20),
                || {
                    let mut lists: Vec<PathBuf> = std::fs::read_dir(node.cni_conf_dir())?
                        .filter_map(|e| e.ok().map(|e| e.path()))
                        .filter(|p| p.extension().is_some_and(|x| x == "conflist"))
                        .collect();
                    lists.sort();
                    let Some(first) = lists.first() else {
                        return Ok(false);
                    };
                    Ok(std::fs::read_to_string(first)?.contains("\"trellis-cni\""))
                },
            )?;
        }
        Ok(mesh)
    }

    fn spawn_control_plane(c: &Cluster, cp_dir: &Path) -> Result<Proc> {
        let n1 = &c.nodes()[0];
        let mut cmd = Command::new(workspace_bin("trellis-control-plane")?);
        cmd.arg("serve");
        if cp_dir.join("mesh.yaml").exists() {
            cmd.arg("--mesh-config").arg(cp_dir.join("mesh.yaml"));
        }
        cmd.arg("--config-dir")
            .arg(cp_dir.join("config"))
            .arg("--state-dir")
            .arg(cp_dir.join("state"))
            .args([
                "--grpc-addr",
                &format!("{}:{CP_PORT}", n1.underlay_ip()),
                "--admin-addr",
                "127.0.0.1:15014",
                "--serving-name",
                &n1.underlay_ip().to_string(),
                "--poll-ms",
                "100",
            ])
            .arg("--write-roots")
            .arg(cp_dir.join("roots.pem"))
            .env("RUST_LOG", "info");
        let mut p = c.spawn(n1, "control-plane", cmd)?;
        p.wait_for_output("control plane serving", Duration::from_secs(20))?;
        Ok(p)
    }

    /// The mesh's trust bundle (PEM), as ztunnel gets it.
    pub fn roots_pem(&self) -> Result<String> {
        Ok(std::fs::read_to_string(self.cp_dir.join("roots.pem"))?)
    }

    /// The credential `node`'s ztunnel and agent authenticate to the control plane with.
    pub fn node_credential(&self, node: &Node) -> Result<String> {
        Ok(
            std::fs::read_to_string(node.state_dir().join("node-credential"))?
                .trim()
                .to_string(),
        )
    }

    /// A credential for a waypoint running as `identity` (what the chart gives a waypoint
    /// Deployment): it may obtain that identity's certificate and nothing else.
    pub fn waypoint_credential(&self, identity: &str) -> Result<String> {
        let out = Command::new(workspace_bin("trellis-control-plane")?)
            .arg("credential")
            .arg("--state-dir")
            .arg(self.cp_dir.join("state"))
            .args(["waypoint", identity])
            .output()?;
        ensure!(
            out.status.success(),
            "credential: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    /// The control plane's xDS and CA address (`https://…:15012`) and the name in its
    /// serving certificate.
    pub fn control_plane_url(&self, c: &Cluster) -> (String, String) {
        let ip = c.nodes()[0].underlay_ip();
        (format!("https://{ip}:{CP_PORT}"), ip.to_string())
    }

    /// Stops the control plane (the data plane keeps its last config).
    pub fn stop_control_plane(&mut self) -> Result<()> {
        self.control_plane.stop(Duration::from_secs(5))?;
        Ok(())
    }

    /// Starts the control plane again (same CA root and config directory).
    pub fn start_control_plane(&mut self, c: &Cluster) -> Result<()> {
        self.control_plane = Self::spawn_control_plane(c, &self.cp_dir)?;
        Ok(())
    }

    fn start_node(
        c: &Cluster,
        node: &Node,
        cp_dir: &Path,
        roots: &Path,
        n1: &Node,
    ) -> Result<NodeMesh> {
        let dir = node.state_dir();
        let credential = dir.join("node-credential");
        let out = Command::new(workspace_bin("trellis-control-plane")?)
            .arg("credential")
            .arg("--state-dir")
            .arg(cp_dir.join("state"))
            .args(["node", node.name()])
            .output()?;
        ensure!(
            out.status.success(),
            "credential: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(&credential, &out.stdout)?;
        let ztunnel = Self::spawn_ztunnel(c, node, roots, &credential, n1, &[])?;
        let agent = Self::spawn_agent(c, node, roots, &credential, n1)?;
        Ok(NodeMesh {
            node: node.name().to_string(),
            ztunnel,
            agent,
        })
    }

    fn spawn_ztunnel(
        c: &Cluster,
        node: &Node,
        roots: &Path,
        credential: &Path,
        n1: &Node,
        extra: &[String],
    ) -> Result<Proc> {
        let mut cmd = Command::new(workspace_bin("trellis-ztunnel")?);
        cmd.args(extra);
        cmd.args(["--node-name", node.name()])
            .arg("--zds-socket")
            .arg(node.state_dir().join("ztunnel.sock"))
            .args([
                "--control-plane",
                &format!("https://{}:{CP_PORT}", n1.underlay_ip()),
                "--control-plane-name",
                &n1.underlay_ip().to_string(),
            ])
            .arg("--ca-roots")
            .arg(roots)
            .arg("--credential-file")
            .arg(credential)
            .args(["--metrics-addr", "127.0.0.1:15020", "--log-format", "json"])
            .env("RUST_LOG", "info");
        c.spawn(node, &format!("ztunnel-{}", node.name()), cmd)
    }

    fn spawn_agent(
        c: &Cluster,
        node: &Node,
        roots: &Path,
        credential: &Path,
        n1: &Node,
    ) -> Result<Proc> {
        let dir = node.state_dir();
        let mut cmd = Command::new(workspace_bin("trellis-node-agent")?);
        cmd.arg("run")
            .args(["--node-name", node.name()])
            .arg("--cni-bin-dir")
            .arg(node.cni_bin_dir())
            .arg("--cni-conf-dir")
            .arg(node.cni_conf_dir())
            .arg("--plugin-binary")
            .arg(workspace_bin("trellis-cni")?)
            .arg("--cni-socket")
            .arg(dir.join("cni.sock"))
            .arg("--zds-socket")
            .arg(dir.join("ztunnel.sock"))
            .arg("--state-file")
            .arg(dir.join("node-agent.json"))
            .args([
                "--xds-address",
                &format!("https://{}:{CP_PORT}", n1.underlay_ip()),
                "--xds-server-name",
                &n1.underlay_ip().to_string(),
            ])
            .arg("--ca-roots")
            .arg(roots)
            .arg("--credential-file")
            .arg(credential)
            // The cluster's pod namespaces (other clusters' share /run/netns).
            .args([
                "--netns-dir",
                "/run/netns",
                "--netns-prefix",
                &format!("{}-", c.id()),
            ])
            .env("RUST_LOG", "info");
        c.spawn(node, &format!("agent-{}", node.name()), cmd)
    }

    /// Restarts the ztunnel of `node`.
    pub fn restart_ztunnel(&mut self, c: &Cluster, node: &Node) -> Result<()> {
        self.restart_ztunnel_after(c, node, || Ok(()))
    }

    /// Restarts the ztunnel of `node`, running `meanwhile` while it is down.
    pub fn restart_ztunnel_after(
        &mut self,
        c: &Cluster,
        node: &Node,
        meanwhile: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let i = self.index(node.name())?;
        self.nodes[i].ztunnel.stop(Duration::from_secs(5))?;
        meanwhile()?;
        let roots = self.cp_dir.join("roots.pem");
        let credential = node.state_dir().join("node-credential");
        self.nodes[i].ztunnel = Self::spawn_ztunnel(
            c,
            node,
            &roots,
            &credential,
            &c.nodes()[0],
            &self.ztunnel_args,
        )?;
        Ok(())
    }

    /// Extra arguments for the ztunnels restarted from now on (e.g. a short certificate
    /// lifetime).
    pub fn set_ztunnel_args(&mut self, args: &[&str]) {
        self.ztunnel_args = args.iter().map(|a| a.to_string()).collect();
    }

    /// The trust bundle file the control plane writes and every proxy reads.
    pub fn roots_file(&self) -> PathBuf {
        self.cp_dir.join("roots.pem")
    }

    /// The control plane's CA directory (`cacerts` layout), where an operator rotates the
    /// root by replacing files.
    pub fn ca_dir(&self) -> PathBuf {
        self.cp_dir.join("state").join("ca")
    }

    /// Restarts the node agent of `node`.
    pub fn restart_agent(&mut self, c: &Cluster, node: &Node) -> Result<()> {
        self.restart_agent_after(c, node, || Ok(()))
    }

    /// Restarts the node agent of `node`, running `meanwhile` while it is down.
    pub fn restart_agent_after(
        &mut self,
        c: &Cluster,
        node: &Node,
        meanwhile: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let i = self.index(node.name())?;
        self.nodes[i].agent.stop(Duration::from_secs(5))?;
        meanwhile()?;
        let roots = self.cp_dir.join("roots.pem");
        let credential = node.state_dir().join("node-credential");
        self.nodes[i].agent = Self::spawn_agent(c, node, &roots, &credential, &c.nodes()[0])?;
        Ok(())
    }

    fn index(&self, node: &str) -> Result<usize> {
        self.nodes
            .iter()
            .position(|n| n.node == node)
            .ok_or_else(|| anyhow!("no node {node}"))
    }

    /// The ztunnel of `node`.
    pub fn ztunnel(&self, node: &str) -> Result<&Proc> {
        Ok(&self.nodes[self.index(node)?].ztunnel)
    }

    /// The node agent of `node`.
    pub fn agent(&self, node: &str) -> Result<&Proc> {
        Ok(&self.nodes[self.index(node)?].agent)
    }

    /// `node`'s ztunnel, to signal or wait for.
    pub fn ztunnel_mut(&mut self, node: &str) -> Result<&mut Proc> {
        let i = self.index(node)?;
        Ok(&mut self.nodes[i].ztunnel)
    }

    /// Deploys waypoint `ns/name` as the controller would on Kubernetes: its `Gateway`
    /// (class `istio-waypoint`), its Service (VIP `vip`, port `mesh` 15008, selecting the
    /// waypoint's pods) and one pod on `node` labelled as the Gateway's and outside the
    /// mesh's capture (`istio.io/dataplane-mode: none`), running `trellis-waypoint` as the
    /// Gateway's service account with a waypoint credential and `extra` flags. Returns once
    /// the waypoint is ready (configuration synced, certificate held).
    pub fn start_waypoint(
        &self,
        c: &Cluster,
        node: &Node,
        ns: &str,
        name: &str,
        vip: &str,
        extra: &[&str],
    ) -> Result<(Pod, Proc)> {
        self.apply(
            &format!("waypoint-{ns}-{name}.yaml"),
            &format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  gatewayClassName: istio-waypoint\n  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]\n---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}, labels: {{gateway.networking.k8s.io/gateway-name: {name}}}}}\nspec:\n  clusterIP: {vip}\n  selector: {{gateway.networking.k8s.io/gateway-name: {name}}}\n  ports: [{{name: mesh, port: 15008}}]\n"
            ),
        )?;
        let pod = c.add_pod(
            node,
            ns,
            &format!("{name}-0"),
            name,
            &[
                ("gateway.networking.k8s.io/gateway-name", name),
                ("istio.io/dataplane-mode", "none"),
            ],
        )?;
        self.register_pod(c, &pod)?;
        let proc = self.spawn_waypoint(c, &pod, ns, name, extra)?;
        Ok((pod, proc))
    }

    /// Starts `trellis-waypoint` for Gateway `ns/name` in `pod` (again, after a stop) with
    /// `extra` flags, and waits until it is ready.
    pub fn spawn_waypoint(
        &self,
        c: &Cluster,
        pod: &Pod,
        ns: &str,
        name: &str,
        extra: &[&str],
    ) -> Result<Proc> {
        let n1 = &c.nodes()[0];
        let credential = self.cp_dir.join(format!("waypoint-{ns}-{name}.credential"));
        let identity = format!("spiffe://cluster.local/ns/{ns}/sa/{name}");
        std::fs::write(&credential, self.waypoint_credential(&identity)?)?;
        let mut cmd = Command::new(workspace_bin("trellis-waypoint")?);
        cmd.args([
            "--control-plane",
            &format!("https://{}:{CP_PORT}", n1.underlay_ip()),
            "--control-plane-name",
            &n1.underlay_ip().to_string(),
            "--gateway",
            &format!("{ns}/{name}"),
            "--log-format",
            "json",
        ])
        .arg("--ca-roots")
        .arg(self.roots_file())
        .arg("--credential-file")
        .arg(&credential)
        .args(extra)
        .env("RUST_LOG", "info");
        let p = c.spawn(pod, &format!("waypoint-{name}"), cmd)?;
        let url = format!("http://{}:15021/healthz/ready", pod.ip);
        wait_until(
            &format!("waypoint {ns}/{name} to be ready"),
            Duration::from_secs(20),
            || {
                let mut curl = Command::new("curl");
                curl.args(["-sf", &url]);
                Ok(c.run(pod, "waypoint-ready", curl).is_ok())
            },
        )?;
        Ok(p)
    }

    /// The waypoint's config dump (from inside its pod: the admin port is on localhost).
    pub fn waypoint_config(&self, c: &Cluster, pod: &Pod) -> Result<Value> {
        let mut curl = Command::new("curl");
        curl.args(["-sf", "http://127.0.0.1:15000/config_dump"]);
        Ok(serde_json::from_str(&c.run(
            pod,
            "waypoint-config",
            curl,
        )?)?)
    }

    /// Writes a manifest file into the control plane's config directory (replacing it).
    pub fn apply(&self, file: &str, yaml: &str) -> Result<()> {
        write_manifest(&self.config_dir, file, yaml)
    }

    /// Writes a `Namespace`, labelled ambient or not.
    pub fn namespace(&self, name: &str, ambient: bool) -> Result<()> {
        let labels = if ambient {
            "{istio.io/dataplane-mode: ambient}"
        } else {
            "{}"
        };
        self.apply(
            &format!("ns-{name}.yaml"),
            &format!(
                "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {labels}}}\n"
            ),
        )
    }

    /// Writes the `Pod` manifest of a pod the cluster created (node, IP, labels), as the
    /// API server has it once the pod runs, and waits until every node's ztunnel knows its
    /// address (as a test expects of "the pod exists" before it sends traffic to it).
    pub fn register_pod(&self, c: &Cluster, pod: &Pod) -> Result<()> {
        self.apply(&pod_file(pod), &pod_manifest(pod, true))?;
        let ip = pod.ip.to_string();
        for node in c.nodes() {
            wait_until(
                &format!(
                    "ztunnel of {} to know {}/{} at {ip}",
                    node.name(),
                    pod.namespace,
                    pod.name
                ),
                Duration::from_secs(20),
                || {
                    let mut cmd = Command::new("curl");
                    cmd.args(["-sf", "http://127.0.0.1:15000/config_dump"]);
                    let Ok(out) = c.run(node, "config-dump", cmd) else {
                        return Ok(false);
                    };
                    let dump: Value = serde_json::from_str(&out)?;
                    Ok(dump["workloads"].as_array().is_some_and(|ws| {
                        ws.iter().any(|w| {
                            w["name"] == pod.name.as_str()
                                && w["namespace"] == pod.namespace.as_str()
                                && w["addresses"]
                                    .as_array()
                                    .is_some_and(|a| a.iter().any(|x| x == ip.as_str()))
                        })
                    }))
                },
            )?;
        }
        Ok(())
    }

    /// Whether the node agent has `pod` captured (ztunnel acked and rules installed).
    pub fn captured(&self, pod: &Pod, c: &Cluster) -> Result<bool> {
        let node = c.node(&pod.node)?;
        let path = node.state_dir().join("node-agent.json");
        let Ok(bytes) = std::fs::read(&path) else {
            return Ok(false);
        };
        let state: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not JSON", path.display()))?;
        Ok(state
            .as_object()
            .into_iter()
            .flat_map(|m| m.values())
            .any(|p| {
                p["name"] == pod.name.as_str()
                    && p["namespace"] == pod.namespace.as_str()
                    && p["captured"] == true
            }))
    }

    /// Waits until `pod` is captured (`true`) or released (`false`).
    pub fn wait_captured(&self, c: &Cluster, pod: &Pod, want: bool) -> Result<()> {
        wait_until(
            &format!("pod {}/{} captured = {want}", pod.namespace, pod.name),
            Duration::from_secs(20),
            || Ok(self.captured(pod, c)? == want),
        )
    }

    /// Access-log lines (JSON) of `node`'s ztunnel.
    pub fn access_log(&self, node: &str) -> Result<Vec<Value>> {
        let out = self.ztunnel(node)?.output();
        Ok(out
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["target"] == "access")
            .collect())
    }

    /// The Prometheus text of `node`'s ztunnel.
    pub fn metrics(&self, c: &Cluster, node: &Node) -> Result<String> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sf", "http://127.0.0.1:15020/metrics"]);
        c.run(node, "metrics", cmd)
    }
}

/// Waits for `check`, polling (exported for tests).
pub fn eventually(
    what: &str,
    timeout: Duration,
    check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    wait_until(what, timeout, check)
}

fn write_manifest(dir: &Path, file: &str, yaml: &str) -> Result<()> {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, yaml)?;
    std::fs::rename(&tmp, dir.join(file))?;
    Ok(())
}

fn pod_file(pod: &Pod) -> String {
    format!("pod-{}-{}.yaml", pod.namespace, pod.name)
}

/// The `Pod` as the API server has it: scheduled to its node, with its IP once `running`.
fn pod_manifest(pod: &Pod, running: bool) -> String {
    let labels: Vec<String> = pod
        .labels
        .iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    let status = if running {
        match pod.ip6 {
            Some(ip6) => format!(
                "status: {{podIP: {}, podIPs: [{{ip: {}}}, {{ip: \"{ip6}\"}}], phase: Running}}\n",
                pod.ip, pod.ip
            ),
            None => format!("status: {{podIP: {}, phase: Running}}\n", pod.ip),
        }
    } else {
        "status: {phase: Pending}\n".to_string()
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, uid: {}, labels: {{{}}}}}\nspec: {{nodeName: {}, serviceAccountName: {}, containers: [{{name: app, image: testapp}}]}}\n{status}",
        pod.name,
        pod.namespace,
        pod.uid,
        labels.join(", "),
        pod.node,
        pod.service_account,
    )
}
