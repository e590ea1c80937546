//! Serde helpers: fixed-size byte arrays as base64url without padding.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Deserializer, Serializer, de::Error};

pub fn serialize<S: Serializer, const N: usize>(bytes: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&URL_SAFE_NO_PAD.encode(bytes))
}

pub fn deserialize<'de, D: Deserializer<'de>, const N: usize>(d: D) -> Result<[u8; N], D::Error> {
    let text = String::deserialize(d)?;
    let bytes = URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| D::Error::custom("invalid base64url (no padding)"))?;
    bytes
        .try_into()
        .map_err(|_| D::Error::custom(format!("expected {N} bytes")))
}
