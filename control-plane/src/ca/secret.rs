//! The root of trust on Kubernetes: kept in a Secret of the control plane's namespace, so
//! every replica signs with the same CA and a restart keeps it.
//!
//! - `cacerts` (Istio's name, the same four keys as the directory layout): an
//!   organisation's own intermediate, plugged in by the operator. Used as is, never
//!   written.
//! - else `trellis-ca`: a self-signed root the control plane generated on first start.
//!   Replicas starting together race to create it; the API server lets one create win (409
//!   for the others), and the losers load the winner's.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Api;
use kube::api::PostParams;

use super::CaError;
use super::store::{CaFiles, RootOfTrust, generate_root};

/// The Secret an operator plugs an intermediate in with.
pub const PLUGGED: &str = "cacerts";
/// The Secret holding the root the control plane generated.
pub const GENERATED: &str = "trellis-ca";

const KEYS: [&str; 4] = [
    "ca-cert.pem",
    "ca-key.pem",
    "root-cert.pem",
    "cert-chain.pem",
];

/// Where the root of trust came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The operator's `cacerts`.
    Plugged,
    /// `trellis-ca`, generated earlier (by this or another replica).
    Stored,
    /// `trellis-ca`, generated now by this replica.
    Generated,
}

/// The four files held by `secret` (named `name` in errors).
pub fn files_from_secret(name: &str, secret: &Secret) -> Result<CaFiles, CaError> {
    let data = secret.data.clone().unwrap_or_default();
    let get = |key: &str| -> Result<Option<String>, CaError> {
        match data.get(key) {
            None => Ok(None),
            Some(b) => String::from_utf8(b.0.clone())
                .map(Some)
                .map_err(|_| CaError::Store(format!("Secret {name}: {key} is not PEM text"))),
        }
    };
    let missing = |key: &str| {
        CaError::Store(format!(
            "Secret {name} has no {key}: ca-cert.pem, ca-key.pem and root-cert.pem are all needed"
        ))
    };
    let ca_cert = get(KEYS[0])?.ok_or_else(|| missing(KEYS[0]))?;
    let ca_key = get(KEYS[1])?.ok_or_else(|| missing(KEYS[1]))?;
    let root_cert = get(KEYS[2])?.ok_or_else(|| missing(KEYS[2]))?;
    let cert_chain = get(KEYS[3])?.unwrap_or_else(|| ca_cert.clone());
    Ok(CaFiles {
        ca_cert,
        ca_key,
        root_cert,
        cert_chain,
    })
}

/// The Secret `name` in `namespace` holding `files`.
pub fn secret_from_files(namespace: &str, name: &str, files: &CaFiles) -> Secret {
    let data: BTreeMap<String, ByteString> = KEYS
        .iter()
        .zip([
            &files.ca_cert,
            &files.ca_key,
            &files.root_cert,
            &files.cert_chain,
        ])
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect();
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/part-of".to_string(),
                "trellis".to_string(),
            )])),
            ..ObjectMeta::default()
        },
        data: Some(data),
        type_: Some("Opaque".into()),
        ..Secret::default()
    }
}

/// The CA's files as the Secrets of `client`'s default namespace hold them now: the
/// operator's `cacerts` if present, else `trellis-ca`; `None` when neither exists. Re-read
/// to follow a root rotation.
pub async fn current_files(client: &kube::Client) -> Result<Option<CaFiles>, CaError> {
    let namespace = client.default_namespace().to_string();
    let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    for name in [PLUGGED, GENERATED] {
        let found = api
            .get_opt(name)
            .await
            .map_err(|e| CaError::Store(format!("cannot read Secret {namespace}/{name}: {e}")))?;
        if let Some(s) = found {
            return files_from_secret(&format!("{namespace}/{name}"), &s).map(Some);
        }
    }
    Ok(None)
}

/// Loads the root of trust from the Secrets of `client`'s default namespace, generating
/// and storing a self-signed root for `trust_domain` when there is none.
pub async fn load_or_generate(
    client: &kube::Client,
    trust_domain: &str,
) -> Result<(RootOfTrust, Origin), CaError> {
    let namespace = client.default_namespace().to_string();
    let api: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let read = |name: &'static str| {
        let api = api.clone();
        let namespace = namespace.clone();
        async move {
            api.get_opt(name)
                .await
                .map_err(|e| CaError::Store(format!("cannot read Secret {namespace}/{name}: {e}")))
        }
    };
    if let Some(s) = read(PLUGGED).await? {
        let files = files_from_secret(&format!("{namespace}/{PLUGGED}"), &s)?;
        return Ok((RootOfTrust::from_files(&files)?, Origin::Plugged));
    }
    if let Some(s) = read(GENERATED).await? {
        let files = files_from_secret(&format!("{namespace}/{GENERATED}"), &s)?;
        return Ok((RootOfTrust::from_files(&files)?, Origin::Stored));
    }
    let files = generate_root(trust_domain)?;
    let secret = secret_from_files(&namespace, GENERATED, &files);
    match api.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok((RootOfTrust::from_files(&files)?, Origin::Generated)),
        // Another replica created it first: use that one.
        Err(kube::Error::Api(s)) if s.code == 409 => {
            let s = read(GENERATED).await?.ok_or_else(|| {
                CaError::Store(format!(
                    "Secret {namespace}/{GENERATED} was created by another replica and then vanished"
                ))
            })?;
            let files = files_from_secret(&format!("{namespace}/{GENERATED}"), &s)?;
            Ok((RootOfTrust::from_files(&files)?, Origin::Stored))
        }
        Err(e) => Err(CaError::Store(format!(
            "cannot create Secret {namespace}/{GENERATED}: {e}"
        ))),
    }
}
