//! A device proves at login that it holds its keys: a signature over the
//! account, the device and the time. The server then treats the login as
//! coming from a device it knows (the password is still checked), which an
//! attacker guessing passwords from elsewhere cannot lock out.

use serde::{Deserialize, Serialize};

use crate::DeviceKeys;
use crate::keys::{PublicKeys, verify};

/// How far a proof's time may be from the server's clock.
pub const MAX_SKEW_MS: i64 = 5 * 60 * 1000;

/// The proof a login carries with its device id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginProof {
    /// When it was made (ms since the epoch).
    pub ts: i64,
    /// Ed25519 over `"confab-login-v1"` || username (lower case) || 0x00 ||
    /// device id (8 bytes, big-endian) || ts (8 bytes, big-endian).
    #[serde(with = "crate::b64")]
    pub sig: [u8; 64],
}

fn signed_bytes(username: &str, device: i64, ts: i64) -> Vec<u8> {
    let mut msg = Vec::with_capacity(64);
    msg.extend_from_slice(b"confab-login-v1");
    msg.extend_from_slice(username.to_ascii_lowercase().as_bytes());
    msg.push(0);
    msg.extend_from_slice(&device.to_be_bytes());
    msg.extend_from_slice(&ts.to_be_bytes());
    msg
}

impl LoginProof {
    /// Signs a login of `device` to `username` at `ts`.
    pub fn new(keys: &DeviceKeys, username: &str, device: i64, ts: i64) -> Self {
        Self {
            ts,
            sig: keys.sign(&signed_bytes(username, device, ts)),
        }
    }

    /// Whether `keys` (the device's registered keys) made this proof for
    /// this login, within [`MAX_SKEW_MS`] of `now`.
    pub fn verify(&self, keys: &PublicKeys, username: &str, device: i64, now: i64) -> bool {
        (self.ts - now).abs() <= MAX_SKEW_MS
            && verify(
                &keys.sign,
                &signed_bytes(username, device, self.ts),
                &self.sig,
            )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::test_keys;

    #[test]
    fn a_proof_binds_account_device_and_time() {
        let keys = test_keys(1);
        let now = 1_800_000_000_000;
        let proof = LoginProof::new(&keys, "Alice", 7, now);
        let public = keys.public();
        assert!(proof.verify(&public, "alice", 7, now + 1000));
        assert!(!proof.verify(&public, "bob", 7, now));
        assert!(!proof.verify(&public, "alice", 8, now));
        assert!(!proof.verify(&public, "alice", 7, now + MAX_SKEW_MS + 1));
        assert!(!proof.verify(&test_keys(2).public(), "alice", 7, now));
    }
}
