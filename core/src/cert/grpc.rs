//! The CA client over gRPC: `IstioCertificateService/CreateCertificate` on TLS, with the
//! proxy's credential as a bearer token and the identity it acts for in Istio's
//! `ImpersonatedIdentity` request metadata.

use std::time::Duration;

use tonic::transport::Channel;
use trellis_proto::istio::v1::auth::IstioCertificateRequest;
use trellis_proto::istio::v1::auth::istio_certificate_service_client::IstioCertificateServiceClient;

use super::{CaClient, CertError};
use crate::identity::SpiffeId;

/// Where the CA is and how to reach it.
#[derive(Clone)]
pub struct GrpcCaConfig {
    /// `https://host:port` of the CA.
    pub endpoint: String,
    /// The root(s) that sign the CA's serving certificate (the mesh's trust bundle), read
    /// again for each new connection.
    pub roots: crate::channel::ControlPlaneRoots,
    /// The name the CA's serving certificate carries (DNS name or IP).
    pub server_name: String,
    /// This proxy's credential (local mode: the node credential issued when it joined;
    /// Kubernetes: its projected token file, read again for each request).
    pub credential: crate::credential::Credential,
    /// Deadline of connection establishment.
    pub connect_timeout: Duration,
    /// Deadline of one request.
    pub request_timeout: Duration,
}

impl std::fmt::Debug for GrpcCaConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The credential is a secret.
        f.debug_struct("GrpcCaConfig")
            .field("endpoint", &self.endpoint)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// A [`CaClient`] talking to the control plane's CA.
#[derive(Clone, Debug)]
pub struct GrpcCaClient {
    client: IstioCertificateServiceClient<Channel>,
    endpoint: String,
    credential: crate::credential::Credential,
}

impl GrpcCaClient {
    /// A client; the connection is made on first use and re-made after failures.
    pub fn new(config: &GrpcCaConfig) -> Result<GrpcCaClient, CertError> {
        let unreachable = |reason: String| CertError::Unreachable {
            endpoint: config.endpoint.clone(),
            reason,
        };
        // Only https: the credential and certificates never travel unencrypted.
        let channel = crate::channel::control_plane_channel(&crate::channel::ControlPlaneTarget {
            endpoint: config.endpoint.clone(),
            server_name: config.server_name.clone(),
            roots: config.roots.clone(),
            connect_timeout: config.connect_timeout,
            request_timeout: Some(config.request_timeout),
        })
        .map_err(unreachable)?;
        // A credential that cannot be used is an error now, not at the first renewal.
        config.credential.header().map_err(CertError::Local)?;
        Ok(GrpcCaClient {
            client: IstioCertificateServiceClient::new(channel),
            endpoint: config.endpoint.clone(),
            credential: config.credential.clone(),
        })
    }
}

impl CaClient for GrpcCaClient {
    async fn sign(
        &self,
        identity: &SpiffeId,
        csr_pem: String,
        ttl: Duration,
    ) -> Result<Vec<String>, CertError> {
        let metadata = prost_types::Struct {
            fields: [(
                "ImpersonatedIdentity".to_string(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(identity.to_string())),
                },
            )]
            .into(),
        };
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr: csr_pem,
            validity_duration: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(metadata),
        });
        let authorization = self.credential.header().map_err(CertError::Local)?;
        req.metadata_mut().insert("authorization", authorization);
        match self.client.clone().create_certificate(req).await {
            Ok(resp) => Ok(resp.into_inner().cert_chain),
            Err(status) => match status.code() {
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown => {
                    Err(CertError::Unreachable {
                        endpoint: self.endpoint.clone(),
                        reason: status.message().to_string(),
                    })
                }
                _ => Err(CertError::Refused {
                    identity: identity.to_string(),
                    reason: format!("{:?}: {}", status.code(), status.message()),
                }),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_without_tls_is_refused() {
        let config = GrpcCaConfig {
            endpoint: "http://10.96.0.1:15012".into(),
            roots: crate::channel::ControlPlaneRoots::Pem(String::new()),
            server_name: "ca".into(),
            credential: "secret".into(),
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(1),
        };
        let err = GrpcCaClient::new(&config).unwrap_err().to_string();
        assert!(err.contains("must be https://"), "{err}");
    }
}
