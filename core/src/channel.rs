//! The gRPC channel to the control plane (xDS and the CA), over TLS verified against roots
//! that are read again for every new connection.
//!
//! tonic's own TLS takes the roots once, when the channel is built: after a root rotation
//! (docs/identity.md) the control plane restarts with a serving certificate under the new
//! root and a proxy built before the rotation could never reconnect. Here the channel dials
//! through [`Connector`], which takes the roots from a [`ControlPlaneRoots`] at each
//! connection: a file read then, or the trust bundle the proxy already keeps current.
//! Unreadable or unusable roots fail that connection (the channel retries later); nothing
//! falls back to an unverified or plaintext connection.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tonic::transport::{Channel, Endpoint};

use crate::tls::{ALPN_H2, TrustBundle, parse_pem_certs, provider};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where the roots that verify the control plane's serving certificate come from.
#[derive(Clone)]
pub enum ControlPlaneRoots {
    /// A PEM file, read at each new connection (a rotation written to it reaches the next
    /// reconnect).
    File(PathBuf),
    /// The mesh trust bundle the proxy keeps current (ztunnel reloads it from its file).
    Bundle(Arc<TrustBundle>),
    /// Fixed roots in PEM (tests; callers that hold no file).
    Pem(String),
}

impl std::fmt::Debug for ControlPlaneRoots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ControlPlaneRoots::File(p) => write!(f, "File({})", p.display()),
            ControlPlaneRoots::Bundle(b) => write!(f, "Bundle({})", b.trust_domain()),
            ControlPlaneRoots::Pem(_) => write!(f, "Pem(..)"),
        }
    }
}

impl ControlPlaneRoots {
    /// The roots as of now; an error names the file and why.
    pub fn load(&self) -> Result<Vec<CertificateDer<'static>>, String> {
        let roots = match self {
            ControlPlaneRoots::File(path) => {
                let pem = std::fs::read_to_string(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?;
                parse_pem_certs(&pem, "control-plane roots")
                    .map_err(|e| format!("{}: {e}", path.display()))?
            }
            ControlPlaneRoots::Bundle(bundle) => bundle.roots(),
            ControlPlaneRoots::Pem(pem) => {
                parse_pem_certs(pem, "control-plane roots").map_err(|e| e.to_string())?
            }
        };
        if roots.is_empty() {
            return Err("no root certificate to verify the control plane with".into());
        }
        Ok(roots)
    }

    /// A TLS client configuration verifying against the roots as of now: TLS 1.3, ALPN h2.
    fn client_config(&self) -> Result<rustls::ClientConfig, String> {
        let mut store = rustls::RootCertStore::empty();
        for root in self.load()? {
            store
                .add(root)
                .map_err(|e| format!("a control-plane root is unusable: {e}"))?;
        }
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(store)
            .with_no_client_auth();
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(config)
    }
}

/// How to reach the control plane.
#[derive(Clone, Debug)]
pub struct ControlPlaneTarget {
    /// `https://host:port`.
    pub endpoint: String,
    /// The name its serving certificate must carry (DNS name or IP).
    pub server_name: String,
    /// The roots that verify it.
    pub roots: ControlPlaneRoots,
    /// Deadline of connection establishment (TCP and TLS).
    pub connect_timeout: Duration,
    /// Deadline of one request (none for long-lived streams such as xDS).
    pub request_timeout: Option<Duration>,
}

/// A lazily connecting channel to the control plane; it reconnects on its own after
/// failures, verifying each new connection against the roots of that moment.
pub fn control_plane_channel(target: &ControlPlaneTarget) -> Result<Channel, String> {
    // tonic refuses an https URI without its own TLS; the channel is given the http form
    // and the connector below does TLS itself. Anything but https is refused: credentials
    // and policy never travel unencrypted.
    let Some(rest) = target.endpoint.strip_prefix("https://") else {
        return Err(format!(
            "{}: the control plane address must be https://: credentials and policy never travel unencrypted",
            target.endpoint
        ));
    };
    let server_name = ServerName::try_from(target.server_name.clone())
        .map_err(|e| format!("{}: invalid server name: {e}", target.server_name))?;
    // Roots that cannot be used are an error now, not at the first reconnect.
    target.roots.client_config()?;
    let mut endpoint = Endpoint::from_shared(format!("http://{rest}"))
        .map_err(|e| format!("{}: invalid address: {e}", target.endpoint))?
        .connect_timeout(target.connect_timeout)
        // A control plane that vanished without a reset is noticed (the xDS stream is
        // long-lived and mostly idle): HTTP/2 pings, a dead connection is re-made.
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if let Some(t) = target.request_timeout {
        endpoint = endpoint.timeout(t);
    }
    Ok(endpoint.connect_with_connector_lazy(Connector {
        roots: target.roots.clone(),
        server_name,
    }))
}

