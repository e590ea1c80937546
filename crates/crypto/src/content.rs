//! What an envelope's plaintext holds: UTF-8 JSON.

use serde::{Deserialize, Serialize};

use crate::CryptoError;

/// Message content, v1: `{"text":"..."}`. Unknown fields are ignored so that
/// older clients still show the text of newer messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Content {
    /// The message text.
    pub text: String,
}

impl Content {
    /// Content with just text.
    pub fn text(text: impl Into<String>) -> Self {
        Self { text: text.into() }
    }

    /// The plaintext to seal.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("content serializes")
    }

    /// Parses an opened plaintext.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        serde_json::from_slice(bytes).map_err(|_| CryptoError::BadContent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_form() {
        let c = Content::text("hi \"there\"");
        assert_eq!(c.to_bytes(), br#"{"text":"hi \"there\""}"#);
        assert_eq!(Content::from_bytes(&c.to_bytes()).unwrap(), c);
        let newer = br#"{"text":"x","files":[{"key":"AAAA"}]}"#;
        assert_eq!(Content::from_bytes(newer).unwrap(), Content::text("x"));
        assert_eq!(Content::from_bytes(b"{}"), Err(CryptoError::BadContent));
        assert_eq!(Content::from_bytes(b"\xff"), Err(CryptoError::BadContent));
    }
}
