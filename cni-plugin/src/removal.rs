//! Whether the node agent is stopping for good (the release is being uninstalled) or only
//! for a while (a rolling update, a deleted pod its DaemonSet replaces).
//!
//! On Kubernetes the agent may read exactly one object, its own DaemonSet, and watches it
//! while it runs: `helm uninstall` deletes the DaemonSet and, right after, the agent's Role,
//! RoleBinding and ServiceAccount, so by the time the agent gets SIGTERM it may no longer be
//! allowed to ask. What the watch saw before decides; only when it saw nothing is the API
//! asked once more. Gone or being deleted means uninstall: the agent then releases every
//! pod (capture rules and return path removed, ztunnel told) and takes the plugin out of the
//! node's CNI configuration, so the node is as it was. Any other stop keeps both: pods
//! starting while the agent restarts must not run outside the mesh. When nothing can be
//! known, the agent keeps them too (fail closed) and says so.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::Api;
use kube::runtime::{WatchStreamExt, watcher};

/// Whether `ds` (as read, `None` when not found) means the release is going away.
pub fn removed(ds: Option<&DaemonSet>) -> bool {
    ds.is_none_or(|d| d.metadata.deletion_timestamp.is_some())
}

/// Reads DaemonSet `namespace/name` and says whether it is gone or being deleted.
pub async fn daemonset_removed(
    client: kube::Client,
    namespace: &str,
    name: &str,
) -> Result<bool, String> {
    let api: Api<DaemonSet> = Api::namespaced(client, namespace);
    let ds = api
        .get_opt(name)
        .await
        .map_err(|e| format!("cannot read DaemonSet {namespace}/{name}: {e}"))?;
    Ok(removed(ds.as_ref()))
}

/// Watches the agent's DaemonSet; remembers whether it was seen deleted.
#[derive(Clone)]
pub struct RemovalWatch {
    client: kube::Client,
    namespace: String,
    name: String,
    seen_removed: Arc<AtomicBool>,
}

impl std::fmt::Debug for RemovalWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemovalWatch({}/{})", self.namespace, self.name)
    }
}

impl RemovalWatch {
    /// Starts watching DaemonSet `namespace/name` (a watch by name: the agent's Role allows
    /// exactly that object).
    pub fn start(client: kube::Client, namespace: &str, name: &str) -> RemovalWatch {
        let w = RemovalWatch {
            client,
            namespace: namespace.into(),
            name: name.into(),
            seen_removed: Arc::new(AtomicBool::new(false)),
        };
        let api: Api<DaemonSet> = Api::namespaced(w.client.clone(), namespace);
        let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
        let seen = w.seen_removed.clone();
        tokio::spawn(async move {
            let mut events = watcher(api, config).default_backoff().boxed();
            while let Some(event) = events.next().await {
                let gone = match event {
                    Ok(watcher::Event::Delete(_)) => true,
                    Ok(watcher::Event::Apply(d) | watcher::Event::InitApply(d)) => {
                        removed(Some(&d))
                    }
                    Ok(_) => false,
                    Err(e) => {
                        tracing::debug!(error = %e, "watching the agent's DaemonSet failed; retrying");
                        false
                    }
                };
                if gone {
                    tracing::info!("the agent's DaemonSet is being deleted");
                    seen.store(true, Ordering::Release);
                }
            }
        });
        w
    }

    /// Whether the release is being uninstalled: the watch saw the DaemonSet deleted, or
    /// (when it saw nothing) the API says it is gone now. Unknown means no.
    pub async fn uninstalling(&self) -> bool {
        if self.seen_removed.load(Ordering::Acquire) {
            return true;
        }
        match daemonset_removed(self.client.clone(), &self.namespace, &self.name).await {
            Ok(removed) => removed,
            Err(e) => {
                tracing::error!(error = %e, "cannot tell whether this is an uninstall; keeping the plugin installed");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! kube's `Client` over a `tower-test` mock service stands in for the API server.
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::json;

    const PATH: &str = "/apis/apps/v1/namespaces/trellis-system/daemonsets";

    fn ds(deleting: bool) -> serde_json::Value {
        let mut d = json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "trellis-node-agent", "namespace": "trellis-system",
                         "resourceVersion": "5"}});
        if deleting {
            d["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:00Z".into();
        }
        d
    }

    fn status(code: u16, reason: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
               "message": reason, "reason": reason, "code": code})
    }

    fn reply(code: u16, body: &serde_json::Value) -> Response<Body> {
        Response::builder()
            .status(code)
            .body(Body::from(serde_json::to_vec(body).unwrap()))
            .unwrap()
    }

    /// An API server that answers a GET of the DaemonSet with `get`.
    async fn ask(code: u16, body: serde_json::Value) -> Result<bool, String> {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.uri().path(), format!("{PATH}/trellis-node-agent"));
            send.send_response(reply(code, &body));
        });
        let r = daemonset_removed(client, "trellis-system", "trellis-node-agent").await;
        server.await.unwrap();
        r
    }

    #[tokio::test]
    async fn an_uninstall_removes_a_rolling_update_keeps_an_unknown_keeps() {
        assert_eq!(
            ask(200, ds(false)).await,
            Ok(false),
            "a rolling update keeps the plugin"
        );
        assert_eq!(
            ask(200, ds(true)).await,
            Ok(true),
            "being deleted: uninstall"
        );
        assert_eq!(
            ask(404, status(404, "NotFound")).await,
            Ok(true),
            "gone: uninstall"
        );
        assert!(
            ask(500, status(500, "InternalError")).await.is_err(),
            "unknown: the caller keeps the plugin"
        );
    }

    /// helm uninstall: the watch sees the DaemonSet deleted; at SIGTERM that decides, with
    /// no further request (the agent's Role may be gone by then: the mock would fail any).
    #[tokio::test]
    async fn a_deletion_seen_by_the_watch_decides_without_asking_again() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let (deleted_tx, deleted_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            let mut deleted_rx = Some(deleted_rx);
            let mut held = Vec::new();
            while let Some((req, send)) = handle.next_request().await {
                let q = req.uri().query().unwrap_or("").to_string();
                assert!(
                    q.contains("fieldSelector=metadata.name%3Dtrellis-node-agent"),
                    "watched by name: {q}"
                );
                if !q.contains("watch=true") {
                    let list = json!({"apiVersion": "apps/v1", "kind": "DaemonSetList",
                        "metadata": {"resourceVersion": "5"}, "items": [ds(false)]});
                    send.send_response(reply(200, &list));
                } else if let Some(rx) = deleted_rx.take() {
                    // The watch: the DaemonSet is deleted (once the test says so).
                    let _ = rx.await;
                    let mut body =
                        serde_json::to_vec(&json!({"type": "DELETED", "object": ds(true)}))
                            .unwrap();
                    body.push(b'\n');
                    send.send_response(Response::new(Body::from(body)));
                } else {
                    held.push(send);
                }
            }
        });
        let w = RemovalWatch::start(client.clone(), "trellis-system", "trellis-node-agent");
        deleted_tx.send(()).unwrap();
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while !w.seen_removed.load(Ordering::Acquire) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the deletion was not seen"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(w.uninstalling().await, "no API call needed");
        server.abort();
    }
}
