//! A device's key pairs: Ed25519 for signing, X25519 for receiving HPKE key wraps.

use std::fmt;

use ed25519_dalek::{Signer, SigningKey};
use hpke::{Deserializable, Kem as _, Serializable};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::{CryptoRng, DeviceEntry};

/// The HPKE KEM: DHKEM(X25519, HKDF-SHA256), RFC 9180 id 0x0020.
pub(crate) type Kem = hpke::kem::X25519HkdfSha256;

/// A device's private keys. Never leaves the device.
#[derive(Clone)]
pub struct DeviceKeys {
    sign: SigningKey,
    kem: <Kem as hpke::Kem>::PrivateKey,
}

/// A device's public keys, as published in its user's device list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PublicKeys {
    /// Ed25519 verifying key.
    #[serde(with = "crate::b64")]
    pub sign: [u8; 32],
    /// X25519 public key that HPKE wraps are sealed to.
    #[serde(with = "crate::b64")]
    pub kem: [u8; 32],
}

impl DeviceKeys {
    /// New random keys: 32 bytes for the Ed25519 seed, then 32 bytes of HPKE
    /// `DeriveKeyPair` input for the X25519 key, both from `rng`.
    pub fn generate(rng: &mut impl CryptoRng) -> Self {
        let mut seed = Zeroizing::new([0u8; 32]);
        rng.fill_bytes(seed.as_mut());
        let (kem, _) = Kem::gen_keypair_with_rng(rng);
        Self {
            sign: SigningKey::from_bytes(&seed),
            kem,
        }
    }

    /// Ed25519 seed (32) || X25519 private key (32, clamped), for the device's
    /// own secret storage.
    pub fn to_secret_bytes(&self) -> Zeroizing<[u8; 64]> {
        let mut out = Zeroizing::new([0u8; 64]);
        out[..32].copy_from_slice(&self.sign.to_bytes());
        out[32..].copy_from_slice(&self.kem.to_bytes());
        out
    }

    /// Inverse of [`DeviceKeys::to_secret_bytes`]. The X25519 half is clamped
    /// as RFC 7748 requires, so any 64 bytes are a valid key pair.
    pub fn from_secret_bytes(bytes: &[u8; 64]) -> Self {
        let seed: &[u8; 32] = bytes[..32].try_into().expect("32-byte half");
        let kem = <Kem as hpke::Kem>::PrivateKey::from_bytes(&bytes[32..])
            .expect("any 32 bytes are an X25519 private key");
        Self {
            sign: SigningKey::from_bytes(seed),
            kem,
        }
    }

    /// The public halves.
    pub fn public(&self) -> PublicKeys {
        PublicKeys {
            sign: self.sign.verifying_key().to_bytes(),
            kem: Kem::sk_to_pk(&self.kem).to_bytes().into(),
        }
    }

    /// This device's entry for its user's device list.
    pub fn entry(&self, device: i64) -> DeviceEntry {
        DeviceEntry {
            device,
            keys: self.public(),
        }
    }

    pub(crate) fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.sign.sign(msg).to_bytes()
    }

    pub(crate) fn kem_secret(&self) -> &<Kem as hpke::Kem>::PrivateKey {
        &self.kem
    }
}

impl fmt::Debug for DeviceKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only public material: these keys end up in logs via `{:?}` of parents.
        f.debug_struct("DeviceKeys")
            .field("fingerprint", &fingerprint(&self.public()))
            .finish_non_exhaustive()
    }
}

/// A short device fingerprint for people to compare: the first 10 bytes of
/// SHA-256(`"confab-device-v1"` || sign || kem) as 5 space-separated groups of
/// 4 lowercase hex digits, e.g. `"3f2a 09bc 7d11 e0a4 5c6b"`.
pub fn fingerprint(keys: &PublicKeys) -> String {
    let digest = Sha256::new()
        .chain_update(b"confab-device-v1")
        .chain_update(keys.sign)
        .chain_update(keys.kem)
        .finalize();
    let groups: Vec<String> = digest[..10]
        .chunks(2)
        .map(|g| format!("{:02x}{:02x}", g[0], g[1]))
        .collect();
    groups.join(" ")
}

/// Verifies an Ed25519 signature strictly (no malleable or small-order forms).
pub(crate) fn verify(sign_key: &[u8; 32], msg: &[u8], sig: &[u8; 64]) -> bool {
    let Ok(key) = ed25519_dalek::VerifyingKey::from_bytes(sign_key) else {
        return false;
    };
    key.verify_strict(msg, &ed25519_dalek::Signature::from_bytes(sig))
        .is_ok()
}

#[cfg(test)]
pub(crate) fn test_keys(n: u8) -> DeviceKeys {
    use hpke::rand_core::SeedableRng;
    DeviceKeys::generate(&mut rand_chacha::ChaCha20Rng::from_seed([n; 32]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secret_bytes_round_trip_and_debug_hides_them() {
        let keys = test_keys(1);
        let secret = keys.to_secret_bytes();
        let back = DeviceKeys::from_secret_bytes(&secret);
        assert_eq!(back.public(), keys.public());
        assert_eq!(*back.to_secret_bytes(), *secret);
        assert_ne!(test_keys(2).public(), keys.public());
        let (a, b) = (
            DeviceKeys::generate(&mut crate::os_rng()),
            DeviceKeys::generate(&mut crate::os_rng()),
        );
        assert_ne!(a.public(), b.public());

        let debug = format!("{keys:?}");
        assert!(debug.contains(&fingerprint(&keys.public())), "{debug}");
        for half in [&secret[..32], &secret[32..]] {
            assert!(!debug.contains(&hex::encode(half)), "{debug}");
        }
        assert!(
            !debug.contains("SigningKey") && !debug.contains("kem"),
            "{debug}"
        );
    }

    #[test]
    fn public_keys_json_and_fingerprint() {
        let keys = PublicKeys {
            sign: [0xfb; 32],
            kem: [1; 32],
        };
        let json = serde_json::to_string(&keys).unwrap();
        assert_eq!(
            json,
            r#"{"sign":"-_v7-_v7-_v7-_v7-_v7-_v7-_v7-_v7-_v7-_v7-_s","kem":"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE"}"#
        );
        assert_eq!(serde_json::from_str::<PublicKeys>(&json).unwrap(), keys);
        assert!(serde_json::from_str::<PublicKeys>(&json.replace("AQE\"", "AQE=\"")).is_err());

        let fp = fingerprint(&keys);
        assert_eq!(fp.len(), 24);
        assert!(fp.split(' ').all(|g| {
            g.len() == 4
                && g.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        }));
        assert_ne!(
            fingerprint(&PublicKeys {
                kem: [2; 32],
                ..keys
            }),
            fp
        );
    }
}
