use std::fmt;

use serde::{Deserialize, Serialize};

/// Identifies a conversation. Stable for a pair of users: opening the
/// conversation with the same peer again gives the same id.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(transparent)]
pub struct ConversationId(pub i64);

/// Identifies one device (one client installation) of a user. Assigned by the
/// server at the first login of a client and kept by the client.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(transparent)]
pub struct DeviceId(pub i64);

impl fmt::Display for ConversationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidId(pub &'static str);

impl fmt::Display for InvalidId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for InvalidId {}

/// A message id chosen by the sending client (a UUID in practice). Sending
/// the same id twice never creates a second message.
///
/// 1 to 64 characters from `A-Z a-z 0-9 - _ . :`, so it is safe in logs and
/// cheap to index.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(try_from = "String", into = "String")]
pub struct MessageId(String);

impl MessageId {
    pub const MAX_LEN: usize = 64;

    pub fn new(id: impl Into<String>) -> Result<Self, InvalidId> {
        let id = id.into();
        let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
        if id.is_empty() || id.len() > Self::MAX_LEN || !id.chars().all(ok_char) {
            return Err(InvalidId(
                "message id must be 1-64 characters of A-Z a-z 0-9 - _ . :",
            ));
        }
        Ok(Self(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for MessageId {
    type Error = InvalidId;
    fn try_from(s: String) -> Result<Self, InvalidId> {
        Self::new(s)
    }
}

impl From<MessageId> for String {
    fn from(id: MessageId) -> String {
        id.0
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A username: 3 to 32 characters, lowercase ASCII letters, digits and `_`,
/// starting with a letter. Input is lowercased first, so `Alice` and `alice`
/// are the same user.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(try_from = "String", into = "String")]
pub struct Username(String);

impl Username {
    pub const RULES: &'static str =
        "usernames are 3-32 characters: letters a-z, digits and _, starting with a letter";

    pub fn new(name: &str) -> Result<Self, InvalidId> {
        let name = name.to_ascii_lowercase();
        let valid_len = (3..=32).contains(&name.len());
        let starts_with_letter = name.starts_with(|c: char| c.is_ascii_lowercase());
        let valid_chars = name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if valid_len && starts_with_letter && valid_chars {
            Ok(Self(name))
        } else {
            Err(InvalidId(Self::RULES))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Username {
    type Error = InvalidId;
    fn try_from(s: String) -> Result<Self, InvalidId> {
        Self::new(&s)
    }
}

impl From<Username> for String {
    fn from(u: Username) -> String {
        u.0
    }
}

impl fmt::Display for Username {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_normalised_and_checked() {
        assert_eq!(Username::new("Alice_1").unwrap().as_str(), "alice_1");
        for bad in [
            "al",
            "1alice",
            "_alice",
            "ali ce",
            "alice!",
            "ålice",
            &"a".repeat(33),
        ] {
            assert!(Username::new(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn message_ids_are_checked() {
        assert!(MessageId::new("0192f0c4-7d2e-7c1a-9b1e-8f2d3c4b5a69").is_ok());
        assert!(MessageId::new("").is_err());
        assert!(MessageId::new("a b").is_err());
        assert!(MessageId::new("x".repeat(65)).is_err());
        let parsed: Result<MessageId, _> = serde_json::from_str("\"bad id\"");
        assert!(parsed.is_err());
    }
}
