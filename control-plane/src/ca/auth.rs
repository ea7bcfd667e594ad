//! Who is asking for a certificate, and for which identities it may ask.
//!
//! Istio's model: a node's ztunnel asks on behalf of the pods scheduled on its node
//! (impersonation); a waypoint asks only for its own identity. Nobody is anonymous.
//! The local-mode authenticator checks a per-node (or per-waypoint) bearer credential
//! issued when the node joins; on Kubernetes, [`super::token_review`] verifies the caller's
//! projected ServiceAccount token with the API server.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use ring::rand::SecureRandom;
use tonic::metadata::MetadataMap;
use trellis_core::SpiffeId;

use super::CaError;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The ztunnel of a node.
    Node(String),
    /// A waypoint, which runs as one identity.
    Waypoint(SpiffeId),
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Node(n) => write!(f, "ztunnel of node {n}"),
            Caller::Waypoint(id) => write!(f, "waypoint {id}"),
        }
    }
}

/// Establishes who is calling from the request's metadata (asynchronously: on Kubernetes
/// it asks the API server).
#[tonic::async_trait]
pub trait Authenticator: Send + Sync {
    /// The caller, or [`CaError::Unauthenticated`].
    async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, CaError>;
}

/// The token of an `authorization: Bearer <token>` header.
pub fn bearer_token(metadata: &MetadataMap) -> Result<&str, CaError> {
    let value = metadata
        .get("authorization")
        .ok_or_else(|| CaError::Unauthenticated("no authorization header".into()))?
        .to_str()
        .map_err(|_| CaError::Unauthenticated("authorization header is not text".into()))?;
    let token = value.strip_prefix("Bearer ").ok_or_else(|| {
        CaError::Unauthenticated("authorization is not a Bearer credential".into())
    })?;
    Ok(token.trim())
}

/// Which identities run on which node: the pods scheduled there. The control plane's model
/// keeps it current; the CA only asks.
pub trait Placement: Send + Sync {
    /// Whether a pod with identity `id` is scheduled on `node`.
    fn runs_on(&self, node: &str, id: &SpiffeId) -> bool;
}

/// Decides whether `caller` may obtain a certificate for `identity`.
pub fn authorize(
    caller: &Caller,
    identity: &SpiffeId,
    placement: &dyn Placement,
) -> Result<(), CaError> {
    let deny = |reason: &str| CaError::PermissionDenied {
        caller: caller.to_string(),
        identity: identity.to_string(),
        reason: reason.to_string(),
    };
    match caller {
        Caller::Node(node) if placement.runs_on(node, identity) => Ok(()),
        Caller::Node(_) => Err(deny("no pod with this identity is scheduled on that node")),
        Caller::Waypoint(own) if own == identity => Ok(()),
        Caller::Waypoint(_) => Err(deny("a waypoint obtains only its own identity")),
    }
}

/// In-memory placement, fed by the configuration model.
#[derive(Debug, Default)]
pub struct NodeWorkloads {
    by_node: RwLock<BTreeMap<String, BTreeSet<SpiffeId>>>,
}

impl NodeWorkloads {
    /// Sets the identities of the pods on `node` (replacing what was known).
    pub fn set(&self, node: &str, ids: impl IntoIterator<Item = SpiffeId>) {
        let mut map = self.by_node.write().unwrap_or_else(|e| e.into_inner());
        map.insert(node.to_string(), ids.into_iter().collect());
    }

    /// Replaces everything known: nodes absent from `all` have no pods.
    pub fn replace_all(&self, all: BTreeMap<String, BTreeSet<SpiffeId>>) {
        *self.by_node.write().unwrap_or_else(|e| e.into_inner()) = all;
    }
}

impl Placement for NodeWorkloads {
    fn runs_on(&self, node: &str, id: &SpiffeId) -> bool {
        self.by_node
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(node)
            .is_some_and(|ids| ids.contains(id))
    }
}

/// Local-mode credentials: a random bearer token per node or waypoint, issued when it joins.
/// Only SHA-256 digests are kept (and persisted), so the store never holds a usable token.
#[derive(Debug)]
pub struct LocalCredentials {
    dir: PathBuf,
    digests: RwLock<BTreeMap<[u8; 32], Caller>>,
    /// The directory's modification time when it was last read: credentials issued by
    /// another process (`trellis-control-plane credential ...`) are picked up on the next
    /// unknown token once it changed.
    read_at: std::sync::Mutex<Option<std::time::SystemTime>>,
    rng: ring::rand::SystemRandom,
}

const TOKEN_BYTES: usize = 32;

