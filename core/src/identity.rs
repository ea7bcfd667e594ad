//! Workload identity: SPIFFE IDs of the form `spiffe://<trust-domain>/ns/<ns>/sa/<sa>`.

use std::fmt;
use std::str::FromStr;

/// Why a string is not a workload SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{input:?} is not a workload SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>): {reason}"
)]
pub struct IdentityError {
    /// The rejected input (truncated to 256 characters).
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// A workload identity: the service account a workload runs as, in a trust domain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

impl SpiffeId {
    /// Builds an identity from its parts, validating each.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<SpiffeId, IdentityError> {
        format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Kubernetes namespace.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The service account.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<SpiffeId, IdentityError> {
        let err = |reason| IdentityError {
            input: s.chars().take(256).collect(),
            reason,
        };
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("the scheme must be spiffe:// (lowercase)"))?;
        let mut parts = rest.split('/');
        let td = parts.next().unwrap_or_default();
        // The SPIFFE spec: trust domain of lowercase letters, digits, '.', '-', '_'.
        if td.is_empty() || td.len() > 255 {
            return Err(err("the trust domain is empty or too long"));
        }
        if !td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
        {
            return Err(err(
                "the trust domain may hold only a-z, 0-9, '.', '-', '_'",
            ));
        }
        let segments: Vec<&str> = parts.collect();
        let [ns_key, ns, sa_key, sa] = segments.as_slice() else {
            return Err(err(
                "the path must be exactly /ns/<namespace>/sa/<service-account>",
            ));
        };
        if *ns_key != "ns" || *sa_key != "sa" {
            return Err(err(
                "the path must be exactly /ns/<namespace>/sa/<service-account>",
            ));
        }
        for (value, what) in [(ns, "namespace"), (sa, "service account")] {
            if !is_name(value) {
                return Err(err(if what == "namespace" {
                    "the namespace is not a Kubernetes name"
                } else {
                    "the service account is not a Kubernetes name"
                }));
            }
        }
        Ok(SpiffeId {
            trust_domain: td.to_string(),
            namespace: ns.to_string(),
            service_account: sa.to_string(),
        })
    }
}

/// A Kubernetes object name (DNS subdomain rules: lowercase alphanumerics, '-', '.').
fn is_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_workload_ids() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
            .parse()
            .unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "bookinfo-productpage");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
        );
        assert_eq!(
            SpiffeId::new("cluster.local", "default", "bookinfo-productpage").unwrap(),
            id
        );
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "https://cluster.local/ns/a/sa/b",
            "SPIFFE://cluster.local/ns/a/sa/b",
            "spiffe:///ns/a/sa/b",
            "spiffe://Cluster.Local/ns/a/sa/b",
            "spiffe://cluster.local",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/b/ns/a",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/A/sa/b",
            "spiffe://cluster.local/ns/a/sa/b?x=1",
            "spiffe://cluster.local/ns/a/sa/-b",
            "spiffe://user@cluster.local/ns/a/sa/b",
        ] {
            let err = bad.parse::<SpiffeId>().expect_err(bad);
            assert!(
                err.to_string().contains("not a workload SPIFFE ID"),
                "{err}"
            );
        }
    }
}
