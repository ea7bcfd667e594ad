//! The pods this ztunnel serves, and the ZDS client that keeps them in step with the node
//! agent.
//!
//! ztunnel connects to the agent's socket (and reconnects, with backoff, for as long as it
//! runs), says hello, and answers every request with one Ack: `add` opens the pod's
//! listeners inside the namespace that came with it, `del` closes them, `keep` confirms a
//! pod it already serves, and `snapshot_sent` (after the agent's replay on connect) closes
//! every pod the snapshot did not mention. A request that cannot be carried out (no
//! namespace descriptor, garbage, a bind that fails) gets an Ack with the error and is
//! logged; the connection stays up. Pods keep being served while the agent is away.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use trellis_core::netns::Netns;
use trellis_core::zds::{ZdsError, ZdsSocket};
use trellis_proto::istio::workload::zds::workload_request::Payload;

use crate::config::Config;
use crate::proxy::PodProxy;

/// Who a served pod is (from ZDS).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// Kubernetes uid (the ZDS key).
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
}

struct Served {
    info: Arc<PodInfo>,
    netns_id: (u64, u64),
    proxy: PodProxy,
}

/// The pods served now.
#[derive(Clone)]
pub struct Pods {
    config: Arc<Config>,
    mesh: Arc<crate::mesh::Mesh>,
    served: Arc<Mutex<BTreeMap<String, Served>>>,
    snapshot_done: Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Pods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pods").field("uids", &self.uids()).finish()
    }
}

impl Pods {
    /// No pods yet.
    pub fn new(config: Arc<Config>, mesh: Arc<crate::mesh::Mesh>) -> Pods {
        Pods {
            config,
            mesh,
            served: Arc::default(),
            snapshot_done: Arc::default(),
        }
    }

    /// The pods served.
    pub fn list(&self) -> Vec<PodInfo> {
        let s = self.served.lock().unwrap_or_else(|e| e.into_inner());
        s.values().map(|p| (*p.info).clone()).collect()
    }

    fn uids(&self) -> Vec<String> {
        let s = self.served.lock().unwrap_or_else(|e| e.into_inner());
        s.keys().cloned().collect()
    }

