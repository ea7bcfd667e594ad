//! Authentication on Kubernetes: the caller's projected ServiceAccount token, verified by
//! the API server (`TokenReview`), for the control plane's audience only.
//!
//! - The token must be bound to a pod (a projected token: `authentication.kubernetes.io/
//!   pod-name` and `pod-uid` in the review's extra fields). Legacy Secret-based tokens,
//!   which outlive their pods, are refused.
//! - ztunnel's ServiceAccount (`<namespace>/trellis-ztunnel` by default) makes the caller
//!   the ztunnel of the node its pod runs on: the pod is read from the API, its uid must be
//!   the token's (a pod deleted and re-created under the same name is another pod), and
//!   when the token names a node (`authentication.kubernetes.io/node-name`, Kubernetes
//!   1.30+) it must be the pod's node; the pod must be run by a DaemonSet. The CA then issues only identities of pods on that
//!   node.
//! - Any other ServiceAccount runs as its own identity (waypoints): it may obtain only
//!   `spiffe://<trust domain>/ns/<namespace>/sa/<name>`.
//!
//! Verdicts are cached by the token's digest (accepted for at most five minutes and never
//! past the token's expiry; refused for ten seconds), so a proxy's streams and renewals
//! cost one review. What reaches the API server is bounded: only tokens shaped like
//! unexpired JWTs are sent, at most [`MAX_REVIEWS`] at a time (a caller that cannot get a
//! turn within two seconds is refused, and retries like any refused proxy); when the cache
//! is full, refusals and expired verdicts go first.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::PostParams;
use tokio::time::Instant;
use tonic::metadata::MetadataMap;
use trellis_core::SpiffeId;

use super::CaError;
use super::auth::{Authenticator, Caller, LocalCredentials, bearer_token};

const ACCEPTED_FOR: Duration = Duration::from_secs(300);
const REFUSED_FOR: Duration = Duration::from_secs(10);
const MAX_CACHED: usize = 100_000;
/// Token reviews in flight at most.
pub const MAX_REVIEWS: usize = 16;
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// A cached review: the caller or why not, and until when it holds.
type Verdict = (Result<Caller, String>, Instant);

/// Verifies ServiceAccount tokens with the API server.
pub struct TokenReviewAuth {
    client: kube::Client,
    audience: String,
    trust_domain: String,
    /// ztunnel's ServiceAccount: (namespace, name).
    ztunnel: (String, String),
    cache: Mutex<HashMap<[u8; 32], Verdict>>,
    reviews: tokio::sync::Semaphore,
    /// Credentials issued by `trellis-control-plane credential`, accepted too (for proxies
    /// run outside the cluster).
    local: Option<std::sync::Arc<LocalCredentials>>,
}

impl std::fmt::Debug for TokenReviewAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuth")
            .field("audience", &self.audience)
            .field("ztunnel", &self.ztunnel)
            .finish_non_exhaustive()
    }
}

impl TokenReviewAuth {
    /// Tokens for `audience`; ztunnel runs as ServiceAccount `ztunnel` (namespace, name).
    pub fn new(
        client: kube::Client,
        audience: &str,
        trust_domain: &str,
        ztunnel: (String, String),
    ) -> TokenReviewAuth {
        TokenReviewAuth {
            client,
            audience: audience.into(),
            trust_domain: trust_domain.into(),
            ztunnel,
            cache: Mutex::new(HashMap::new()),
            reviews: tokio::sync::Semaphore::new(MAX_REVIEWS),
            local: None,
        }
    }

    /// Also accepts the credentials `local` knows.
    pub fn with_local(mut self, local: std::sync::Arc<LocalCredentials>) -> TokenReviewAuth {
        self.local = Some(local);
        self
    }

    fn cached(&self, digest: &[u8; 32]) -> Option<Result<Caller, String>> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        match cache.get(digest) {
            Some((verdict, until)) if Instant::now() < *until => Some(verdict.clone()),
            _ => None,
        }
    }

    fn remember(&self, digest: [u8; 32], verdict: Result<Caller, String>, until: Instant) {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED {
            let now = Instant::now();
            cache.retain(|_, (_, t)| *t > now);
        }
        if cache.len() >= MAX_CACHED {
            // Refusals before acceptances: a flood of bad tokens must not evict proxies.
            cache.retain(|_, (v, _)| v.is_ok());
        }
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert(digest, (verdict, until));
    }

    /// Asks the API server about `token`; returns the caller and until when the verdict
    /// holds.
    async fn review(&self, token: &str) -> Result<(Caller, Instant), String> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| format!("the token could not be reviewed: {e}"))?;
        let status = reviewed.status.unwrap_or_default();
        let (namespace, account, pod, uid, node) = check_review(&status, &self.audience)?;
        let until = Instant::now() + ACCEPTED_FOR.min(time_left(token).unwrap_or(ACCEPTED_FOR));
        if (namespace.as_str(), account.as_str())
            == (self.ztunnel.0.as_str(), self.ztunnel.1.as_str())
        {
            let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
            let p = pods
                .get_opt(&pod)
                .await
                .map_err(|e| format!("cannot read pod {namespace}/{pod}: {e}"))?
                .ok_or_else(|| format!("the token's pod {namespace}/{pod} does not exist"))?;
            let node_name = node_of(&p, &uid, node.as_deref())
                .map_err(|e| format!("pod {namespace}/{pod}: {e}"))?;
            return Ok((Caller::Node(node_name), until));
        }
        let id = SpiffeId::new(&self.trust_domain, &namespace, &account)
            .map_err(|e| format!("ServiceAccount {namespace}/{account}: {e}"))?;
        Ok((Caller::Waypoint(id), until))
    }
}

