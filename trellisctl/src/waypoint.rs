//! `trellisctl waypoint generate|apply`: the waypoint `Gateway` of a namespace, as
//! `istioctl waypoint` writes it (class `istio-waypoint`, one HBONE listener on 15008, the
//! traffic it takes in label `istio.io/waypoint-for`), and with `--enroll-namespace` the
//! namespace's `istio.io/use-waypoint` label. The control plane then deploys it.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use serde_json::{Value, json};

/// The field manager of what trellisctl writes.
pub(crate) const FIELD_MANAGER: &str = "trellisctl";

/// What the waypoint is for and where.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct WaypointArgs {
    /// Namespace of the waypoint.
    #[arg(short, long, default_value = "default")]
    pub(crate) namespace: String,
    /// Name of the waypoint (its Gateway, Deployment and Service).
    #[arg(long, default_value = "waypoint")]
    pub(crate) name: String,
    /// Traffic the waypoint takes: addressed to services, to workloads, both, or none.
    #[arg(long = "for", default_value = "service", value_parser = ["service", "workload", "all", "none"])]
    pub(crate) for_: String,
    /// Also label the namespace to use this waypoint (`istio.io/use-waypoint`).
    #[arg(long)]
    pub(crate) enroll_namespace: bool,
}

/// The waypoint's Gateway.
pub(crate) fn gateway(args: &WaypointArgs) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {
            "name": args.name,
            "namespace": args.namespace,
            "labels": {"istio.io/waypoint-for": args.for_},
        },
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    })
}

/// The namespace label that sends its traffic through the waypoint.
pub(crate) fn enrollment(args: &WaypointArgs) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": args.namespace,
            "labels": {"istio.io/use-waypoint": args.name},
        },
    })
}

/// `generate`: the objects as YAML documents.
pub(crate) fn generate(args: &WaypointArgs) -> Result<String> {
    let mut out = serde_yaml_ng::to_string(&gateway(args))?;
    if args.enroll_namespace {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&enrollment(args))?);
    }
    Ok(out)
}

fn api(
    client: &kube::Client,
    group: &str,
    kind: &str,
    plural: &str,
    ns: Option<&str>,
) -> Api<DynamicObject> {
    let ar = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, "v1", kind), plural);
    match ns {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    }
}

/// `apply`: writes the Gateway (and the namespace label) with server-side apply. Returns
/// notes for the user (a namespace not in the mesh).
pub(crate) async fn apply(client: &kube::Client, args: &WaypointArgs) -> Result<Vec<String>> {
    let namespaces = api(client, "", "Namespace", "namespaces", None);
    let ns = namespaces
        .get_opt(&args.namespace)
        .await
        .with_context(|| format!("reading namespace {}", args.namespace))?;
    let Some(ns) = ns else {
        bail!("namespace {} does not exist", args.namespace);
    };
    let mut notes = Vec::new();
    let mode = ns
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("istio.io/dataplane-mode"));
    if mode.map(String::as_str) != Some("ambient") {
        notes.push(format!(
            "namespace {} is not in the mesh: label it istio.io/dataplane-mode=ambient for its traffic to reach the waypoint",
            args.namespace
        ));
    }
    let params = PatchParams::apply(FIELD_MANAGER);
    api(
        client,
        "gateway.networking.k8s.io",
        "Gateway",
        "gateways",
        Some(&args.namespace),
    )
    .patch(&args.name, &params, &Patch::Apply(gateway(args)))
    .await
    .with_context(|| {
        format!(
            "writing Gateway {}/{} (are the Gateway API CRDs installed?)",
            args.namespace, args.name
        )
    })?;
    if args.enroll_namespace {
        namespaces
            .patch(&args.namespace, &params, &Patch::Apply(enrollment(args)))
            .await
            .with_context(|| format!("labelling namespace {}", args.namespace))?;
    }
    Ok(notes)
}

