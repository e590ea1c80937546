//! What an envelope's plaintext holds: UTF-8 JSON.

use serde::{Deserialize, Serialize};

use crate::CryptoError;

/// Message content, v1: `{"text":"..."}`, and for a file message a `file`
/// (docs/files.md). Unknown fields are ignored so that older clients still
/// show the text of newer messages.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Content {
    /// The message text (for a file: a caption, or empty).
    pub text: String,
    /// The file a file message carries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileRef>,
}

/// A file the message carries: where its encrypted bytes are, the key that
/// opens them, and what it is. Travels only inside the envelope.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRef {
    /// The blob id the server gave the upload (also listed in the `send`).
    pub blob: String,
    /// The age X25519 identity the file was encrypted to, made for this file
    /// alone (`AGE-SECRET-KEY-1…`): any age implementation opens the blob
    /// with it.
    pub key: String,
    /// The file's name as the sender had it (a receiver makes it safe).
    pub name: String,
    /// Its media type, e.g. `image/jpeg`.
    pub media_type: String,
    /// Its size before encryption, in bytes.
    pub size: u64,
    /// For a picture: a small JPEG, base64url, at most a few KiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thumbnail: Option<String>,
}

impl Content {
    /// Content with just text.
    pub fn text(text: impl Into<String>) -> Self {
        Self {
            text: text.into(),
            file: None,
        }
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
        let file = Content {
            text: String::new(),
            file: Some(FileRef {
                blob: "AAAAAAAAAAAAAAAAAAAAAA".into(),
                key: "AGE-SECRET-KEY-1X".into(),
                name: "cat.jpg".into(),
                media_type: "image/jpeg".into(),
                size: 1234,
                thumbnail: None,
            }),
        };
        assert_eq!(
            file.to_bytes(),
            br#"{"text":"","file":{"blob":"AAAAAAAAAAAAAAAAAAAAAA","key":"AGE-SECRET-KEY-1X","name":"cat.jpg","media_type":"image/jpeg","size":1234}}"#
        );
        assert_eq!(Content::from_bytes(&file.to_bytes()).unwrap(), file);
        assert_eq!(Content::from_bytes(b"\xff"), Err(CryptoError::BadContent));
    }
}
