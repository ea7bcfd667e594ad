//! End-user authentication at the waypoint: the `RequestAuthentication` rules the control
//! plane sends (`trellis.waypoint.v1.RequestAuthentication`), with Istio's semantics:
//!
//! - A request carrying no token passes as unauthenticated (no request principal; an ALLOW
//!   policy asking for `requestPrincipals` then denies it).
//! - A request carrying a token that does not verify — unknown issuer, bad signature,
//!   expired (60 s of clock skew), not yet valid, wrong audience, `alg: none`, an HMAC
//!   algorithm — is answered `401`.
//! - A verified token gives the request principal `<iss>/<sub>` and its claims to policy.
//!   The token is removed before the request goes on unless `forwardOriginalToken`; its
//!   payload and claims can be copied to headers.
//!
//! Signatures are checked by the `jsonwebtoken` crate (RS256/384/512, PS256/384/512,
//! ES256/384, EdDSA); keys come from inline JWKS or from `jwksUri`, fetched with a timeout,
//! cached, fetched again on an unknown `kid` at most every [`REFETCH_EVERY`], the last good
//! keys kept when a fetch fails.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use http::{HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::Value;
use trellis_proto::trellis::waypoint::v1 as pb;

/// Clock skew allowed on `exp` and `nbf`.
pub const SKEW: Duration = Duration::from_secs(60);
/// Least time between two fetches of one `jwksUri` for an unknown `kid`.
pub const REFETCH_EVERY: Duration = Duration::from_secs(5);
/// Default JWKS fetch timeout.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// The end-user identity of a verified token.
#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    /// `<iss>/<sub>`.
    pub principal: String,
    /// The token's claims.
    pub claims: Value,
}

/// Why a request's token was refused (the 401's reason, logged; the client sees only
/// `Jwt verification fails`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

/// The compiled rules of one configuration generation.
#[derive(Debug, Default)]
pub struct Rules {
    list: Vec<Rule>,
}

#[derive(Debug)]
struct Rule {
    /// `None`: all of this waypoint's traffic; else these (namespace, hostname).
    services: Option<Vec<(String, String)>>,
    providers: Vec<Provider>,
    /// The mesh's secure default: a request without a token is refused.
    require_token: bool,
}

#[derive(Debug)]
struct Provider {
    issuer: String,
    audiences: Vec<String>,
    keys: Keys,
    /// (header, prefix); all locations empty = `Authorization: Bearer` and `access_token`.
    headers: Vec<(HeaderName, String)>,
    params: Vec<String>,
    cookies: Vec<String>,
    payload_header: Option<HeaderName>,
    forward: bool,
    claim_headers: Vec<(HeaderName, String)>,
    timeout: Duration,
}

#[derive(Debug)]
enum Keys {
    Inline(Arc<JwkSet>),
    Uri(String),
    /// Inline JWKS that does not parse, or no source: no token of this issuer verifies.
    None,
}

impl Rules {
    /// Compiles the rules of one configuration.
    pub fn compile<'a>(list: impl Iterator<Item = &'a pb::RequestAuthentication>) -> Rules {
        let list = list
            .filter_map(|ra| {
                let services = crate::authz::target_services(ra.target.as_ref()?)?;
                let providers = ra.providers.iter().map(provider).collect();
                Some(Rule {
                    services,
                    providers,
                    require_token: ra.require_token,
                })
            })
            .collect();
        Rules { list }
    }

    /// Whether no rule exists (nothing to check).
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