impl LocalCredentials {
    /// Credentials persisted in `dir` (created if missing); loads those already issued.
    pub fn open(dir: impl Into<PathBuf>) -> Result<LocalCredentials, CaError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir)
            .map_err(|e| CaError::Store(format!("cannot create {}: {e}", dir.display())))?;
        let read_at = dir_mtime(&dir);
        let digests = read_all(&dir)?;
        Ok(LocalCredentials {
            dir,
            digests: RwLock::new(digests),
            read_at: std::sync::Mutex::new(read_at),
            rng: ring::rand::SystemRandom::new(),
        })
    }

    /// Re-reads the directory if it changed since it was last read; a file that cannot be
    /// read is reported and the credentials held stay as they were.
    fn refresh(&self) {
        let now = dir_mtime(&self.dir);
        let mut read_at = self.read_at.lock().unwrap_or_else(|e| e.into_inner());
        if now.is_none() || now == *read_at {
            return;
        }
        match read_all(&self.dir) {
            Ok(digests) => {
                *self.digests.write().unwrap_or_else(|e| e.into_inner()) = digests;
                *read_at = now;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot re-read the credentials; keeping those held")
            }
        }
    }

    /// Issues a credential for the ztunnel of `node` (replacing an earlier one).
    pub fn issue_node(&self, node: &str) -> Result<String, CaError> {
        if node.is_empty()
            || !node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b))
        {
            return Err(CaError::Store(format!("invalid node name {node:?}")));
        }
        // '_' never occurs in Kubernetes names, so file names cannot collide.
        self.issue(&format!("node_{node}"), Caller::Node(node.to_string()))
    }

    /// Issues a credential for the waypoint running as `id`.
    pub fn issue_waypoint(&self, id: &SpiffeId) -> Result<String, CaError> {
        let file = format!("waypoint_{}_{}", id.namespace(), id.service_account());
        self.issue(&file, Caller::Waypoint(id.clone()))
    }

    fn issue(&self, file: &str, caller: Caller) -> Result<String, CaError> {
        let mut raw = [0u8; TOKEN_BYTES];
        self.rng
            .fill(&mut raw)
            .map_err(|_| CaError::Store("no randomness for a credential".into()))?;
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let digest = sha256(token.as_bytes());
        let who = match &caller {
            Caller::Node(n) => format!("node {n}"),
            Caller::Waypoint(id) => format!("waypoint {id}"),
        };
        let path = self.dir.join(format!("{file}.sha256"));
        let tmp = self.dir.join(format!(".{file}.sha256.tmp"));
        let text = format!("{} {who}\n", hex(&digest));
        // Written aside and renamed: a crash leaves the old credential or the new, never a
        // truncated file that would stop the CA from starting.
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| CaError::Store(format!("cannot write {}: {e}", path.display())))?;
        let mut map = self.digests.write().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, c| *c != caller);
        map.insert(digest, caller);
        Ok(token)
    }
}

#[tonic::async_trait]
impl Authenticator for LocalCredentials {
    async fn authenticate(&self, metadata: &MetadataMap) -> Result<Caller, CaError> {
        self.check(metadata)
    }
}

impl LocalCredentials {
    /// The caller whose credential `metadata` carries.
    pub fn check(&self, metadata: &MetadataMap) -> Result<Caller, CaError> {
        let token = bearer_token(metadata)?;
        // Looking up the digest of the presented token compares digests, not tokens: timing
        // reveals nothing about a valid token.
        let digest = sha256(token.as_bytes());
        let lookup = || {
            self.digests
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&digest)
                .cloned()
        };
        lookup()
            .or_else(|| {
                self.refresh();
                lookup()
            })
            .ok_or_else(|| CaError::Unauthenticated("unknown credential".into()))
    }
}

fn dir_mtime(dir: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(dir).and_then(|m| m.modified()).ok()
}

fn read_all(dir: &Path) -> Result<BTreeMap<[u8; 32], Caller>, CaError> {
    let mut digests = BTreeMap::new();
    let entries = std::fs::read_dir(dir)
        .map_err(|e| CaError::Store(format!("cannot read {}: {e}", dir.display())))?;
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|x| x != "sha256") {
            continue;
        }
        let (digest, caller) = read_credential(&path)?;
        digests.insert(digest, caller);
    }
    Ok(digests)
}

fn sha256(data: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_credential(path: &Path) -> Result<([u8; 32], Caller), CaError> {
    let bad = |reason: &str| CaError::Store(format!("{}: {reason}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| bad(&e.to_string()))?;
    let mut parts = text.split_whitespace();
    let (Some(digest), Some(kind), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad("expected `<sha256 hex> node|waypoint <name>`"));
    };
    if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad("digest is not 64 hex digits"));
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&digest[2 * i..2 * i + 2], 16)
            .map_err(|_| bad("digest is not hex"))?;
    }
    let caller = match kind {
        "node" => Caller::Node(name.to_string()),
        "waypoint" => Caller::Waypoint(
            name.parse()
                .map_err(|e: trellis_core::identity::IdentityError| bad(&e.to_string()))?,
        ),
        _ => return Err(bad("kind must be node or waypoint")),
    };
    Ok((out, caller))
}
