//! The waypoint's admin endpoints, as ztunnel's: a config dump on the admin port
//! (localhost by default), Prometheus metrics (`/metrics`, and `/stats/prometheus` as
//! Istio's proxies name it), readiness (`/healthz/ready`: 200 once the configuration is
//! synced and the certificate held, 503 before and while draining).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::net::TcpListener;

use crate::proxy::Waypoint;
use crate::{BoxError, Config};

/// Where the admin listeners are bound.
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    /// Config dump.
    pub admin: SocketAddr,
    /// Metrics.
    pub metrics: SocketAddr,
    /// Readiness.
    pub readiness: SocketAddr,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Endpoints {
    Admin,
    Metrics,
    Readiness,
}

/// Binds and serves the three listeners.
pub async fn start(
    config: &Config,
    wp: Arc<Waypoint>,
    metrics: PrometheusHandle,
) -> Result<Bound, BoxError> {
    let mut bound = Vec::new();
    for (addr, which) in [
        (config.admin_addr, Endpoints::Admin),
        (config.metrics_addr, Endpoints::Metrics),
        (config.readiness_addr, Endpoints::Readiness),
    ] {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        bound.push(listener.local_addr()?);
        let (wp, metrics) = (wp.clone(), metrics.clone());
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let (wp, metrics) = (wp.clone(), metrics.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
                        let resp = respond(&req, which, &wp, &metrics);
                        async move { Ok::<_, std::convert::Infallible>(resp) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(Duration::from_secs(5))
                        .serve_connection(hyper_util::rt::TokioIo::new(conn), service);
                    let _ = tokio::time::timeout(Duration::from_secs(30), conn).await;
                });
            }
        });
    }
    Ok(Bound {
        admin: bound[0],
        metrics: bound[1],
        readiness: bound[2],
    })
}

fn respond<B>(
    req: &hyper::Request<B>,
    which: Endpoints,
    wp: &Waypoint,
    metrics: &PrometheusHandle,
) -> hyper::Response<Full<Bytes>> {
    let path = req.uri().path();
    let (code, ctype, body) = match (which, path) {
        (_, "/healthz/ready") => {
            if wp.is_ready() && !wp.is_draining() {
                (200, "text/plain", "ready\n".to_string())
            } else {
                (503, "text/plain", "not ready\n".to_string())
            }
        }
        (Endpoints::Metrics, "/metrics" | "/stats/prometheus") => {
            (200, "text/plain; version=0.0.4", metrics.render())
        }
        (Endpoints::Admin, "/config_dump") => (200, "application/json", config_dump(wp)),
        _ => (404, "text/plain", "not found\n".to_string()),
    };
    hyper::Response::builder()
        .status(code)
        .header("content-type", ctype)
        .body(Full::new(Bytes::from(body)))
        .unwrap_or_default()
}

/// What the waypoint serves, as it knows it now.
fn config_dump(wp: &Waypoint) -> String {
    let store = wp.mesh.xds.store();
    let routes: Vec<serde_json::Value> = store
        .routes()
        .map(|(name, r)| {
            json!({
                "name": name,
                "protocol": r.protocol().as_str_name(),
                "rules": r.rules.iter().map(|rule| rule.name.clone()).collect::<Vec<_>>(),
                // What a DestinationRule of the Service sets (backends' own are per rule).
                "traffic_policy": r.traffic_policy.as_ref().map(|t| json!({
                    "circuit_breaker": t.circuit_breaker.is_some(),
                    "outlier_detection": t.outlier_detection.is_some(),
                    "load_balancer": t.load_balancer.as_ref().map(|l| {
                        if l.consistent_hash.is_some() {
                            "CONSISTENT_HASH"
                        } else {
                            l.simple().as_str_name()
                        }
                    }),
                })),
                // LocalTrafficPolicies: the Service port's, and the rules that have one.
                "rate_limit": r.rate_limit.is_some(),
                "fault": r.fault.is_some(),
                "rules_with_local_policy": r.rules.iter()
                    .filter(|rule| rule.rate_limit.is_some() || rule.fault.is_some())
                    .map(|rule| rule.name.clone())
                    .collect::<std::collections::BTreeSet<_>>(),
            })
        })
        .collect();
    let workloads: Vec<serde_json::Value> = store
        .workloads()
        .map(|w| {
            json!({
                "uid": w.uid,
                "addresses": w.addresses.iter().filter_map(|a| match a.len() {
                    4 => <[u8; 4]>::try_from(a.as_slice()).ok().map(|b| std::net::IpAddr::from(b).to_string()),
                    16 => <[u8; 16]>::try_from(a.as_slice()).ok().map(|b| std::net::IpAddr::from(b).to_string()),
                    _ => None,
                }).collect::<Vec<_>>(),
                "waypoint": w.waypoint.is_some(),
            })
        })
        .collect();
    let (_, services, _) = store.len();
    let dump = json!({
        "identity": wp.mesh.identity.to_string(),
        "ready": wp.is_ready(),
        "synced": wp.mesh.xds.is_synced(),
        "certificates": wp.mesh.certs.identities().iter().map(ToString::to_string).collect::<Vec<_>>(),
        "routes": routes,
        "workloads": workloads,
        "services": services,
    });
    serde_json::to_string_pretty(&dump).unwrap_or_default()
}