fn provider(p: &pb::JwtProvider) -> Provider {
    use pb::jwt_provider::JwksSource;
    let keys = match &p.jwks_source {
        Some(JwksSource::Jwks(inline)) => match serde_json::from_str::<JwkSet>(inline) {
            Ok(set) => Keys::Inline(Arc::new(set)),
            Err(e) => {
                tracing::warn!(issuer = %p.issuer, error = %e, "inline JWKS does not parse: no token of this issuer verifies");
                Keys::None
            }
        },
        Some(JwksSource::JwksUri(uri)) => Keys::Uri(uri.clone()),
        None => Keys::None,
    };
    let header = |name: &str| HeaderName::from_bytes(name.as_bytes()).ok();
    Provider {
        issuer: p.issuer.clone(),
        audiences: p.audiences.clone(),
        keys,
        headers: p
            .from_headers
            .iter()
            .filter_map(|h| Some((header(&h.name)?, h.prefix.clone())))
            .collect(),
        params: p.from_params.clone(),
        cookies: p.from_cookies.clone(),
        payload_header: (!p.output_payload_to_header.is_empty())
            .then(|| header(&p.output_payload_to_header))
            .flatten(),
        forward: p.forward_original_token,
        claim_headers: p
            .output_claim_to_headers
            .iter()
            .filter_map(|c| Some((header(&c.header)?, c.claim.clone())))
            .collect(),
        timeout: p
            .jwks_fetch_timeout
            .as_ref()
            .and_then(|d| Duration::try_from(*d).ok())
            .unwrap_or(FETCH_TIMEOUT),
    }
}

/// Where a token was found.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Found {
    Header(HeaderName),
    Param(String),
    Cookie(String),
}

impl Provider {
    /// The tokens at this provider's locations.
    fn tokens(&self, headers: &HeaderMap, query: Option<&str>) -> Vec<(String, Found)> {
        let mut out = Vec::new();
        let default = self.headers.is_empty() && self.params.is_empty() && self.cookies.is_empty();
        let bearer = [(http::header::AUTHORIZATION, "Bearer ".to_string())];
        let headers_to_read: &[(HeaderName, String)] =
            if default { &bearer } else { &self.headers };
        for (name, prefix) in headers_to_read {
            for v in headers.get_all(name) {
                let Ok(v) = v.to_str() else { continue };
                let token = if prefix.is_empty() {
                    Some(v)
                } else {
                    v.get(..prefix.len())
                        .filter(|p| p.eq_ignore_ascii_case(prefix))
                        .map(|_| &v[prefix.len()..])
                };
                if let Some(t) = token.map(str::trim).filter(|t| !t.is_empty()) {
                    out.push((t.to_string(), Found::Header(name.clone())));
                }
            }
        }
        let params: Vec<&str> = if default {
            vec!["access_token"]
        } else {
            self.params.iter().map(String::as_str).collect()
        };
        if let Some(q) = query {
            for pair in q.split('&') {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                if params.contains(&k) && !v.is_empty() {
                    out.push((v.to_string(), Found::Param(k.to_string())));
                }
            }
        }
        for cookie_header in headers.get_all(http::header::COOKIE) {
            let Ok(c) = cookie_header.to_str() else {
                continue;
            };
            for kv in c.split(';') {
                let (k, v) = kv.trim().split_once('=').unwrap_or((kv.trim(), ""));
                if self.cookies.iter().any(|n| n == k) && !v.is_empty() {
                    out.push((v.to_string(), Found::Cookie(k.to_string())));
                }
            }
        }
        out
    }
}

/// The JWKS of each `jwksUri`, shared by the workers.
#[derive(Debug)]
pub struct KeyCache {
    entries: Mutex<HashMap<String, CacheEntry>>,
    /// Least time between fetches of one URI for an unknown `kid` ([`REFETCH_EVERY`]).
    refetch_every: Duration,
    /// CA bundle for `https` JWKS servers; `None`: the system's.
    roots_file: Option<std::path::PathBuf>,
    /// The client configuration with those roots, loaded on first use.
    roots: std::sync::OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
}

impl Default for KeyCache {
    fn default() -> KeyCache {
        KeyCache::with_refetch_every(REFETCH_EVERY)
    }
}

impl KeyCache {
    /// A cache that fetches a URI again for an unknown `kid` at most every `every`.
    pub fn with_refetch_every(every: Duration) -> KeyCache {
        KeyCache {
            entries: Mutex::default(),
            refetch_every: every,
            roots_file: None,
            roots: std::sync::OnceLock::new(),
        }
    }

    /// The cache trusting the CA bundle in `file` (PEM) for `https` JWKS servers instead
    /// of the system's.
    pub fn with_roots_file(mut self, file: Option<std::path::PathBuf>) -> KeyCache {
        self.roots_file = file;
        self
    }
}