    /// Whether a first snapshot from the agent has been applied.
    pub fn snapshot_applied(&self) -> bool {
        self.snapshot_done
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Serves `info` in `netns`. The same pod in the same namespace again is a no-op (a
    /// replayed snapshot); the same uid in another namespace (the pod was re-created) is
    /// served afresh.
    pub fn add(&self, info: PodInfo, netns: Netns) -> Result<(), String> {
        let netns_id = netns
            .id()
            .map_err(|e| format!("cannot inspect the network namespace: {e}"))?;
        let old = {
            let mut s = self.served.lock().unwrap_or_else(|e| e.into_inner());
            match s.get(&info.uid) {
                Some(p) if p.netns_id == netns_id => return Ok(()),
                Some(_) => s.remove(&info.uid),
                None => {
                    // The same pod (namespace and name) in the same network namespace under
                    // another key: a node agent that rebuilt its state from the node knows
                    // it by another uid. It keeps its listeners and takes the new key.
                    let renamed = s
                        .iter()
                        .find(|(_, p)| {
                            p.netns_id == netns_id
                                && p.info.namespace == info.namespace
                                && p.info.name == info.name
                        })
                        .map(|(k, _)| k.clone());
                    if let Some(old_uid) = renamed
                        && let Some(mut served) = s.remove(&old_uid)
                    {
                        tracing::info!(pod = %format!("{}/{}", info.namespace, info.name), old_uid, uid = %info.uid, "serving pod under a new uid");
                        served.info = Arc::new(info);
                        let uid = served.info.uid.clone();
                        s.insert(uid, served);
                        return Ok(());
                    }
                    None
                }
            }
        };
        if let Some(old) = old {
            old.proxy.stop(self.config.drain_timeout);
        }
        let info = Arc::new(info);
        let proxy = PodProxy::start(
            Arc::new(netns),
            info.clone(),
            self.config.clone(),
            self.mesh.clone(),
        )
        .map_err(|e| format!("cannot open the pod's listeners: {e}"))?;
        tracing::info!(pod = %format!("{}/{}", info.namespace, info.name), uid = %info.uid, "serving pod");
        let mut s = self.served.lock().unwrap_or_else(|e| e.into_inner());
        s.insert(
            info.uid.clone(),
            Served {
                info,
                netns_id,
                proxy,
            },
        );
        Ok(())
    }

    /// Whether `uid` is served.
    pub fn has(&self, uid: &str) -> bool {
        let s = self.served.lock().unwrap_or_else(|e| e.into_inner());
        s.contains_key(uid)
    }

    /// Stops serving `uid`: its listeners close at once, its open connections may finish
    /// within the drain timeout.
    pub fn del(&self, uid: &str) {
        let removed = {
            let mut s = self.served.lock().unwrap_or_else(|e| e.into_inner());
            s.remove(uid)
        };
        if let Some(p) = removed {
            tracing::info!(pod = %format!("{}/{}", p.info.namespace, p.info.name), uid, "no longer serving pod");
            p.proxy.stop(self.config.drain_timeout);
            self.forget_identity_unless_served(&p.info);
        }
    }

    /// Stops holding (renewing, exporting) the certificate of `left`'s identity when no
    /// pod served now has that identity. Draining connections keep the certificate they
    /// hold; a pod of that identity added later fetches a new one.
    fn forget_identity_unless_served(&self, left: &PodInfo) {
        let still_served = {
            let s = self.served.lock().unwrap_or_else(|e| e.into_inner());
            s.values().any(|p| {
                p.info.namespace == left.namespace && p.info.service_account == left.service_account
            })
        };
        if still_served {
            return;
        }
        if let Ok(id) = trellis_core::SpiffeId::new(
            &self.mesh.trust_domain,
            &left.namespace,
            &left.service_account,
        ) {
            tracing::info!(identity = %id, "the last pod with this identity left: its certificate is no longer renewed");
            self.mesh.certs.forget(&id);
        }
    }

    /// Keeps exactly the pods in `keep`.
    pub fn retain(&self, keep: &BTreeSet<String>) {
        for uid in self.uids() {
            if !keep.contains(&uid) {
                self.del(&uid);
            }
        }
        self.snapshot_done
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Stops every pod and waits (bounded) for their connections.
    pub async fn shutdown(&self, drain: Duration) {
        let all: Vec<Served> = {
            let mut s = self.served.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::take(&mut *s).into_values().collect()
        };
        let waits: Vec<_> = all.into_iter().map(|p| p.proxy.stop(drain)).collect();
        for w in waits {
            let _ = w.await;
        }
    }
}

/// Connects to the agent and serves its requests, reconnecting for ever.
pub async fn run_zds_client(config: Arc<Config>, pods: Pods) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match ZdsSocket::connect(&config.zds_socket) {
            Ok(sock) => {
                backoff = Duration::from_millis(100);
                tracing::info!(socket = %config.zds_socket.display(), "connected to the node agent");
                match session(&sock, &pods).await {
                    Err(ZdsError::Closed) => {
                        tracing::warn!(
                            "the node agent closed the ZDS connection; pods stay served, reconnecting"
                        )
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "ZDS connection failed; pods stay served, reconnecting")
                    }
                    Ok(()) => {}
                }
            }
            Err(e) => {
                tracing::debug!(socket = %config.zds_socket.display(), error = %e, "node agent not reachable yet")
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

async fn session(sock: &ZdsSocket, pods: &Pods) -> Result<(), ZdsError> {
    sock.send_hello().await?;
    let mut in_snapshot = BTreeSet::new();
    let mut snapshot_open = true;
    loop {
        let (req, fd) = match sock.recv_request().await {
            Ok(r) => r,
            Err(ZdsError::Invalid(reason)) => {
                tracing::warn!(%reason, "rejecting a malformed ZDS message");
                sock.send_ack(&format!("rejected: {reason}")).await?;
                continue;
            }
            Err(e) => return Err(e),
        };
        let result = match req.payload {
            Some(Payload::Add(add)) => {
                let info = add.workload_info.unwrap_or_default();
                let pod = PodInfo {
                    uid: add.uid.clone(),
                    name: info.name,
                    namespace: info.namespace,
                    service_account: info.service_account,
                };
                let r = match fd {
                    None => Err(
                        "add without the pod's network namespace (no file descriptor attached)"
                            .to_string(),
                    ),
                    Some(_) if add.uid.is_empty() => Err("add without a uid".to_string()),
                    Some(fd) => pods.add(pod, Netns::from_fd(fd)),
                };
                if r.is_ok() && snapshot_open {
                    in_snapshot.insert(add.uid);
                }
                r
            }
            Some(Payload::Keep(keep)) => {
                if pods.has(&keep.uid) {
                    in_snapshot.insert(keep.uid);
                    Ok(())
                } else {
                    Err(format!("keep: pod {} is not served here", keep.uid))
                }
            }
            Some(Payload::Del(del)) => {
                pods.del(&del.uid);
                Ok(())
            }
            Some(Payload::SnapshotSent(_)) => {
                if snapshot_open {
                    pods.retain(&in_snapshot);
                    snapshot_open = false;
                    tracing::info!(pods = in_snapshot.len(), "node agent snapshot applied");
                }
                Ok(())
            }
            None => Err("empty request".to_string()),
        };
        if let Err(e) = &result {
            tracing::warn!(error = %e, "ZDS request failed");
        }
        sock.send_ack(result.err().as_deref().unwrap_or("")).await?;
    }
}