/// Dials TCP, then TLS verified against the roots of the moment.
#[derive(Clone)]
pub struct Connector {
    roots: ControlPlaneRoots,
    server_name: ServerName<'static>,
}

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let (roots, server_name) = (self.roots.clone(), self.server_name.clone());
        Box::pin(async move {
            let host = uri.host().ok_or("the control plane address has no host")?;
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = uri.port_u16().unwrap_or(443);
            let config = roots.client_config().map_err(|e| {
                tracing::warn!(error = %e, "cannot verify the control plane: not connecting");
                e
            })?;
            let tcp = TcpStream::connect((host, port)).await?;
            tcp.set_nodelay(true)?;
            let tls = TlsConnector::from(Arc::new(config))
                .connect(server_name, tcp)
                .await?;
            Ok(TokioIo::new(tls))
        })
    }
}

/// What a proxy (ztunnel, a waypoint) says to the control plane as.
#[derive(Debug, Clone)]
pub struct ProxyClient {
    /// `https://host:port` of the control plane (xDS and CA).
    pub endpoint: String,
    /// The name in its serving certificate.
    pub server_name: String,
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// The trust bundle as read at start (kept current by [`crate::tls::follow_roots_file`]).
    pub roots_pem: String,
    /// The proxy's credential for xDS and the CA.
    pub credential: crate::credential::Credential,
    /// Its xDS node id.
    pub node_id: String,
    /// The xDS types it reads.
    pub types: Vec<String>,
    /// Lifetime asked of the CA for its certificates.
    pub cert_ttl: Duration,
}

/// A proxy's connections to the control plane: the trust bundle (which also verifies the
/// control plane), the xDS client and the certificate manager. Both channels connect
/// lazily and retry on their own.
pub struct ProxyConnections {
    /// The roots peers and the control plane are verified with.
    pub bundle: Arc<TrustBundle>,
    /// The xDS client.
    pub xds: crate::xds::XdsClient,
    /// Certificates from the CA.
    pub certs: crate::cert::CertManager<crate::cert::GrpcCaClient>,
}

/// Connects a proxy to the control plane (see [`ProxyConnections`]).
pub fn connect_proxy(c: &ProxyClient) -> Result<ProxyConnections, String> {
    let bundle =
        Arc::new(TrustBundle::from_pem(&c.trust_domain, &c.roots_pem).map_err(|e| e.to_string())?);
    // Verified against the bundle as it is at each connection: after a root rotation the
    // control plane's new serving certificate is accepted once the bundle has its root.
    let channel = control_plane_channel(&ControlPlaneTarget {
        endpoint: c.endpoint.clone(),
        server_name: c.server_name.clone(),
        roots: ControlPlaneRoots::Bundle(bundle.clone()),
        connect_timeout: Duration::from_secs(5),
        request_timeout: None,
    })?;
    let xds = crate::xds::XdsClient::start(
        channel,
        crate::xds::XdsConfig {
            node_id: c.node_id.clone(),
            types: c.types.clone(),
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(10),
            credential: Some(c.credential.clone()),
        },
    );
    let ca = crate::cert::GrpcCaClient::new(&crate::cert::GrpcCaConfig {
        endpoint: c.endpoint.clone(),
        roots: ControlPlaneRoots::Bundle(bundle.clone()),
        server_name: c.server_name.clone(),
        credential: c.credential.clone(),
        connect_timeout: Duration::from_secs(5),
        request_timeout: Duration::from_secs(10),
    })
    .map_err(|e| e.to_string())?;
    let certs = crate::cert::CertManager::new(
        ca,
        bundle.clone(),
        crate::cert::CertConfig {
            ttl: c.cert_ttl,
            ..crate::cert::CertConfig::default()
        },
    );
    Ok(ProxyConnections { bundle, xds, certs })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_is_accepted() {
        let target = ControlPlaneTarget {
            endpoint: "http://127.0.0.1:15012".into(),
            server_name: "localhost".into(),
            roots: ControlPlaneRoots::Pem(String::new()),
            connect_timeout: Duration::from_secs(1),
            request_timeout: None,
        };
        let err = control_plane_channel(&target).unwrap_err();
        assert!(err.contains("must be https://"), "{err}");
    }

    #[test]
    fn missing_roots_name_the_file() {
        let roots = ControlPlaneRoots::File("/nonexistent/roots.pem".into());
        let err = roots.load().unwrap_err();
        assert!(err.contains("/nonexistent/roots.pem"), "{err}");
    }
}
