//! Code shared by ztunnel and waypoint: workload identities (SPIFFE IDs), the TLS
//! configuration of HBONE (TLS 1.3 mutual authentication with secure naming), and the trust
//! bundle that makes root rotation possible.
//!
//! It must not hold component-specific logic (capture, L7 routing, config translation) and
//! must not pick a process-wide default crypto provider: every TLS configuration here names
//! its provider (ring) explicitly.

pub mod authz;
pub mod cert;
pub mod channel;
pub mod copy;
pub mod credential;
pub mod hbone;
pub mod identity;
pub mod netns;
pub mod routing;
pub mod shutdown;
pub mod sockfile;
pub mod tls;
pub mod xds;
pub mod zds;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use identity::SpiffeId;
