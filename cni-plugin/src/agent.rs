//! The node agent: knows the pods of its node that the CNI plugin reported, decides which
//! are enrolled (from the control plane's workloads), captures and releases them, and hands
//! the captured ones to ztunnel over ZDS.
//!
//! Capturing a pod is, in order: ztunnel opens the pod's listeners (ZDS `add`, acked), the
//! pod's redirect rules are installed, the node's probe rule learns the pod's IP; only then
//! is the pod marked captured. Releasing goes the other way round, rules first, so traffic
//! never hits a listener that is gone. The set of pods and their state is kept in a file,
//! so a restarted agent picks up where it left off; ztunnel's listeners and the pods' rules
//! survive an agent restart, and a restarted ztunnel gets the captured pods replayed.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use trellis_core::netns::Netns;
use trellis_core::xds::XdsClient;
use trellis_core::zds::{ZdsListener, ZdsSocket};
use trellis_proto::istio::workload::TunnelProtocol;
use trellis_proto::istio::workload::zds::{
    AddWorkload, DelWorkload, SnapshotSent, WorkloadInfo, WorkloadRequest, workload_request,
};

use crate::protocol::{MAX_MESSAGE, PodReply, PodRequest};
use crate::rules;

/// Settings.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// This node.
    pub node_name: String,
    /// Cluster id of workload uids (`<cluster>//Pod/<ns>/<name>`).
    pub cluster_id: String,
    /// Socket the plugin talks to.
    pub cni_socket: PathBuf,
    /// Socket ztunnel connects to.
    pub zds_socket: PathBuf,
    /// Where the pods' state is kept across restarts.
    pub state_file: PathBuf,
    /// Longest wait for one ztunnel Ack.
    pub zds_timeout: Duration,
    /// At ADD, how long to wait for the control plane to tell about the pod (its watch of
    /// the API may lag the kubelet by a moment) before answering "undecided".
    pub enrollment_wait: Duration,
    /// Where the pods' network namespaces are, for rebuilding the state when the state file
    /// is lost or corrupt.
    pub netns_scan: NetnsScan,
}

/// The pods' network namespaces on the node: the files of `dir` whose names start with
/// `prefix` (containerd and CRI-O name them `cni-<uuid>` in `/var/run/netns`).
#[derive(Debug, Clone)]
pub struct NetnsScan {
    /// The directory the runtime pins namespaces in.
    pub dir: PathBuf,
    /// The prefix of pod namespaces' names.
    pub prefix: String,
}

/// A pod network namespace found on the node.
#[derive(Debug, Clone)]
struct FoundNetns {
    path: PathBuf,
    ips: Vec<IpAddr>,
    captured: bool,
}

/// What the control plane says of a pod's enrollment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Enrollment {
    /// No complete xDS response yet: nothing can be decided.
    Unsynced,
    /// The control plane does not know the pod (yet).
    Unknown,
    /// In the mesh (`true`) or not.
    Known(bool),
}

/// One pod of this node, as the plugin reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodEntry {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Kubernetes uid (the ZDS key; the container id when the runtime gave none).
    pub uid: String,
    /// Sandbox container id.
    pub container_id: String,
    /// Its network namespace.
    pub netns: PathBuf,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
    /// Whether its traffic goes through ztunnel now.
    pub captured: bool,
}

/// Why a pod could not be captured or released.
type Failure = String;

/// The agent.
pub struct Agent {
    config: AgentConfig,
    pods: Mutex<BTreeMap<String, PodEntry>>,
    ztunnel: tokio::sync::Mutex<Option<ZdsSocket>>,
    /// One capture/release at a time: the node rule and the state file are shared.
    work: tokio::sync::Mutex<()>,
    xds: XdsClient,
    /// `true` while the state is to be rebuilt from the node (the state file was corrupt):
    /// ztunnel gets no replay before that (it keeps serving what it had).
    rebuilding: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.config.node_name)
            .finish_non_exhaustive()
    }
}

