//! The Trellis control plane: reads configuration, serves it to the data plane over delta
//! xDS, and is the certificate authority of workload identities.
//!
//! Built so far: the certificate authority ([`ca`]) and the configuration model
//! ([`config`]). It must never hand a certificate for
//! an identity to a caller that may not hold it, and never take down the data plane:
//! proxies keep working with what they hold while it is away.

pub mod ca;
pub mod config;
pub mod controller;
pub mod server;
pub mod xds;
