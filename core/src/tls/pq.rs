//! X25519MLKEM768 (TLS named group 0x11EC, draft-ietf-tls-ecdhe-mlkem): the hybrid
//! post-quantum key exchange Istio's ztunnel can be set to offer alone. ring has no ML-KEM,
//! so the ML-KEM-768 half comes from RustCrypto's `ml-kem` (FIPS 203) and the X25519 half
//! from ring, as for the classical groups.
//!
//! Wire layout (ML-KEM first for this group): the client's share is the ML-KEM-768
//! encapsulation key (1,184 bytes) then its X25519 public key (32); the server's share is
//! the ML-KEM ciphertext (1,088) then its X25519 public key (32); the shared secret is the
//! ML-KEM shared key (32) then the X25519 shared secret (32). Both halves are fresh per
//! handshake. A share of the wrong length or an X25519 key ring refuses (a low-order
//! point) fails the handshake.

use ml_kem::kem::{Decapsulate, Encapsulate, Kem, KeyExport, TryKeyInit};
use ml_kem::{DecapsulationKey, EncapsulationKey, MlKem768};
use ring::agreement::{EphemeralPrivateKey, UnparsedPublicKey, X25519, agree_ephemeral};
use ring::rand::SystemRandom;
use rustls::crypto::{ActiveKeyExchange, CompletedKeyExchange, SharedSecret, SupportedKxGroup};
use rustls::{Error, NamedGroup, PeerMisbehaved, ProtocolVersion};

const ENCAPSULATION_KEY_LEN: usize = 1184;
const CIPHERTEXT_LEN: usize = 1088;
const X25519_LEN: usize = 32;

/// The group, for a provider's `kx_groups`.
pub(crate) static X25519_MLKEM768: &dyn SupportedKxGroup = &X25519MlKem768;

#[derive(Debug)]
struct X25519MlKem768;

fn invalid_share() -> Error {
    Error::PeerMisbehaved(PeerMisbehaved::InvalidKeyShare)
}

/// A fresh X25519 key pair (the private half is used once, by `agree_ephemeral`).
fn x25519_pair() -> Result<(EphemeralPrivateKey, Vec<u8>), Error> {
    let key = EphemeralPrivateKey::generate(&X25519, &SystemRandom::new())
        .map_err(|_| Error::FailedToGetRandomBytes)?;
    let public = key
        .compute_public_key()
        .map_err(|_| Error::General("X25519 public key".into()))?;
    Ok((key, public.as_ref().to_vec()))
}

fn x25519_agree(key: EphemeralPrivateKey, peer: &[u8]) -> Result<Vec<u8>, Error> {
    agree_ephemeral(key, &UnparsedPublicKey::new(&X25519, peer), |s| s.to_vec())
        .map_err(|_| invalid_share())
}

impl SupportedKxGroup for X25519MlKem768 {
    /// The client's side: a key share to send.
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, Error> {
        let (decapsulation, encapsulation) = MlKem768::generate_keypair();
        let (x25519, x25519_public) = x25519_pair()?;
        let mut share = encapsulation.to_bytes().to_vec();
        share.extend_from_slice(&x25519_public);
        Ok(Box::new(ClientExchange {
            decapsulation,
            x25519,
            share,
        }))
    }

    /// The server's side: a KEM, so it encapsulates to the client's key instead of
    /// starting an exchange of its own.
    fn start_and_complete(&self, client_share: &[u8]) -> Result<CompletedKeyExchange, Error> {
        if client_share.len() != ENCAPSULATION_KEY_LEN + X25519_LEN {
            return Err(invalid_share());
        }
        let (encapsulation, client_x25519) = client_share.split_at(ENCAPSULATION_KEY_LEN);
        let encapsulation = EncapsulationKey::<MlKem768>::new_from_slice(encapsulation)
            .map_err(|_| invalid_share())?;
        let (ciphertext, mlkem_secret) = encapsulation.encapsulate();
        let (x25519, x25519_public) = x25519_pair()?;
        let x25519_secret = x25519_agree(x25519, client_x25519)?;
        let mut pub_key = ciphertext.to_vec();
        pub_key.extend_from_slice(&x25519_public);
        let mut secret = mlkem_secret.to_vec();
        secret.extend_from_slice(&x25519_secret);
        Ok(CompletedKeyExchange {
            group: NamedGroup::X25519MLKEM768,
            pub_key,
            secret: SharedSecret::from(secret),
        })
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }

    fn usable_for_version(&self, version: ProtocolVersion) -> bool {
        version == ProtocolVersion::TLSv1_3
    }
}

struct ClientExchange {
    decapsulation: DecapsulationKey<MlKem768>,
    x25519: EphemeralPrivateKey,
    share: Vec<u8>,
}

impl ActiveKeyExchange for ClientExchange {
    fn complete(self: Box<Self>, server_share: &[u8]) -> Result<SharedSecret, Error> {
        if server_share.len() != CIPHERTEXT_LEN + X25519_LEN {
            return Err(invalid_share());
        }
        let (ciphertext, server_x25519) = server_share.split_at(CIPHERTEXT_LEN);
        let mlkem_secret = self
            .decapsulation
            .decapsulate_slice(ciphertext)
            .map_err(|_| invalid_share())?;
        let x25519_secret = x25519_agree(self.x25519, server_x25519)?;
        let mut secret = mlkem_secret.to_vec();
        secret.extend_from_slice(&x25519_secret);
        Ok(SharedSecret::from(secret))
    }

    fn pub_key(&self) -> &[u8] {
        &self.share
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519MLKEM768
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_derive_the_same_64_byte_secret_from_shares_of_the_draft_sizes() {
        let client = X25519_MLKEM768.start().unwrap();
        assert_eq!(client.pub_key().len(), 1184 + 32);
        let server = X25519_MLKEM768
            .start_and_complete(client.pub_key())
            .unwrap();
        assert_eq!(server.pub_key.len(), 1088 + 32);
        let client_secret = client.complete(&server.pub_key).unwrap();
        assert_eq!(client_secret.secret_bytes().len(), 64);
        assert_eq!(client_secret.secret_bytes(), server.secret.secret_bytes());
    }

    #[test]
    fn malformed_shares_fail_the_exchange_without_panicking() {
        let client = X25519_MLKEM768.start().unwrap();
        let share = client.pub_key().to_vec();
        for bad in [&share[..100], &share[..share.len() - 1], &[][..]] {
            assert!(X25519_MLKEM768.start_and_complete(bad).is_err());
        }
        // An all-zero X25519 half is a low-order point: refused.
        let mut zero_x = share.clone();
        zero_x[1184..].fill(0);
        assert!(X25519_MLKEM768.start_and_complete(&zero_x).is_err());
        let server = X25519_MLKEM768.start_and_complete(&share).unwrap();
        assert!(client.complete(&server.pub_key[..500]).is_err());
    }
}
