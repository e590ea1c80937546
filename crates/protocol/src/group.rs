//! Groups: the membership events that are part of a conversation's stream,
//! and what the server says about a conversation's members.

use serde::{Deserialize, Serialize};

/// Longest group name, in bytes.
pub const MAX_GROUP_NAME_BYTES: usize = 64;

/// A change of a group's members or name. The server writes it into the
/// conversation's stream as a message (`Message::event`, with an empty
/// `body`), in the same commit that changes the members, so that every
/// device sees it in its place among the messages. `from` is who made it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ConvEvent {
    /// The group was made with this name and these members (the creator
    /// among them, its first admin).
    Created {
        name: String,
        members: Vec<String>,
    },
    Added {
        users: Vec<String>,
    },
    Removed {
        users: Vec<String>,
    },
    /// `from` left the group. When it was the last admin, `admins` became
    /// admins in its place.
    Left {
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        admins: Vec<String>,
    },
    Renamed {
        name: String,
    },
    /// These members became admins.
    Admins {
        users: Vec<String>,
    },
}

/// What a conversation is: two people, or a named group with admins.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConvKind {
    #[default]
    Direct,
    Group,
}

impl ConvKind {
    pub fn is_direct(self) -> bool {
        self == ConvKind::Direct
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    #[default]
    Member,
}

/// One current member of a conversation (`members` frame).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct MemberSummary {
    pub user: String,
    pub role: Role,
}

/// How far one member has one message (`info` frame). `delivered` and
/// `read` say whether the member's cursors have passed it; the times, when
/// the server saw them pass (absent for cursors older than the server's
/// record of times). `read` is false and `read_at` absent when read
/// receipts are off on either side.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ReceiptInfo {
    pub user: String,
    pub delivered: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<i64>,
    pub read: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_at: Option<i64>,
}

/// Whether `name` may name a group: 1–64 bytes, no control, hidden or
/// bidirectional characters, not only white space.
pub fn valid_group_name(name: &str) -> bool {
    !name.trim().is_empty()
        && name.len() <= MAX_GROUP_NAME_BYTES
        && !name
            .chars()
            .any(|c| c.is_control() || crate::text::is_hidden_or_bidi(c))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_a_stable_shape() {
        let e = ConvEvent::Left { admins: vec![] };
        assert_eq!(serde_json::to_string(&e).unwrap(), r#"{"kind":"left"}"#);
        let e = ConvEvent::Added {
            users: vec!["bob".into()],
        };
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"kind":"added","users":["bob"]}"#
        );
    }

    #[test]
    fn group_names() {
        assert!(valid_group_name("Family 🏡"));
        assert!(!valid_group_name(""));
        assert!(!valid_group_name("   "));
        assert!(!valid_group_name("a\u{202e}b"));
        assert!(!valid_group_name("a\nb"));
        assert!(!valid_group_name(&"x".repeat(65)));
    }
}
