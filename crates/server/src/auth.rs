//! Passwords (Argon2id, a bounded number at once, shared fairly between
//! addresses) and session tokens (random, stored only as their SHA-256).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::limits::Address;

pub const MIN_PASSWORD_LEN: usize = 8;
pub const MAX_PASSWORD_LEN: usize = 1024;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PasswordError {
    /// Every hashing slot is taken; the caller answers "try later".
    #[error("too many password checks at once")]
    Busy,
    #[error("password hashing failed: {0}")]
    Internal(String),
}

/// Computes Argon2id hashes on the blocking pool, at most `slots` at once.
/// Each hash takes ~19 MiB, so the bound is what keeps a login flood from
/// exhausting memory; callers beyond it are refused at once, not queued.
/// One address holds at most a quarter of the slots (at least one), so a
/// flood from one address leaves the others room.
#[derive(Clone)]
pub struct Passwords {
    slots: Arc<Semaphore>,
    per_address: usize,
    in_flight: Arc<Mutex<HashMap<Address, usize>>>,
}

/// An address's share of the slots, held while its hash runs.
struct Share {
    address: Address,
    in_flight: Arc<Mutex<HashMap<Address, usize>>>,
}

impl Drop for Share {
    fn drop(&mut self) {
        let mut in_flight = self.in_flight.lock().expect("passwords poisoned");
        if let Some(n) = in_flight.get_mut(&self.address) {
            *n -= 1;
            if *n == 0 {
                in_flight.remove(&self.address);
            }
        }
    }
}

fn argon2() -> Argon2<'static> {
    // OWASP's first recommended Argon2id setting: 19 MiB, 2 passes, 1 lane.
    let params = Params::new(19 * 1024, 2, 1, None).expect("valid argon2 parameters");
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

impl Passwords {
    pub fn new(slots: usize) -> Self {
        let slots = slots.max(1);
        Self {
            slots: Arc::new(Semaphore::new(slots)),
            per_address: slots.div_ceil(4),
            in_flight: Arc::default(),
        }
    }

    /// A slot for one hash from `from`, taken before anything is counted
    /// against the caller's limits, so that a `busy` answer (and the
    /// client's retry) costs no allowance.
    pub fn slot(&self, from: Address) -> Result<HashSlot, PasswordError> {
        let share = {
            let mut in_flight = self.in_flight.lock().expect("passwords poisoned");
            let n = in_flight.entry(from).or_default();
            if *n >= self.per_address {
                return Err(PasswordError::Busy);
            }
            *n += 1;
            Share {
                address: from,
                in_flight: self.in_flight.clone(),
            }
        };
        let permit = self
            .slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| PasswordError::Busy)?;
        Ok(HashSlot {
            _permit: permit,
            _share: share,
        })
    }
}

/// One password hash's place: a slot of the pool and of its address's share.
pub struct HashSlot {
    _permit: OwnedSemaphorePermit,
    _share: Share,
}

impl HashSlot {
    pub async fn hash(self, password: String) -> Result<String, PasswordError> {
        self.run(move || {
            let mut salt = [0u8; 16];
            rand::rng().fill_bytes(&mut salt);
            let salt = SaltString::encode_b64(&salt)
                .map_err(|e| PasswordError::Internal(e.to_string()))?;
            argon2()
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
                .map_err(|e| PasswordError::Internal(e.to_string()))
        })
        .await
    }

    /// Checks `password` against `hash`; with no hash (unknown user) it
    /// checks against a fixed dummy hash so that both cases take as long.
    pub async fn verify(
        self,
        password: String,
        hash: Option<String>,
    ) -> Result<bool, PasswordError> {
        self.run(move || {
            let known = hash.is_some();
            let hash = hash.unwrap_or_else(|| dummy_hash().to_string());
            let parsed =
                PasswordHash::new(&hash).map_err(|e| PasswordError::Internal(e.to_string()))?;
            Ok(argon2()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
                && known)
        })
        .await
    }

    async fn run<T: Send + 'static>(
        self,
        f: impl FnOnce() -> Result<T, PasswordError> + Send + 'static,
    ) -> Result<T, PasswordError> {
        tokio::task::spawn_blocking(move || {
            let result = f();
            drop(self);
            result
        })
        .await
        .map_err(|e| PasswordError::Internal(e.to_string()))?
    }
}

fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let salt = SaltString::encode_b64(b"confab-dummy-salt").expect("valid salt");
        argon2()
            .hash_password(b"not a password anyone has", &salt)
            .expect("hashing a constant works")
            .to_string()
    })
}

/// A new opaque session token (256 random bits, base64url).
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// What the database keeps of a token. Lookups go by this hash, so there is
/// no comparison of secrets whose timing could leak.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn address(last: u8) -> Address {
        Address::new(std::net::IpAddr::from([10, 0, 0, last]))
    }

    #[tokio::test]
    async fn hashes_verify_and_unknown_users_fail() {
        let p = Passwords::new(2);
        let a = address(1);
        let hash = p
            .slot(a)
            .unwrap()
            .hash("correct horse".into())
            .await
            .unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(
            p.slot(a)
                .unwrap()
                .verify("correct horse".into(), Some(hash.clone()))
                .await
                .unwrap()
        );
        let wrong = p.slot(a).unwrap().verify("wrong horse".into(), Some(hash));
        assert!(!wrong.await.unwrap());
        assert!(
            !p.slot(a)
                .unwrap()
                .verify("not a password anyone has".into(), None)
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn refuses_beyond_its_slots() {
        let p = Passwords::new(1);
        let _held = p.slots.clone().try_acquire_owned().unwrap();
        assert_eq!(p.slot(address(1)).err(), Some(PasswordError::Busy));
    }

    #[tokio::test]
    async fn one_address_holds_at_most_its_share() {
        let p = Passwords::new(8);
        let _held = p.in_flight.lock().unwrap().insert(address(1), 2);
        assert_eq!(p.slot(address(1)).err(), Some(PasswordError::Busy));
        assert!(p.slot(address(2)).is_ok());
    }

    #[test]
    fn tokens_are_random_and_hashed() {
        let (a, b) = (new_token(), new_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
        assert_eq!(token_hash(&a), token_hash(&a));
        assert_ne!(token_hash(&a), token_hash(&b));
    }
}
