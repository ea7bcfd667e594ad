//! A mocked Kubernetes API server for the tests: kube's `Client` over a `tower-test` mock
//! service stands in for the API server (the one thing that cannot run here). It records
//! each request and answers with what the test's function says.
#![allow(dead_code)] // each test file uses its own part

use http::{Request, Response};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// One request the mocked API server received.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    pub(crate) method: String,
    pub(crate) path: String,
    pub(crate) query: String,
    pub(crate) content_type: String,
    pub(crate) body: Value,
}

/// Answers requests with `answer(method, path, body) -> (status code, body)`, reporting
/// each on the returned channel.
pub(crate) fn api_server(
    answer: impl Fn(&str, &str, &Value) -> (u16, Value) + Send + 'static,
) -> (kube::Client, mpsc::UnboundedReceiver<Seen>) {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = kube::Client::new(service, "trellis-system");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some((req, send)) = handle.next_request().await {
            let (parts, body) = req.into_parts();
            let bytes = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            let seen = Seen {
                method: parts.method.to_string(),
                path: parts.uri.path().to_string(),
                query: parts.uri.query().unwrap_or_default().to_string(),
                content_type: parts
                    .headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string(),
                body: body.clone(),
            };
            let (code, reply) = answer(&seen.method, &seen.path, &body);
            let _ = tx.send(seen);
            send.send_response(
                Response::builder()
                    .status(code)
                    .body(Body::from(serde_json::to_vec(&reply).unwrap()))
                    .unwrap(),
            );
        }
    });
    (client, rx)
}

pub(crate) fn not_found() -> (u16, Value) {
    (
        404,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": "NotFound", "message": "not found", "code": 404}),
    )
}

pub(crate) fn conflict() -> (u16, Value) {
    (
        409,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": "Conflict", "message": "the object has been modified", "code": 409}),
    )
}

/// Everything received so far.
pub(crate) fn drain(rx: &mut mpsc::UnboundedReceiver<Seen>) -> Vec<Seen> {
    let mut out = Vec::new();
    while let Ok(s) = rx.try_recv() {
        out.push(s);
    }
    out
}

/// A `Status` answer with `code` and `reason`.
pub(crate) fn status(code: u16, reason: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "reason": reason, "message": reason, "code": code}),
    )
}
