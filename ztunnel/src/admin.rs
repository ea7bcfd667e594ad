//! The admin endpoint (localhost:15000) and readiness (15021).
//!
//! Admin: `GET /config_dump` — workloads, services and policies ztunnel holds, the pods it
//! serves and their certificates with expiry; `POST /logging?level=<filter>` — changes the
//! log filter at run time (for instance `debug`, or `info,trellis_ztunnel=debug`); `GET
//! /logging` — the filter in force. Readiness: `GET /healthz/ready` is 200 only when xDS is
//! synced, the node agent's snapshot is applied, and a valid certificate is held for every
//! pod served (what a kubelet needs to know before sending traffic through this node).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http_body_util::Full;
use hyper::body::Bytes;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use trellis_core::SpiffeId;

use crate::inpod::Pods;
use crate::mesh::Mesh;

/// Changes the log filter; returns an error text for a filter that does not parse.
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Shared by the two servers.
#[derive(Clone)]
pub struct Admin {
    /// The mesh data.
    pub mesh: Arc<Mesh>,
    /// The pods served.
    pub pods: Pods,
    /// The log filter control.
    pub set_log_level: SetLogLevel,
    /// The filter in force (as last set).
    pub log_level: Arc<std::sync::Mutex<String>>,
}

impl Admin {
    fn pod_identity(&self, p: &crate::inpod::PodInfo) -> Option<SpiffeId> {
        SpiffeId::new(&self.mesh.trust_domain, &p.namespace, &p.service_account).ok()
    }

    /// Whether this ztunnel can serve traffic, and if not, why.
    pub fn readiness(&self) -> Result<(), String> {
        if !self.mesh.xds.is_synced() {
            return Err("waiting for the control plane's first complete xDS response".into());
        }
        if !self.pods.snapshot_applied() {
            return Err("waiting for the node agent's snapshot".into());
        }
        for p in self.pods.list() {
            let held = self
                .pod_identity(&p)
                .is_some_and(|id| self.mesh.certs.cached(&id).is_some());
            if !held {
                return Err(format!(
                    "no certificate yet for pod {}/{}",
                    p.namespace, p.name
                ));
            }
        }
        Ok(())
    }

    fn config_dump(&self) -> Value {
        let store = self.mesh.xds.store();
        let workloads: Vec<Value> = store
            .workloads()
            .map(|w| {
                let addresses: Vec<String> = w
                    .addresses
                    .iter()
                    .filter_map(|a| match a.len() {
                        4 => <[u8; 4]>::try_from(a.as_slice())
                            .ok()
                            .map(|b| std::net::IpAddr::from(b).to_string()),
                        16 => <[u8; 16]>::try_from(a.as_slice())
                            .ok()
                            .map(|b| std::net::IpAddr::from(b).to_string()),
                        _ => None,
                    })
                    .collect();
                json!({
                    "uid": w.uid, "name": w.name, "namespace": w.namespace,
                    "addresses": addresses,
                    "node": w.node, "serviceAccount": w.service_account,
                    "tunnelProtocol": w.tunnel_protocol,
                    "authorizationPolicies": w.authorization_policies,
                })
            })
            .collect();
        let policies: Vec<Value> = store
            .policy_names()
            .into_iter()
            .map(Value::String)
            .collect();
        let now = SystemTime::now();
        let certs: Vec<Value> = self
            .mesh
            .certs
            .identities()
            .into_iter()
            .map(|id| match self.mesh.certs.cached(&id) {
                Some(c) => {
                    let left = c.not_after().duration_since(now).unwrap_or(Duration::ZERO);
                    json!({"identity": id.to_string(), "state": "valid", "expiresInSeconds": left.as_secs()})
                }
                None => json!({"identity": id.to_string(), "state": "pending or expired"}),
            })
            .collect();
        let pods: Vec<Value> = self
            .pods
            .list()
            .into_iter()
            .map(|p| json!({"uid": p.uid, "name": p.name, "namespace": p.namespace, "serviceAccount": p.service_account}))
            .collect();
        json!({
            "xdsSynced": self.mesh.xds.is_synced(),
            "workloads": workloads,
            "services": store.len().1,
            "policies": policies,
            "certificates": certs,
            "pods": pods,
            "logLevel": *self.log_level.lock().unwrap_or_else(|e| e.into_inner()),
        })
    }

    fn respond<B>(&self, req: &hyper::Request<B>) -> (u16, String) {
        let path = req.uri().path();
        match (req.method().as_str(), path) {
            ("GET", "/config_dump") => (
                200,
                serde_json::to_string_pretty(&self.config_dump()).unwrap_or_default() + "\n",
            ),
            ("GET", "/logging") => (
                200,
                format!(
                    "{}\n",
                    self.log_level.lock().unwrap_or_else(|e| e.into_inner())
                ),
            ),
            ("POST", "/logging") => {
                let level = req
                    .uri()
                    .query()
                    .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("level=")))
                    .unwrap_or("");
                if level.is_empty() {
                    return (400, "POST /logging?level=<filter>\n".into());
                }
                match (self.set_log_level)(level) {
                    Ok(()) => {
                        *self.log_level.lock().unwrap_or_else(|e| e.into_inner()) =
                            level.to_string();
                        tracing::info!(%level, "log level changed");
                        (200, format!("log level: {level}\n"))
                    }
                    Err(e) => (400, format!("invalid filter {level:?}: {e}\n")),
                }
            }
            _ => (
                404,
                "try GET /config_dump, GET or POST /logging?level=\n".into(),
            ),
        }
    }
}

async fn serve_http<F>(listener: TcpListener, handle: F)
where
    F: Fn(&hyper::Request<hyper::body::Incoming>) -> (u16, String) + Clone + Send + Sync + 'static,
{
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (code, body) = handle(&req);
                let resp = hyper::Response::builder()
                    .status(code)
                    .body(Full::new(Bytes::from(body)))
                    .unwrap_or_default();
                async move { Ok::<_, std::convert::Infallible>(resp) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(hyper_util::rt::TokioIo::new(conn), service);
            let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
        });
    }
}

/// Starts admin on `admin_addr` and readiness on `ready_addr`; returns the bound addresses.
pub async fn start(
    admin: Admin,
    admin_addr: SocketAddr,
    ready_addr: SocketAddr,
) -> std::io::Result<(SocketAddr, SocketAddr)> {
    let a = TcpListener::bind(admin_addr).await?;
    let r = TcpListener::bind(ready_addr).await?;
    let bound = (a.local_addr()?, r.local_addr()?);
    let for_admin = admin.clone();
    tokio::spawn(serve_http(a, move |req| for_admin.respond(req)));
    tokio::spawn(serve_http(r, move |req| match req.uri().path() {
        "/healthz/ready" => match admin.readiness() {
            Ok(()) => (200, "ready\n".into()),
            Err(why) => (503, format!("not ready: {why}\n")),
        },
        _ => (404, "try /healthz/ready\n".into()),
    }));
    Ok(bound)
}