/// What a successful review says: (namespace, ServiceAccount, pod name, pod uid, node name
/// if given), or why the token is refused.
pub fn check_review(
    status: &TokenReviewStatus,
    audience: &str,
) -> Result<(String, String, String, String, Option<String>), String> {
    if status.authenticated != Some(true) {
        let why = status
            .error
            .clone()
            .unwrap_or_else(|| "not authenticated".into());
        return Err(format!("the API server refused the token: {why}"));
    }
    if !status.audiences.iter().flatten().any(|a| a == audience) {
        return Err(format!("the token is not for audience {audience}"));
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    let Some(rest) = username.strip_prefix("system:serviceaccount:") else {
        return Err(format!("{username:?} is not a ServiceAccount"));
    };
    let Some((namespace, account)) = rest.split_once(':') else {
        return Err(format!("{username:?} is not a ServiceAccount"));
    };
    let extra = user.extra.unwrap_or_default();
    let one = |key: &str| extra.get(key).and_then(|v| v.first()).cloned();
    let (Some(pod), Some(uid)) = (one(POD_NAME), one(POD_UID)) else {
        return Err(
            "the token is not bound to a pod (use a projected ServiceAccount token)".into(),
        );
    };
    Ok((namespace.into(), account.into(), pod, uid, one(NODE_NAME)))
}

/// The node `pod` runs on, checked against the token's pod uid and node name. The pod must
/// be a DaemonSet's (ztunnel's): a pod someone else created with ztunnel's ServiceAccount
/// (a Deployment's, a bare pod) is not a node's ztunnel.
pub fn node_of(pod: &Pod, token_uid: &str, token_node: Option<&str>) -> Result<String, String> {
    if pod.metadata.uid.as_deref() != Some(token_uid) {
        return Err("the token belongs to an earlier pod of that name".into());
    }
    let controller = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true));
    if controller.is_none_or(|o| o.kind != "DaemonSet") {
        return Err("the pod is not run by a DaemonSet, so it is no node's ztunnel".into());
    }
    let node = pod
        .spec
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .ok_or("the pod is not scheduled on a node")?;
    if let Some(t) = token_node
        && t != node
    {
        return Err(format!("the token names node {t}, the pod runs on {node}"));
    }
    Ok(node)
}

/// Whether `token` is shaped like a JWT (three base64url parts).
fn is_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3
        && parts.iter().take(2).all(|p| !p.is_empty())
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'='))
}

/// How long `token` (already verified by the API server) is still valid, from its `exp`.
fn time_left(token: &str) -> Option<Duration> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_i64()?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    Some(Duration::from_secs(exp.saturating_sub(now).max(0) as u64))
}

#[tonic::async_trait]
impl Authenticator for TokenReviewAuth {
    async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, CaError> {
        let token = bearer_token(metadata)?;
        if !is_jwt(token) {
            return match &self.local {
                Some(local) => local.check(metadata),
                None => Err(CaError::Unauthenticated(
                    "the credential is not a ServiceAccount token".into(),
                )),
            };
        }
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
            .as_ref()
            .try_into()
            .unwrap_or([0; 32]);
        let verdict = match self.cached(&digest) {
            Some(v) => v,
            None => {
                if time_left(token) == Some(Duration::ZERO) {
                    return Err(CaError::Unauthenticated("the token has expired".into()));
                }
                let Ok(Ok(_turn)) =
                    tokio::time::timeout(Duration::from_secs(2), self.reviews.acquire()).await
                else {
                    return Err(CaError::Unauthenticated(
                        "too many token reviews in progress; retry".into(),
                    ));
                };
                // Another caller may have reviewed the same token while this one waited.
                if let Some(v) = self.cached(&digest) {
                    return v.map_err(CaError::Unauthenticated);
                }
                let (verdict, until) = match self.review(token).await {
                    Ok((caller, until)) => (Ok(caller), until),
                    Err(e) => (Err(e), Instant::now() + REFUSED_FOR),
                };
                self.remember(digest, verdict.clone(), until);
                verdict
            }
        };
        verdict.map_err(CaError::Unauthenticated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_jwt_shaped_tokens_are_reviewed() {
        assert!(is_jwt("eyJhbGciOiJSUzI1NiJ9.eyJleHAiOjF9.c2ln"));
        assert!(!is_jwt("3f2a9c"));
        assert!(!is_jwt("a.b"));
        assert!(!is_jwt("a.b.c d"));
    }

    #[test]
    fn a_token_is_trusted_no_longer_than_its_expiry() {
        use base64::Engine;
        let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 60;
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{{\"exp\":{exp}}}"));
        let left = time_left(&format!("eyJhbGciOiJSUzI1NiJ9.{payload}.c2ln")).unwrap();
        assert!(
            left <= Duration::from_secs(60) && left >= Duration::from_secs(55),
            "{left:?}"
        );
    }
}