#[derive(Debug, Default, Clone)]
struct CacheEntry {
    keys: Option<Arc<JwkSet>>,
    last_attempt: Option<Instant>,
}

impl KeyCache {
    /// The keys of `uri`: cached; fetched when never fetched, or (`refresh`, an unknown
    /// `kid`) when the last attempt is older than [`REFETCH_EVERY`]. A failed fetch keeps
    /// the last good keys.
    async fn keys(&self, uri: &str, refresh: bool, timeout: Duration) -> Option<Arc<JwkSet>> {
        {
            let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
            let e = entries.entry(uri.to_string()).or_default();
            let due = match (&e.keys, e.last_attempt) {
                (None, None) => true,
                (None, Some(at)) | (Some(_), Some(at)) => {
                    (refresh || e.keys.is_none()) && at.elapsed() >= self.refetch_every
                }
                (Some(_), None) => refresh,
            };
            if due {
                e.last_attempt = Some(Instant::now());
            }
            if !due {
                return e.keys.clone();
            }
        }
        let fetched = tokio::time::timeout(timeout, self.fetch(uri)).await;
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let e = entries.entry(uri.to_string()).or_default();
        match fetched {
            Ok(Ok(set)) => {
                tracing::info!(uri, keys = set.keys.len(), "JWKS fetched");
                e.keys = Some(Arc::new(set));
            }
            Ok(Err(err)) => {
                tracing::warn!(uri, error = %err, "JWKS fetch failed; keeping the last good keys")
            }
            Err(_) => tracing::warn!(
                uri,
                ?timeout,
                "JWKS fetch timed out; keeping the last good keys"
            ),
        }
        e.keys.clone()
    }

    async fn fetch(&self, uri: &str) -> Result<JwkSet, String> {
        let parsed: http::Uri = uri.parse().map_err(|e| format!("{uri}: {e}"))?;
        let https = match parsed.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(format!("{uri}: only http and https")),
        };
        let host = parsed
            .host()
            .ok_or_else(|| format!("{uri}: no host"))?
            .to_string();
        let port = parsed.port_u16().unwrap_or(if https { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host.trim_matches(['[', ']']), port))
            .await
            .map_err(|e| format!("connect {host}:{port}: {e}"))?;
        let path = parsed
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .to_string();
        let req = http::Request::builder()
            .uri(path)
            .header(
                http::header::HOST,
                parsed.authority().map_or(host.as_str(), |a| a.as_str()),
            )
            .header(http::header::ACCEPT, "application/json")
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| e.to_string())?;
        let body = if https {
            let config = self
                .roots
                .get_or_init(|| client_config(self.roots_file.as_deref()))
                .clone()?;
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| format!("{host}: {e}"))?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with {host}: {e}"))?;
            send(hyper_util::rt::TokioIo::new(tls), req).await?
        } else {
            send(hyper_util::rt::TokioIo::new(tcp), req).await?
        };
        serde_json::from_slice::<JwkSet>(&body).map_err(|e| format!("not a JWKS: {e}"))
    }
}

async fn send<IO>(
    io: IO,
    req: http::Request<http_body_util::Empty<bytes::Bytes>>,
) -> Result<bytes::Bytes, String>
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    use http_body_util::BodyExt;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let body = http_body_util::Limited::new(resp.into_body(), 1 << 20)
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?;
    Ok(body.to_bytes())
}

