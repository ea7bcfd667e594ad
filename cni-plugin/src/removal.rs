//! Whether the node agent is stopping for good (the release is being uninstalled) or only
//! for a while (a rolling update, a deleted pod its DaemonSet replaces).
//!
//! On Kubernetes the agent may read exactly one object, its own DaemonSet. Stopping while
//! the DaemonSet is gone or being deleted means uninstall: the agent then releases every
//! pod (capture rules and return path removed, ztunnel told) and takes the plugin out of
//! the node's CNI configuration, so the node is as it was. Any other stop keeps both: pods
//! starting while the agent restarts must not run outside the mesh. When the API cannot be
//! asked, the agent keeps them too (fail closed) and says so.

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::Api;

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

#[cfg(test)]
mod tests {
    //! kube's `Client` over a `tower-test` mock service stands in for the API server.
    use super::*;
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::json;

    async fn ask(code: u16, body: serde_json::Value) -> Result<bool, String> {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(
                req.uri().path(),
                "/apis/apps/v1/namespaces/trellis-system/daemonsets/trellis-node-agent"
            );
            send.send_response(
                Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&body).unwrap()))
                    .unwrap(),
            );
        });
        let r = daemonset_removed(client, "trellis-system", "trellis-node-agent").await;
        server.await.unwrap();
        r
    }

    fn ds(deleting: bool) -> serde_json::Value {
        let mut d = json!({"apiVersion": "apps/v1", "kind": "DaemonSet",
            "metadata": {"name": "trellis-node-agent", "namespace": "trellis-system"}});
        if deleting {
            d["metadata"]["deletionTimestamp"] = "2026-12-01T00:00:00Z".into();
        }
        d
    }

    fn status(code: u16, reason: &str) -> serde_json::Value {
        json!({"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Failure",
               "message": reason, "reason": reason, "code": code})
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
}
