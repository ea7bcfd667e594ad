//! The certificate verifiers of HBONE: WebPKI chain validation against the current trust
//! bundle, then the SPIFFE checks (one URI SAN, our trust domain, the expected identity).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use super::{TlsError, TrustBundle, provider};
use crate::identity::SpiffeId;

/// The SPIFFE ID of a certificate: its one and only URI SAN.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, TlsError> {
    let (_, x509) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let mut uris = Vec::new();
    for ext in x509.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    uris.push(*uri);
                }
            }
        }
    }
    match uris.as_slice() {
        [] => Err(TlsError::NoUriSan),
        [one] => Ok(one.parse()?),
        many => Err(TlsError::SeveralUriSans(many.len())),
    }
}

/// The validity window (not before, not after) of a certificate.
pub fn validity_of(cert: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), TlsError> {
    let (_, x509) = X509Certificate::from_der(cert.as_ref())
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    let to_system = |t: x509_parser::time::ASN1Time| {
        let secs = t.timestamp();
        if secs >= 0 {
            UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
        } else {
            UNIX_EPOCH
        }
    };
    Ok((
        to_system(x509.validity().not_before),
        to_system(x509.validity().not_after),
    ))
}

/// Our own reasons travel inside rustls's error so both the log line and the test see them.
fn reject(e: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

/// The peer's SPIFFE ID, once its chain has been verified: exactly one URI SAN, of the
/// bundle's trust domain. Both directions of HBONE check the same.
fn peer_id(
    end_entity: &CertificateDer<'_>,
    bundle: &TrustBundle,
) -> Result<SpiffeId, rustls::Error> {
    let id = spiffe_id_of(end_entity).map_err(reject)?;
    if id.trust_domain() != bundle.trust_domain() {
        return Err(reject(TlsError::WrongTrustDomain {
            got: Box::new(id),
            want: bundle.trust_domain().to_string(),
        }));
    }
    Ok(id)
}

fn algorithms() -> WebPkiSupportedAlgorithms {
    provider().signature_verification_algorithms
}

/// Server side: the client must present a certificate chaining to the bundle, with one
/// SPIFFE ID of the bundle's trust domain.
#[derive(Debug)]
pub(crate) struct SpiffeClientVerifier {
    bundle: Arc<TrustBundle>,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeClientVerifier {
    pub(crate) fn new(bundle: Arc<TrustBundle>) -> SpiffeClientVerifier {
        SpiffeClientVerifier {
            bundle,
            algs: algorithms(),
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: every workload has exactly one certificate to offer.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let roots = self.bundle.current();
        roots
            .client_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        peer_id(end_entity, &self.bundle)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Unreachable with our TLS 1.3-only configurations; verified properly regardless.
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Client side: the server's chain must lead to the bundle and its SPIFFE ID must be the
/// expected one. The TLS server name is ignored: HBONE names peers by identity, not DNS.
#[derive(Debug)]
pub(crate) struct SpiffeServerVerifier {
    bundle: Arc<TrustBundle>,
    expected: SpiffeId,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    pub(crate) fn new(bundle: Arc<TrustBundle>, expected: SpiffeId) -> SpiffeServerVerifier {
        SpiffeServerVerifier {
            bundle,
            expected,
            algs: algorithms(),
        }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let roots = self.bundle.current();
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots.store,
            intermediates,
            now,
            self.algs.all,
        )?;
        let id = peer_id(end_entity, &self.bundle)?;
        if id != self.expected {
            return Err(reject(TlsError::IdentityMismatch {
                got: Box::new(id),
                want: Box::new(self.expected.clone()),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}
