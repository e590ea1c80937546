//! End-to-end encryption for confab: device keys, signed device lists, message
//! envelopes and safety numbers. No I/O; the byte formats are specified in
//! `docs/encryption.md` and pinned by the vectors in `tests/vectors/`.

#![warn(missing_docs)]

mod b64;
pub mod content;
pub mod devicelist;
pub mod envelope;
mod error;
pub mod keys;
pub mod login;
pub mod safety;

pub use content::{Content, FileRef};
pub use devicelist::{DeviceEntry, DeviceList, SignedDeviceList, verify_chain};
pub use envelope::{Envelope, MessageContext, seal, stand_in};
pub use error::CryptoError;
pub use keys::{DeviceKeys, PublicKeys, fingerprint};
pub use login::LoginProof;
pub use safety::safety_number;

/// The RNG traits this crate takes (rand_core 0.10, the version `hpke` uses;
/// `rand` 0.9 generators do not implement them, so use [`os_rng`]).
pub use hpke::rand_core::CryptoRng;

/// The operating system's random number generator.
///
/// Panics on use if the OS cannot supply randomness: there is no safe way to
/// go on without it.
pub fn os_rng() -> impl CryptoRng {
    hpke::rand_core::UnwrapErr(getrandom::SysRng)
}

/// Longest message id, in bytes.
pub const MAX_MESSAGE_ID_LEN: usize = 64;

/// Appends `i64 conv || u8 len(message id) || message id`, the prefix that binds
/// every per-message value (content aad, wrap aad, signature) to one message.
fn put_message_binding(out: &mut Vec<u8>, conv: i64, message_id: &str) -> Result<(), CryptoError> {
    let id = message_id.as_bytes();
    if id.is_empty() || id.len() > MAX_MESSAGE_ID_LEN || !message_id.is_ascii() {
        return Err(CryptoError::BadMessageId);
    }
    out.extend_from_slice(&conv.to_be_bytes());
    out.push(id.len() as u8);
    out.extend_from_slice(id);
    Ok(())
}