impl Agent {
    /// An agent deciding enrollment from `xds`, with the pods of `state_file` (if any).
    pub fn new(config: AgentConfig, xds: XdsClient) -> Result<Arc<Agent>, String> {
        let mut rebuild = false;
        let pods: BTreeMap<String, PodEntry> = match std::fs::read(&config.state_file) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(pods) => pods,
                // A corrupt state file must not keep the agent down (no new pod could be
                // captured then): it is kept aside for a post-mortem and the state is
                // rebuilt from the node (the pods' namespaces, their capture rules) once the
                // control plane has said which workloads run here.
                Err(e) => {
                    rebuild = true;
                    let aside = config.state_file.with_extension(format!(
                        "corrupt-{}",
                        std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs())
                            .unwrap_or_default()
                    ));
                    let kept = std::fs::rename(&config.state_file, &aside);
                    tracing::error!(
                        file = %config.state_file.display(),
                        error = %e,
                        kept_as = %aside.display(),
                        kept = kept.is_ok(),
                        "the node agent's state file is corrupt; rebuilding the state from the pods on the node"
                    );
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(format!("{}: {e}", config.state_file.display())),
        };
        tracing::info!(
            pods = pods.len(),
            captured = pods.values().filter(|p| p.captured).count(),
            "node agent state loaded"
        );
        // Pods captured by an earlier agent get the current return path (idempotent).
        for p in pods.values().filter(|p| p.captured && p.netns.exists()) {
            if let Err(e) = rules::install_return_path(&p.netns) {
                tracing::warn!(uid = %p.uid, error = %e, "cannot refresh the pod's return path");
            }
        }
        Ok(Arc::new(Agent {
            config,
            pods: Mutex::new(pods),
            ztunnel: tokio::sync::Mutex::new(None),
            work: tokio::sync::Mutex::new(()),
            xds,
            rebuilding: tokio::sync::watch::Sender::new(rebuild),
        }))
    }

    /// The pods known now.
    pub fn pods(&self) -> Vec<PodEntry> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PodEntry>> {
        self.pods.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn save(&self) {
        let body = serde_json::to_vec_pretty(&*self.lock()).unwrap_or_default();
        let path = &self.config.state_file;
        let tmp = path.with_extension("tmp");
        if let Some(dir) = path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, path)) {
            tracing::error!(file = %path.display(), error = %e, "cannot save the node agent's state");
        }
    }

    /// What the control plane says of `namespace/name`: nothing is decided on an empty
    /// store, nor for a pod it has not published (it publishes every scheduled pod, with or
    /// without an address, so a pod is known before its sandbox exists).
    fn enrollment(&self, namespace: &str, name: &str) -> Enrollment {
        if !self.xds.is_synced() {
            return Enrollment::Unsynced;
        }
        let uid = format!("{}//Pod/{namespace}/{name}", self.config.cluster_id);
        match self.xds.store().workload(&uid) {
            Some(w) => Enrollment::Known(w.tunnel_protocol == TunnelProtocol::Hbone as i32),
            None => Enrollment::Unknown,
        }
    }

    /// [`Self::enrollment`], waiting up to `enrollment_wait` for it to become known.
    async fn decide(&self, namespace: &str, name: &str) -> Enrollment {
        let deadline = tokio::time::Instant::now() + self.config.enrollment_wait;
        let mut changes = self.xds.changes();
        loop {
            changes.borrow_and_update();
            let now = self.enrollment(namespace, name);
            if matches!(now, Enrollment::Known(_)) {
                return now;
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => {}
                _ => return now,
            }
        }
    }

    /// Applies the node's probe rule for the captured pods.
    fn apply_node_rule(&self) -> Result<(), Failure> {
        let ips: Vec<IpAddr> = self
            .lock()
            .values()
            .filter(|p| p.captured)
            .flat_map(|p| p.ips.iter().copied())
            .collect();
        rules::apply(None, &rules::node_ruleset(&ips))
    }

    async fn send(&self, req: WorkloadRequest, netns: Option<&Netns>) -> Result<(), Failure> {
        let mut guard = self.ztunnel.lock().await;
        let Some(sock) = guard.as_ref() else {
            return Err("ztunnel is not connected to the node agent".into());
        };
        enum Outcome {
            Refused(String),
            Broken(String),
        }
        let exchange = async {
            sock.send_request(&req, netns.map(|n| n.fd().as_fd()))
                .await
                .map_err(|e| Outcome::Broken(e.to_string()))?;
            match sock.recv_ack().await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(reason)) => Err(Outcome::Refused(reason)),
                Err(e) => Err(Outcome::Broken(e.to_string())),
            }
        };
        match tokio::time::timeout(self.config.zds_timeout, exchange).await {
            Ok(Ok(())) => Ok(()),
            // A refused request leaves the connection usable; a broken one does not.
            Ok(Err(Outcome::Refused(reason))) => Err(format!("ztunnel refused: {reason}")),
            Ok(Err(Outcome::Broken(e))) => {
                *guard = None;
                Err(format!("ztunnel connection lost: {e}"))
            }
            Err(_) => {
                *guard = None;
                Err("ztunnel did not answer in time".into())
            }
        }
    }

    /// The ZDS `add` for `p`, with the service account the control plane knows for it
    /// (ztunnel needs it to obtain the pod's certificate).
    fn add_request(&self, p: &PodEntry) -> WorkloadRequest {
        let uid = format!("{}//Pod/{}/{}", self.config.cluster_id, p.namespace, p.name);
        let service_account = self
            .xds
            .store()
            .workload(&uid)
            .map(|w| w.service_account.clone())
            .unwrap_or_default();
        WorkloadRequest {
            payload: Some(workload_request::Payload::Add(AddWorkload {
                uid: p.uid.clone(),
                workload_info: Some(WorkloadInfo {
                    name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    service_account,
                }),
            })),
        }
    }

    async fn capture(&self, key: &str) -> Result<(), Failure> {
        let Some(p) = self.lock().get(key).cloned() else {
            return Ok(());
        };
        if p.captured {
            return Ok(());
        }
        let netns = Netns::open(&p.netns)
            .map_err(|e| format!("cannot open the pod's netns {}: {e}", p.netns.display()))?;
        // The return path first: ztunnel may open connections to the app as soon as it
        // serves the pod.
        rules::install_return_path(&p.netns)
            .map_err(|e| format!("installing the return path: {e}"))?;
        self.send(self.add_request(&p), Some(&netns)).await?;
        if let Err(e) = rules::apply(Some(&p.netns), &rules::pod_ruleset()) {
            let _ = self.send(del_request(&p.uid), None).await;
            return Err(format!("installing the capture rules: {e}"));
        }
        if let Some(e) = self.lock().get_mut(key) {
            e.captured = true;
        }
        if let Err(e) = self.apply_node_rule() {
            tracing::warn!(error = %e, "cannot update the node's probe rule");
        }
        self.save();
        tracing::info!(pod = %format!("{}/{}", p.namespace, p.name), uid = %p.uid, "pod captured");
        Ok(())
    }

    async fn release(&self, key: &str, gone: bool) -> Result<(), Failure> {
        let Some(p) = self.lock().get(key).cloned() else {
            return Ok(());
        };
        if p.captured {
            if !gone && p.netns.exists() {
                rules::apply(Some(&p.netns), &rules::pod_ruleset_removal())
                    .map_err(|e| format!("removing the capture rules: {e}"))?;
                rules::remove_return_path(&p.netns)
                    .map_err(|e| format!("removing the return path: {e}"))?;
            }
            if let Err(e) = self.send(del_request(&p.uid), None).await {
                // ztunnel reconciles to the next snapshot without this pod.
                tracing::warn!(error = %e, uid = %p.uid, "cannot tell ztunnel to stop serving the pod");
            }
        }
        if gone {
            self.lock().remove(key);
        } else if let Some(e) = self.lock().get_mut(key) {
            e.captured = false;
        }
        if let Err(e) = self.apply_node_rule() {
            tracing::warn!(error = %e, "cannot update the node's probe rule");
        }
        self.save();
        if p.captured {
            tracing::info!(pod = %format!("{}/{}", p.namespace, p.name), "pod released");
        }
        Ok(())
    }

    /// Releases every captured pod (the release is being uninstalled): capture rules and
    /// return paths removed, ztunnel told. Returns what could not be undone.
    pub async fn release_all(&self) -> Vec<Failure> {
        let _work = self.work.lock().await;
        let mut failures = Vec::new();
        for p in self.pods() {
            if let Err(e) = self.release(&p.container_id, false).await {
                failures.push(format!("{}/{}: {e}", p.namespace, p.name));
            }
        }
        failures
    }

    /// Rebuilds the pods of the node from what is on it: each pod network namespace
    /// (`netns_scan`) with an address of a workload the control plane places on this node
    /// becomes an entry again, captured when its capture rules are installed. Needs the
    /// control plane's workloads: nothing is done before they are synced. Returns whether
    /// the rebuild happened.
    async fn rebuild(&self) -> bool {
        if !self.xds.is_synced() {
            return false;
        }
        let _work = self.work.lock().await;
        let scan = self.config.netns_scan.clone();
        let found = match tokio::task::spawn_blocking(move || scan_netns(&scan)).await {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "cannot scan the node's pod namespaces; retrying");
                return false;
            }
            Err(e) => {
                tracing::error!(error = %e, "the scan of pod namespaces failed; retrying");
                return false;
            }
        };
        let mut rebuilt = 0;
        {
            let known: std::collections::BTreeSet<PathBuf> =
                self.lock().values().map(|p| p.netns.clone()).collect();
            let store = self.xds.store();
            let mut pods = self.lock();
            for f in found {
                if known.contains(&f.path) {
                    continue;
                }
                let workload = f.ips.iter().find_map(|ip| {
                    store
                        .workload_by_ip(*ip)
                        .filter(|w| w.node == self.config.node_name)
                });
                let Some(w) = workload else {
                    if f.captured {
                        tracing::warn!(netns = %f.path.display(), ips = ?f.ips, "capture rules in a namespace no workload of this node has: left as they are");
                    }
                    continue;
                };
                tracing::info!(
                    pod = %format!("{}/{}", w.namespace, w.name),
                    netns = %f.path.display(),
                    captured = f.captured,
                    "pod found on the node"
                );
                let key = format!("rebuilt:{}", f.path.display());
                pods.insert(
                    key.clone(),
                    PodEntry {
                        namespace: w.namespace.clone(),
                        name: w.name.clone(),
                        // The Kubernetes uid is not on the node; ztunnel knows the pod by
                        // its namespace and takes the new key (zds `add`).
                        uid: w.uid.clone(),
                        container_id: key,
                        netns: f.path,
                        ips: f.ips,
                        captured: f.captured,
                    },
                );
                rebuilt += 1;
            }
        }
        self.save();
        if let Err(e) = self.apply_node_rule() {
            tracing::warn!(error = %e, "cannot update the node's probe rule");
        }
        tracing::info!(pods = rebuilt, "node agent state rebuilt from the node");
        true
    }

    /// The key of the pod a plugin request is about: its container id, else (a pod whose
    /// entry was rebuilt from the node) the entry of its network namespace.
    fn key_of(&self, container_id: &str, netns: &str) -> String {
        let pods = self.lock();
        if pods.contains_key(container_id) || netns.is_empty() {
            return container_id.to_string();
        }
        pods.iter()
            .find(|(k, p)| k.starts_with("rebuilt:") && p.netns == Path::new(netns))
            .map_or_else(|| container_id.to_string(), |(k, _)| k.clone())
    }

    /// Brings every pod in line with what the control plane says; forgets pods whose
    /// namespace is gone.
    pub async fn reconcile(&self) {
        let _work = self.work.lock().await;
        let pods = self.pods();
        for p in pods {
            let key = p.container_id.clone();
            if !p.netns.exists() {
                let _ = self.release(&key, true).await;
                continue;
            }
            let want = match self.enrollment(&p.namespace, &p.name) {
                Enrollment::Unsynced => return,
                // Not published (yet, or any more while its sandbox goes): left as it is.
                Enrollment::Unknown => continue,
                Enrollment::Known(want) => want,
            };
            let result = match (want, p.captured) {
                (true, false) => self.capture(&key).await,
                (false, true) => self.release(&key, false).await,
                _ => Ok(()),
            };
            if let Err(e) = result {
                tracing::warn!(pod = %format!("{}/{}", p.namespace, p.name), error = %e, "reconcile failed; will retry");
            }
        }
    }

    /// Handles one plugin request.
    pub async fn handle(&self, req: PodRequest) -> PodReply {
        let ok = |captured| PodReply {
            ok: true,
            captured,
            error: String::new(),
            undecided: false,
        };
        let fail = |error: String| PodReply {
            ok: false,
            captured: false,
            error,
            undecided: false,
        };
        match req.command.as_str() {
            "STATUS" => ok(false),
            "ADD" => {
                // Decided before the pod starts, from what the control plane published
                // about it (its labels and its namespace's): the pod is captured from its
                // first packet, or its ADD fails.
                let decision = self.decide(&req.namespace, &req.name).await;
                let _work = self.work.lock().await;
                let entry = PodEntry {
                    uid: if req.uid.is_empty() {
                        req.container_id.clone()
                    } else {
                        req.uid.clone()
                    },
                    namespace: req.namespace.clone(),
                    name: req.name.clone(),
                    container_id: req.container_id.clone(),
                    netns: PathBuf::from(&req.netns),
                    ips: req.ips.iter().filter_map(|i| i.parse().ok()).collect(),
                    captured: false,
                };
                {
                    let mut pods = self.lock();
                    // A re-ADD of a pod whose entry was rebuilt from the node: one entry.
                    pods.retain(|k, p| !(k.starts_with("rebuilt:") && p.netns == entry.netns));
                    pods.insert(req.container_id.clone(), entry);
                }
                self.save();
                match decision {
                    Enrollment::Known(true) => match self.capture(&req.container_id).await {
                        Ok(()) => ok(true),
                        Err(e) => {
                            // Enrolled but not capturable: the pod must not start bypassing
                            // the mesh.
                            self.lock().remove(&req.container_id);
                            self.save();
                            fail(e)
                        }
                    },
                    Enrollment::Known(false) => ok(false),
                    // Kept: if the plugin lets the pod start anyway (failOpen), the
                    // reconciler captures it once the control plane tells.
                    Enrollment::Unsynced | Enrollment::Unknown => PodReply {
                        undecided: true,
                        ..fail(format!(
                            "cannot decide whether pod {}/{} is in the mesh: {} (waited {:?}); the runtime retries the ADD",
                            req.namespace,
                            req.name,
                            if decision == Enrollment::Unsynced {
                                "the node agent has no configuration from the control plane yet"
                            } else {
                                "the control plane has not published this pod yet"
                            },
                            self.config.enrollment_wait
                        ))
                    },
                }
            }
            "DEL" => {
                let _work = self.work.lock().await;
                let key = self.key_of(&req.container_id, &req.netns);
                match self.release(&key, true).await {
                    Ok(()) => ok(false),
                    Err(e) => fail(e),
                }
            }
            "CHECK" => {
                let key = self.key_of(&req.container_id, &req.netns);
                let captured = self.lock().get(&key).is_some_and(|p| p.captured);
                match self.enrollment(&req.namespace, &req.name) {
                    Enrollment::Known(true) if !captured => {
                        fail("enrolled but not captured".into())
                    }
                    _ => ok(captured),
                }
            }
            other => fail(format!("unknown command {other:?}")),
        }
    }

    /// Serves the plugin's socket.
    pub async fn serve_cni(self: Arc<Self>, listener: UnixListener) {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let agent = self.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let read = tokio::time::timeout(
                    Duration::from_secs(5),
                    (&mut conn)
                        .take(MAX_MESSAGE as u64 + 1)
                        .read_to_end(&mut buf),
                )
                .await;
                let reply = match (read, serde_json::from_slice::<PodRequest>(&buf)) {
                    (Ok(Ok(_)), Ok(req)) if buf.len() <= MAX_MESSAGE => agent.handle(req).await,
                    (_, Err(e)) => PodReply {
                        ok: false,
                        captured: false,
                        error: format!("invalid request: {e}"),
                        undecided: false,
                    },
                    _ => PodReply {
                        ok: false,
                        captured: false,
                        error: "request too large or too slow".into(),
                        undecided: false,
                    },
                };
                let body = serde_json::to_vec(&reply).unwrap_or_default();
                let _ = conn.write_all(&body).await;
            });
        }
    }

    /// Serves ztunnel's connections: each new one gets the captured pods replayed.
    pub async fn serve_zds(self: Arc<Self>, listener: ZdsListener) {
        loop {
            let sock = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "ZDS accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match tokio::time::timeout(self.config.zds_timeout, sock.recv_hello()).await {
                Ok(Ok(h)) => tracing::info!(version = h.version, "ztunnel connected"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "ztunnel's hello is invalid; closing");
                    continue;
                }
                Err(_) => {
                    tracing::warn!("ztunnel said nothing; closing");
                    continue;
                }
            }
            // No replay of a state being rebuilt: ztunnel keeps serving what it had (an
            // empty snapshot would close every pod) until the pods are known again.
            let mut rebuilding = self.rebuilding.subscribe();
            if *rebuilding.borrow() {
                tracing::info!("ztunnel waits for the node agent's state to be rebuilt");
            }
            let _ = rebuilding.wait_for(|r| !*r).await;
            let _work = self.work.lock().await;
            *self.ztunnel.lock().await = Some(sock);
            let captured: Vec<PodEntry> = self.pods().into_iter().filter(|p| p.captured).collect();
            let mut replayed = 0;
            let mut unserved = Vec::new();
            for p in &captured {
                match self.replay(p).await {
                    Ok(()) => replayed += 1,
                    Err(e) => {
                        tracing::error!(pod = %format!("{}/{}", p.namespace, p.name), uid = %p.uid, error = %e, "ztunnel does not serve this captured pod: its traffic is refused (capture stays) until a retry succeeds");
                        unserved.push(p.container_id.clone());
                    }
                }
            }
            if self.ztunnel.lock().await.is_none() {
                // The connection broke during the replay: ztunnel reconnects and gets it
                // again; no SnapshotSent for a replay that did not happen.
                continue;
            }
            // Not marked served: the reconciler captures them again (rules, return path,
            // add) every few seconds until ztunnel takes them.
            if !unserved.is_empty() {
                for key in &unserved {
                    if let Some(e) = self.lock().get_mut(key) {
                        e.captured = false;
                    }
                }
                self.save();
            }
            let sent = WorkloadRequest {
                payload: Some(workload_request::Payload::SnapshotSent(SnapshotSent {})),
            };
            match self.send(sent, None).await {
                Ok(()) => tracing::info!(pods = replayed, "snapshot replayed to ztunnel"),
                Err(e) => tracing::warn!(error = %e, "snapshot to ztunnel failed"),
            }
        }
    }

    /// Sends `p` to a (re)connected ztunnel, trying a few times: a refusal may be passing
    /// (a port of the pod's namespace still held by a dying process).
    async fn replay(&self, p: &PodEntry) -> Result<(), Failure> {
        let mut delay = Duration::from_millis(100);
        let mut last = String::new();
        for _ in 0..3 {
            let netns =
                Netns::open(&p.netns).map_err(|e| format!("netns {}: {e}", p.netns.display()))?;
            match self.send(self.add_request(p), Some(&netns)).await {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            if self.ztunnel.lock().await.is_none() {
                break;
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        Err(last)
    }

    /// Re-applies the node rule (after a restart) and reconciles on every control-plane
    /// change, and every few seconds for what failed before.
    pub async fn run_reconciler(self: Arc<Self>) {
        if let Err(e) = self.apply_node_rule() {
            tracing::warn!(error = %e, "cannot apply the node's probe rule");
        }
        let mut changes = self.xds.changes();
        loop {
            if *self.rebuilding.borrow() && self.rebuild().await {
                self.rebuilding.send_replace(false);
            }
            self.reconcile().await;
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                () = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }
}

/// The pod network namespaces of the node, each with its addresses and whether its capture
/// rules are installed. The agent's own namespace is skipped (host-network pods share it).
fn scan_netns(scan: &NetnsScan) -> Result<Vec<FoundNetns>, String> {
    let own = Netns::current()
        .and_then(|n| n.id())
        .map_err(|e| format!("own network namespace: {e}"))?;
    let entries =
        std::fs::read_dir(&scan.dir).map_err(|e| format!("{}: {e}", scan.dir.display()))?;
    let mut found = Vec::new();
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(&scan.prefix)
        {
            continue;
        }
        let path = entry.path();
        let ns = match Netns::open(&path) {
            Ok(ns) => ns,
            Err(e) => {
                tracing::debug!(netns = %path.display(), error = %e, "not a network namespace");
                continue;
            }
        };
        if ns.id().ok() == Some(own) {
            continue;
        }
        let ips = match ns.run(pod_addresses) {
            Ok(Ok(ips)) => ips,
            Ok(Err(e)) | Err(e) => {
                tracing::warn!(netns = %path.display(), error = %e, "cannot read the namespace's addresses");
                continue;
            }
        };
        let captured =
            rules::capture_installed(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        found.push(FoundNetns {
            path,
            ips,
            captured,
        });
    }
    Ok(found)
}

/// The addresses of the calling thread's network namespace that a pod is known by:
/// neither loopback nor link-local.
fn pod_addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut ips = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(std::io::Error::from)? {
        let Some(addr) = ifa.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let link_local = match ip {
            IpAddr::V4(v4) => v4.is_link_local(),
            IpAddr::V6(v6) => v6.is_unicast_link_local(),
        };
        if !ip.is_loopback() && !link_local && !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(ips)
}

fn del_request(uid: &str) -> WorkloadRequest {
    WorkloadRequest {
        payload: Some(workload_request::Payload::Del(DelWorkload {
            uid: uid.to_string(),
        })),
    }
}

/// Binds the plugin's socket (replacing a stale one), reachable by its owner (root) only
/// from the moment it exists.
pub fn bind_cni_socket(path: &Path) -> std::io::Result<UnixListener> {
    trellis_core::sockfile::bind_owner_only(path, |p| UnixListener::bind(p))
}