/// A TLS client configuration trusting the system's CA bundle.
/// The TLS client configuration for JWKS servers: the roots of `file`, or of the system's
/// bundle. An error (kept: every fetch reports it) names the file and what is wrong.
fn client_config(file: Option<&std::path::Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    const SYSTEM: [&str; 2] = [
        "/etc/ssl/certs/ca-certificates.crt",
        "/etc/pki/tls/certs/ca-bundle.crt",
    ];
    let (path, pem) = match file {
        Some(f) => (
            f.display().to_string(),
            std::fs::read_to_string(f)
                .map_err(|e| format!("JWKS CA bundle {}: {e}", f.display()))?,
        ),
        None => SYSTEM
            .iter()
            .find_map(|p| Some((p.to_string(), std::fs::read_to_string(p).ok()?)))
            .ok_or("no CA roots for https: the system bundle did not load")?,
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in
        trellis_core::tls::parse_pem_certs(&pem, "CA bundle").map_err(|e| format!("{path}: {e}"))?
    {
        roots
            .add(c)
            .map_err(|e| format!("{path}: a certificate is not a CA root: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// What authentication decided for one request.
#[derive(Debug, Default)]
pub struct Outcome {
    /// The verified end user, when a token verified.
    pub verified: Option<Verified>,
    /// Headers to remove (tokens not forwarded) and to set (payload, claims) upstream.
    pub remove: Vec<HeaderName>,
    /// Headers to set upstream.
    pub set: Vec<(HeaderName, HeaderValue)>,
}

impl Rules {
    /// Authenticates a request to `service` (namespace, hostname; none for workload
    /// traffic): `Ok` with what to change upstream, or `Err` for a 401.
    pub async fn authenticate(
        &self,
        cache: &KeyCache,
        service: Option<(&str, &str)>,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Outcome, Refused> {
        let rules: Vec<&Rule> = self
            .list
            .iter()
            .filter(|r| crate::authz::covers(r.services.as_deref(), service))
            .collect();
        let providers: Vec<&Provider> = rules.iter().flat_map(|r| &r.providers).collect();
        let mut out = Outcome::default();
        if providers.is_empty() {
            return Ok(out);
        }
        // Every token found at some provider's location.
        let mut found: Vec<(String, Found)> = Vec::new();
        for p in &providers {
            for t in p.tokens(headers, query) {
                if !found.contains(&t) {
                    found.push(t);
                }
            }
        }
        if found.is_empty() && rules.iter().any(|r| r.require_token) {
            return Err(Refused("Jwt is missing".into()));
        }
        for (token, at) in &found {
            // The issuer picks the provider (unverified until the signature is checked).
            let iss = unverified_issuer(token).ok_or_else(|| {
                Refused("Jwt is not in the form of Header.Payload.Signature".into())
            })?;
            let Some(p) = providers.iter().find(|p| {
                p.issuer == iss
                    && p.tokens(headers, query)
                        .iter()
                        .any(|(t, a)| t == token && a == at)
            }) else {
                return Err(Refused(format!("Jwt issuer {iss:?} is not configured")));
            };
            let claims = verify(p, cache, token).await?;
            if let Found::Header(h) = at
                && !p.forward
                && !out.remove.contains(h)
            {
                out.remove.push(h.clone());
            }
            if let Some(h) = &p.payload_header
                && let Ok(v) = HeaderValue::from_str(
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string()),
                )
            {
                out.set.push((h.clone(), v));
            }
            for (h, claim) in &p.claim_headers {
                if let Some(v) = claim_value(&claims, claim)
                    && let Ok(v) = HeaderValue::from_str(&v)
                {
                    out.set.push((h.clone(), v));
                }
            }
            if out.verified.is_none() {
                let sub = claims.get("sub").and_then(Value::as_str).unwrap_or("");
                out.verified = Some(Verified {
                    principal: format!("{iss}/{sub}"),
                    claims,
                });
            }
        }
        Ok(out)
    }
}

/// A claim as header text: a string as is, anything else as JSON; nested with dots.
fn claim_value(claims: &Value, path: &str) -> Option<String> {
    let mut v = claims;
    for part in path.split('.') {
        v = v.get(part)?;
    }
    Some(match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })
}

/// The `iss` of a token, read without verifying (to pick the provider).
fn unverified_issuer(token: &str) -> Option<String> {
    let mut parts = token.split('.');
    let (_, payload, _) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    v.get("iss")?.as_str().map(str::to_string)
}

/// Verifies `token` with `p`'s keys; its claims.
async fn verify(p: &Provider, cache: &KeyCache, token: &str) -> Result<Value, Refused> {
    let header = jsonwebtoken::decode_header(token)
        .map_err(|e| Refused(format!("Jwt header is invalid: {e}")))?;
    if matches!(
        header.alg,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
    ) {
        return Err(Refused(
            "Jwt uses an HMAC algorithm, which is not accepted".into(),
        ));
    }
    let keys = match &p.keys {
        Keys::Inline(set) => Some(set.clone()),
        Keys::Uri(uri) => cache.keys(uri, false, p.timeout).await,
        Keys::None => None,
    };
    let keys = keys.ok_or_else(|| Refused("Jwks remote fetch is failed".into()))?;
    let keys = match (&header.kid, &p.keys) {
        // An unknown kid: the issuer may have rotated its keys.
        (Some(kid), Keys::Uri(uri)) if keys.find(kid).is_none() => {
            cache.keys(uri, true, p.timeout).await.unwrap_or(keys)
        }
        _ => keys,
    };
    let candidates: Vec<&jsonwebtoken::jwk::Jwk> = match &header.kid {
        Some(kid) => keys
            .keys
            .iter()
            .filter(|k| k.common.key_id.as_deref() == Some(kid))
            .collect(),
        None => keys.keys.iter().collect(),
    };
    if candidates.is_empty() {
        return Err(Refused(
            "Jwt verification fails: no key with its kid".into(),
        ));
    }
    let mut validation = Validation::new(header.alg);
    validation.leeway = SKEW.as_secs();
    validation.validate_nbf = true;
    validation.required_spec_claims.clear();
    validation.set_issuer(&[p.issuer.as_str()]);
    if p.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&p.audiences);
    }
    let mut last = String::from("Jwt verification fails");
    for jwk in candidates {
        // HMAC keys in a JWKS are never used (a public key set must not hold secrets).
        if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(jwk) else {
            continue;
        };
        match jsonwebtoken::decode::<Value>(token, &key, &validation) {
            Ok(data) => return Ok(data.claims),
            Err(e) => {
                use jsonwebtoken::errors::ErrorKind;
                last = match e.kind() {
                    ErrorKind::ExpiredSignature => "Jwt is expired".into(),
                    ErrorKind::ImmatureSignature => "Jwt not yet valid".into(),
                    ErrorKind::InvalidAudience => "Audiences in Jwt are not allowed".into(),
                    ErrorKind::InvalidIssuer => "Jwt issuer is not configured".into(),
                    _ => format!("Jwt verification fails: {e}"),
                };
            }
        }
    }
    Err(Refused(last))
}

/// Compiled rules by configuration generation, shared by the workers.
#[derive(Debug, Default)]
pub struct Cache {
    inner: Mutex<Option<(u64, Arc<Rules>)>>,
}

impl Cache {
    /// The rules of configuration `generation` (compiled once per generation).
    pub fn get(&self, generation: u64, compile: impl FnOnce() -> Rules) -> Arc<Rules> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        match &*g {
            Some((gen_, r)) if *gen_ == generation => r.clone(),
            _ => {
                let r = Arc::new(compile());
                *g = Some((generation, r.clone()));
                r
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    use trellis_proto::trellis::waypoint::v1::policy_target::Scope;

    const ISS: &str = "https://issuer.example.com";

    struct Key {
        pkcs8: Vec<u8>,
        jwk: Value,
    }

    fn es256(kid: &str) -> Key {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        let public = pair.public_key().as_ref();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        Key {
            pkcs8: pkcs8.as_ref().to_vec(),
            jwk: serde_json::json!({
                "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
                "x": b64(&public[1..33]), "y": b64(&public[33..65]),
            }),
        }
    }

    fn jwks(keys: &[&Key]) -> String {
        serde_json::json!({"keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>()})
            .to_string()
    }

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    fn token(key: &Key, kid: &str, claims: Value) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(kid.into());
        jsonwebtoken::encode(&h, &claims, &EncodingKey::from_ec_der(&key.pkcs8)).unwrap()
    }

    fn claims(extra: Value) -> Value {
        let mut c =
            serde_json::json!({"iss": ISS, "sub": "alice", "exp": now() + 600, "aud": "shop"});
        if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                c.insert(k.clone(), v.clone());
            }
        }
        c
    }

    fn rules(source: pb::jwt_provider::JwksSource, audiences: &[&str]) -> Rules {
        let ra = pb::RequestAuthentication {
            name: "shop/jwt".into(),
            namespace: "shop".into(),
            target: Some(pb::PolicyTarget {
                scope: Scope::Waypoint as i32,
                services: Vec::new(),
            }),
            providers: vec![pb::JwtProvider {
                issuer: ISS.into(),
                audiences: audiences.iter().map(|a| a.to_string()).collect(),
                jwks_source: Some(source),
                output_claim_to_headers: vec![pb::jwt_provider::ClaimToHeader {
                    header: "x-user".into(),
                    claim: "sub".into(),
                }],
                ..Default::default()
            }],
            require_token: false,
        };
        Rules::compile([ra].iter())
    }

    fn bearer(t: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {t}").parse().unwrap(),
        );
        h
    }

    async fn check(r: &Rules, cache: &KeyCache, t: &str) -> Result<Outcome, Refused> {
        r.authenticate(cache, None, &bearer(t), None).await
    }

    #[tokio::test]
    async fn tokens_are_verified_as_istio_says() {
        let k1 = es256("k1");
        let other = es256("k1");
        let r = rules(pb::jwt_provider::JwksSource::Jwks(jwks(&[&k1])), &["shop"]);
        let cache = KeyCache::default();
        // Valid: the principal is iss/sub, the token is not forwarded, the claim is copied.
        let ok = check(&r, &cache, &token(&k1, "k1", claims(serde_json::json!({}))))
            .await
            .unwrap();
        assert_eq!(ok.verified.unwrap().principal, format!("{ISS}/alice"));
        assert_eq!(ok.remove, vec![http::header::AUTHORIZATION]);
        assert_eq!(ok.set[0].0.as_str(), "x-user");
        // No token: unauthenticated, not refused.
        let none = r
            .authenticate(&cache, None, &HeaderMap::new(), None)
            .await
            .unwrap();
        assert!(none.verified.is_none());
        // Expired (beyond the skew), within the skew, not yet valid.
        let expired = token(&k1, "k1", claims(serde_json::json!({"exp": now() - 300})));
        assert_eq!(
            check(&r, &cache, &expired).await.unwrap_err().0,
            "Jwt is expired"
        );
        let skewed = token(&k1, "k1", claims(serde_json::json!({"exp": now() - 20})));
        assert!(check(&r, &cache, &skewed).await.is_ok());
        let early = token(&k1, "k1", claims(serde_json::json!({"nbf": now() + 600})));
        assert_eq!(
            check(&r, &cache, &early).await.unwrap_err().0,
            "Jwt not yet valid"
        );
        // Wrong issuer, wrong audience, another key's signature.
        let iss = token(
            &k1,
            "k1",
            claims(serde_json::json!({"iss": "https://evil.example"})),
        );
        assert!(
            check(&r, &cache, &iss)
                .await
                .unwrap_err()
                .0
                .contains("issuer")
        );
        let aud = token(&k1, "k1", claims(serde_json::json!({"aud": "other"})));
        assert_eq!(
            check(&r, &cache, &aud).await.unwrap_err().0,
            "Audiences in Jwt are not allowed"
        );
        let forged = token(&other, "k1", claims(serde_json::json!({})));
        assert!(check(&r, &cache, &forged).await.is_err());
        // alg none and HMAC are refused.
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let payload = b64(&claims(serde_json::json!({})).to_string());
        let none_alg = format!("{}.{payload}.", b64(r#"{"alg":"none","typ":"JWT"}"#));
        assert!(check(&r, &cache, &none_alg).await.is_err());
        let hmac = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims(serde_json::json!({})),
            &EncodingKey::from_secret(b"secret"),
        )
        .unwrap();
        assert!(
            check(&r, &cache, &hmac)
                .await
                .unwrap_err()
                .0
                .contains("HMAC")
        );
        // Garbage.
        assert!(check(&r, &cache, "not-a-token").await.is_err());
    }

    #[tokio::test]
    async fn random_bytes_as_tokens_are_refused_without_panicking() {
        // Random tokens (a seeded generator): arbitrary bytes, and three base64url parts
        // holding random JSON-ish text; each is refused (never accepted, never a panic).
        let k1 = es256("k1");
        let r = rules(pb::jwt_provider::JwksSource::Jwks(jwks(&[&k1])), &[]);
        let cache = KeyCache::default();
        let mut state: u64 = 7;
        let mut next = move || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        for i in 0..2000 {
            let len = (next() % 120) as usize;
            let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let token = match i % 3 {
                0 => String::from_utf8_lossy(&bytes).replace(['\r', '\n', '\0'], ""),
                1 => format!(
                    "{}.{}.{}",
                    b64(br#"{"alg":"ES256","kid":"k1"}"#),
                    b64(&bytes),
                    b64(&bytes[..len / 2])
                ),
                _ => {
                    let claims = format!(
                        "{{\"iss\":\"{ISS}\",\"sub\":\"{}\",\"exp\":{}}}",
                        b64(&bytes),
                        next() % 4_000_000_000
                    );
                    format!(
                        "{}.{}.{}",
                        b64(br#"{"alg":"ES256","kid":"k1"}"#),
                        b64(claims.as_bytes()),
                        b64(&bytes)
                    )
                }
            };
            let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}")) else {
                continue;
            };
            let mut h = HeaderMap::new();
            h.insert(http::header::AUTHORIZATION, value);
            match r.authenticate(&cache, None, &h, None).await {
                Err(_) => {}
                Ok(o) => assert!(o.verified.is_none(), "a random token verified: {token}"),
            }
        }
    }

    /// A JWKS server whose key set the test changes, and can stop.
    async fn jwks_server(body: Arc<Mutex<String>>) -> (String, tokio::task::JoinHandle<()>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = l.accept().await else {
                    return;
                };
                let body = body.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |_req| {
                        let b = body.lock().unwrap().clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(bytes::Bytes::from(b)),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        (format!("http://{addr}/keys"), task)
    }

    #[tokio::test]
    async fn jwks_uri_keys_are_fetched_rotated_and_kept_when_the_server_is_down() {
        let (k1, k2) = (es256("k1"), es256("k2"));
        let body = Arc::new(Mutex::new(jwks(&[&k1])));
        let (uri, server) = jwks_server(body.clone()).await;
        let r = rules(pb::jwt_provider::JwksSource::JwksUri(uri), &[]);
        let cache = KeyCache::with_refetch_every(Duration::ZERO);
        let t1 = token(&k1, "k1", claims(serde_json::json!({})));
        assert!(check(&r, &cache, &t1).await.is_ok(), "fetched on first use");
        // Rotation: a token with a kid the cache does not know makes it fetch again.
        *body.lock().unwrap() = jwks(&[&k1, &k2]);
        let t2 = token(&k2, "k2", claims(serde_json::json!({})));
        assert!(
            check(&r, &cache, &t2).await.is_ok(),
            "the new key was fetched"
        );
        // The server goes away: the last good keys stay in use.
        server.abort();
        let _ = server.await;
        let t3 = token(&es256("k3"), "k3", claims(serde_json::json!({})));
        assert!(
            check(&r, &cache, &t3).await.is_err(),
            "an unknown key stays unknown"
        );
        assert!(check(&r, &cache, &t1).await.is_ok(), "last good keys kept");
        // At a bounded rate: with a long interval an unknown kid does not refetch.
        let slow = KeyCache::with_refetch_every(Duration::from_secs(3600));
        let body2 = Arc::new(Mutex::new(jwks(&[&k1])));
        let (uri2, _server2) = jwks_server(body2.clone()).await;
        let r2 = rules(pb::jwt_provider::JwksSource::JwksUri(uri2), &[]);
        assert!(check(&r2, &slow, &t1).await.is_ok());
        *body2.lock().unwrap() = jwks(&[&k1, &k2]);
        assert!(check(&r2, &slow, &t2).await.is_err(), "refetched too soon");
    }
}