/// Waits until the control plane reports the waypoint `Programmed`; returns its address.
pub(crate) async fn wait_programmed(
    client: &kube::Client,
    args: &WaypointArgs,
    timeout: Duration,
) -> Result<String> {
    let gateways = api(
        client,
        "gateway.networking.k8s.io",
        "Gateway",
        "gateways",
        Some(&args.namespace),
    );
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let gw = gateways.get(&args.name).await?;
        let status = gw.data.get("status").cloned().unwrap_or_default();
        let programmed = status["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Programmed" && c["status"] == "True");
        if programmed && let Some(addr) = status["addresses"][0]["value"].as_str() {
            return Ok(addr.to_string());
        }
        if tokio::time::Instant::now() >= deadline {
            let why = status["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| format!("{}={} ({})", c["type"], c["status"], c["message"]))
                .collect::<Vec<_>>()
                .join(", ");
            bail!(
                "waypoint {}/{} not programmed after {}s: {}",
                args.namespace,
                args.name,
                timeout.as_secs(),
                if why.is_empty() {
                    "no status yet (is the Trellis control plane running?)".into()
                } else {
                    why
                }
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[cfg(test)]
mod tests {
    //! Against a mocked API server (kube's `Client` over a `tower-test` mock service stands
    //! in for the API server, which cannot run here).
    use super::*;
    use http::{Request, Response};
    use http_body_util::BodyExt;
    use kube::client::Body;

    fn args(enroll: bool) -> WaypointArgs {
        WaypointArgs {
            namespace: "shop".into(),
            name: "waypoint".into(),
            for_: "all".into(),
            enroll_namespace: enroll,
        }
    }

    #[test]
    fn generate_writes_the_gateway_istio_ambient_expects() {
        let out = generate(&args(true)).unwrap();
        let docs: Vec<Value> = out
            .split("---\n")
            .map(|d| serde_yaml_ng::from_str(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0]["spec"]["gatewayClassName"], "istio-waypoint");
        assert_eq!(
            docs[0]["metadata"]["labels"]["istio.io/waypoint-for"],
            "all"
        );
        assert_eq!(
            docs[0]["spec"]["listeners"],
            json!([{"name": "mesh", "port": 15008, "protocol": "HBONE"}])
        );
        assert_eq!(
            docs[1]["metadata"]["labels"]["istio.io/use-waypoint"],
            "waypoint"
        );
        assert_eq!(generate(&args(false)).unwrap().matches("kind:").count(), 1);
    }

    #[tokio::test]
    async fn apply_writes_the_gateway_and_the_label_and_warns_of_a_namespace_outside_the_mesh() {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = kube::Client::new(service, "default");
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let body = body.collect().await.unwrap().to_bytes();
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let reply = if parts.method == "GET" {
                    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}})
                } else {
                    body.clone()
                };
                let query = parts.uri.query().unwrap_or_default().to_string();
                seen.push((
                    parts.method.to_string(),
                    parts.uri.path().to_string(),
                    query,
                    body,
                ));
                send.send_response(Response::new(Body::from(
                    serde_json::to_vec(&reply).unwrap(),
                )));
            }
            seen
        });
        let notes = apply(&client, &args(true)).await.unwrap();
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert!(notes[0].contains("not in the mesh"), "{notes:?}");
        drop(client);
        let seen = server.await.unwrap();
        let calls: Vec<(&str, &str)> = seen
            .iter()
            .map(|(m, p, _, _)| (m.as_str(), p.as_str()))
            .collect();
        assert_eq!(
            calls,
            [
                ("GET", "/api/v1/namespaces/shop"),
                (
                    "PATCH",
                    "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/waypoint"
                ),
                ("PATCH", "/api/v1/namespaces/shop"),
            ]
        );
        for (_, _, query, _) in &seen[1..] {
            assert!(
                query.contains("fieldManager=trellisctl"),
                "server-side apply: {query}"
            );
        }
        assert_eq!(seen[1].3, gateway(&args(true)));
        assert_eq!(
            seen[2].3["metadata"]["labels"],
            json!({"istio.io/use-waypoint": "waypoint"})
        );
    }
}
