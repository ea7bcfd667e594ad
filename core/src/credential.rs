//! What a proxy presents to the control plane: a token given once (local mode: the
//! credential issued when the node joined), or a file read again before each use
//! (Kubernetes: the projected ServiceAccount token, which the kubelet rotates in place).

use std::path::PathBuf;

use tonic::metadata::{Ascii, MetadataValue};

/// A bearer credential.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    /// This token.
    Token(String),
    /// The token in this file, as it is at the time of each request.
    File(PathBuf),
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            // Never print the token.
            Credential::Token(_) => f.write_str("Credential::Token(..)"),
            Credential::File(p) => write!(f, "Credential::File({})", p.display()),
        }
    }
}

impl From<String> for Credential {
    fn from(token: String) -> Credential {
        Credential::Token(token)
    }
}

impl From<&str> for Credential {
    fn from(token: &str) -> Credential {
        Credential::Token(token.to_string())
    }
}

impl Credential {
    /// The token now (a file is read each time: a rotated token is picked up).
    pub fn token(&self) -> Result<String, String> {
        match self {
            Credential::Token(t) => Ok(t.trim().to_string()),
            Credential::File(p) => std::fs::read_to_string(p)
                .map(|t| t.trim().to_string())
                .map_err(|e| format!("cannot read the credential {}: {e}", p.display())),
        }
    }

    /// The `authorization` header value: `Bearer <token>`.
    pub fn header(&self) -> Result<MetadataValue<Ascii>, String> {
        format!("Bearer {}", self.token()?)
            .parse()
            .map_err(|_| "the credential is not printable ASCII".to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_credential_follows_the_rotated_file() {
        let path = std::env::temp_dir().join(format!("trellis-credential-{}", std::process::id()));
        std::fs::write(&path, "first\n").unwrap();
        let c = Credential::File(path.clone());
        assert_eq!(c.header().unwrap(), "Bearer first");
        // The kubelet swaps the projected token in place.
        std::fs::write(&path, "second").unwrap();
        assert_eq!(c.header().unwrap(), "Bearer second");
        std::fs::remove_file(&path).unwrap();
        assert!(
            c.header()
                .unwrap_err()
                .contains("cannot read the credential")
        );
        assert!(Credential::from("bad\nvalue").header().is_err());
        assert!(!format!("{:?}", Credential::from("s3cret")).contains("s3cret"));
    }
}
