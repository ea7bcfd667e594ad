//! `istio.v1.auth.IstioCertificateService/CreateCertificate` over gRPC on TLS.
//!
//! Every request ends in one audit line (target `trellis::ca::audit`): who asked, for which
//! identity, and the result.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    CertificateParams, ExtendedKeyUsagePurpose, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
    SanType,
};
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};
use trellis_proto::istio::v1::auth::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use trellis_proto::istio::v1::auth::{IstioCertificateRequest, IstioCertificateResponse};

use super::auth::{Authenticator, Caller, Placement, authorize};
use super::{CaError, CertificateAuthority};

/// Metadata key with which a node proxy names the identity it requests a certificate for
/// (Istio's impersonation field).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// The CA's gRPC service.
pub struct CaService {
    ca: Arc<CertificateAuthority>,
    auth: Arc<dyn Authenticator>,
    placement: Arc<dyn Placement>,
}

impl CaService {
    /// A service issuing from `ca` to callers `auth` recognises, within `placement`.
    pub fn new(
        ca: Arc<CertificateAuthority>,
        auth: Arc<dyn Authenticator>,
        placement: Arc<dyn Placement>,
    ) -> CaService {
        CaService {
            ca,
            auth,
            placement,
        }
    }

    fn handle(
        &self,
        caller: &Caller,
        req: &IstioCertificateRequest,
    ) -> Result<IstioCertificateResponse, (Option<String>, CaError)> {
        let csr = self.ca.validate_csr(&req.csr).map_err(|e| (None, e))?;
        let identity = csr.identity.to_string();
        let impersonated = req
            .metadata
            .as_ref()
            .and_then(|m| m.fields.get(IMPERSONATED_IDENTITY));
        if let Some(value) = impersonated {
            let named = match &value.kind {
                Some(prost_types::value::Kind::StringValue(s)) => s.as_str(),
                _ => "",
            };
            if named != identity {
                let e = CaError::InvalidCsr(format!(
                    "{IMPERSONATED_IDENTITY} {named:?} differs from the CSR's identity {identity}"
                ));
                return Err((Some(identity), e));
            }
        }
        authorize(caller, &csr.identity, self.placement.as_ref())
            .map_err(|e| (Some(identity.clone()), e))?;
        let requested = u64::try_from(req.validity_duration)
            .ok()
            .filter(|s| *s > 0)
            .map(Duration::from_secs);
        let issued = self
            .ca
            .issue(&csr, requested)
            .map_err(|e| (Some(identity.clone()), e))?;
        tracing::info!(
            target: "trellis::ca::audit",
            caller = %caller, identity = %identity, result = "issued",
            serial = %issued.serial,
            "issued certificate"
        );
        Ok(IstioCertificateResponse {
            cert_chain: issued.chain,
        })
    }
}

fn status(e: &CaError) -> Status {
    match e {
        CaError::InvalidCsr(_) => Status::invalid_argument(e.to_string()),
        CaError::Unauthenticated(_) => Status::unauthenticated(e.to_string()),
        CaError::PermissionDenied { .. } => Status::permission_denied(e.to_string()),
        CaError::Store(_) | CaError::Signing(_) => {
            Status::internal(format!("the CA could not sign: {e}"))
        }
    }
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let caller = match self.auth.authenticate(request.metadata()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(
                    target: "trellis::ca::audit",
                    caller = "unauthenticated", result = "denied", reason = %e,
                    "certificate request refused"
                );
                return Err(status(&e));
            }
        };
        match self.handle(&caller, request.get_ref()) {
            Ok(resp) => Ok(Response::new(resp)),
            Err((identity, e)) => {
                tracing::warn!(
                    target: "trellis::ca::audit",
                    caller = %caller, identity = identity.as_deref().unwrap_or("-"),
                    result = "denied", reason = %e,
                    "certificate request refused"
                );
                Err(status(&e))
            }
        }
    }
}

/// A serving certificate for the CA endpoint itself (PEM chain, PEM key), for the DNS names
/// and IP addresses clients dial. Clients verify it with the trust bundle.
pub fn serving_certificate(
    ca: &CertificateAuthority,
    names: &[&str],
    validity: Duration,
) -> Result<(String, String), CaError> {
    let sign = |e: rcgen::Error| CaError::Signing(e.to_string());
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(sign)?;
    let mut params = CertificateParams::default();
    params.subject_alt_names = names
        .iter()
        .map(|n| match n.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => n.to_string().try_into().map(SanType::DnsName),
        })
        .collect::<Result<_, _>>()
        .map_err(sign)?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - ca.config().clock_skew;
    params.not_after = now + validity;
    let cert = params.signed_by(&key, ca.root().issuer()).map_err(sign)?;
    let mut chain = cert.pem();
    for c in ca.root().chain_pem() {
        chain.push_str(c);
    }
    Ok((chain, key.serialize_pem()))
}

/// Serves the CA on `listener` with TLS (`cert_pem`, `key_pem`) until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    service: CaService,
    cert_pem: &str,
    key_pem: &str,
    shutdown: impl Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let identity = tonic::transport::Identity::from_pem(cert_pem, key_pem);
    // Bounded everywhere (DESIGN §5): a slow or silent client cannot hold a handshake, a
    // request or a connection's streams for long.
    let tls = tonic::transport::ServerTlsConfig::new()
        .identity(identity)
        .timeout(Duration::from_secs(10));
    tonic::transport::Server::builder()
        .tls_config(tls)?
        .timeout(Duration::from_secs(30))
        .max_concurrent_streams(64)
        .concurrency_limit_per_connection(32)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .tcp_keepalive(Some(Duration::from_secs(60)))
        .add_service(IstioCertificateServiceServer::new(service))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await
}
