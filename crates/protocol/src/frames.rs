use serde::{Deserialize, Serialize};

use crate::{
    ConvEvent, ConvKind, ConversationId, DeviceId, ErrorCode, MemberSummary, MessageId, ReceiptInfo,
};

/// A frame from a client to the server (a JSON text frame with a `type`).
///
/// Requests that expect a reply other than `sent` carry a client-chosen
/// `ref` that the reply (or the error) echoes.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Must be the first frame on a socket. Answered by `welcome` or an
    /// error followed by a close.
    Auth { v: u32, token: String },
    /// Heartbeat; answered by `pong`. Any frame keeps the connection alive.
    Ping,
    /// Store and forward a message. `body` is opaque to the server.
    /// Answered by `sent` (after the commit) or an error carrying `id`.
    Send {
        id: MessageId,
        conv: ConversationId,
        body: String,
        /// The blobs (files) the message refers to, each one the sender
        /// uploaded: the commit binds them to the message, and the
        /// conversation's members may then download them (docs/files.md).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        blobs: Vec<String>,
    },
    /// This device has received every message of `conv` up to `seq`.
    Delivered { conv: ConversationId, seq: i64 },
    /// The user has read every message of `conv` up to `seq`.
    Read { conv: ConversationId, seq: i64 },
    /// The user is typing in `conv`. Ephemeral, rate-limited, never stored.
    Typing { conv: ConversationId },
    /// Open (or find) the 1:1 conversation with `peer`. Answered by `conversation`.
    Open {
        #[serde(rename = "ref")]
        req: u64,
        peer: String,
    },
    /// List the user's conversations. Answered by `conversations`.
    Conversations {
        #[serde(rename = "ref")]
        req: u64,
    },
    /// Messages of `conv` with `seq < before` (or the newest when absent),
    /// newest `limit` of them, returned oldest first. Answered by `history`.
    History {
        #[serde(rename = "ref")]
        req: u64,
        conv: ConversationId,
        #[serde(default)]
        before: Option<i64>,
        limit: u32,
    },
    /// Accept the message request `conv`: the peer then sees this user's
    /// receipts and may send without limit. Answered by `ok`.
    Accept {
        #[serde(rename = "ref")]
        req: u64,
        conv: ConversationId,
    },
    /// Stop all messages, presence, typing and receipts between the user and `user`.
    Block {
        #[serde(rename = "ref")]
        req: u64,
        user: String,
    },
    Unblock {
        #[serde(rename = "ref")]
        req: u64,
        user: String,
    },
    /// Change the user's settings. Answered by `ok`.
    Settings {
        #[serde(rename = "ref")]
        req: u64,
        read_receipts: bool,
    },
    /// Make a group named `name` with these members besides the sender,
    /// who becomes its first admin. Like every group change it carries a
    /// client-chosen `id` and is answered by its event: a `msg` with that
    /// `id` and `event` (here `created`, seq 1 of the new conversation), or
    /// an error with `id`. A resend with the same id gets `sent` with
    /// `resent: true` (the original).
    GroupCreate {
        id: MessageId,
        name: String,
        members: Vec<String>,
    },
    /// Admins only: add members.
    GroupAdd {
        id: MessageId,
        conv: ConversationId,
        users: Vec<String>,
    },
    /// Admins only: remove members.
    GroupRemove {
        id: MessageId,
        conv: ConversationId,
        users: Vec<String>,
    },
    /// Leave the group.
    GroupLeave { id: MessageId, conv: ConversationId },
    /// Admins only: rename the group.
    GroupRename {
        id: MessageId,
        conv: ConversationId,
        name: String,
    },
    /// Admins only: make members admins.
    GroupAdmin {
        id: MessageId,
        conv: ConversationId,
        users: Vec<String>,
    },
    /// The conversation's current members. Answered by `members`.
    Members {
        #[serde(rename = "ref")]
        req: u64,
        conv: ConversationId,
    },
    /// Who has message `seq` of `conv` and who read it, and when. Answered
    /// by `info`.
    Info {
        #[serde(rename = "ref")]
        req: u64,
        conv: ConversationId,
        seq: i64,
    },
}

impl ClientFrame {
    /// The frame's `type` as it appears on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientFrame::Auth { .. } => "auth",
            ClientFrame::Ping => "ping",
            ClientFrame::Send { .. } => "send",
            ClientFrame::Delivered { .. } => "delivered",
            ClientFrame::Read { .. } => "read",
            ClientFrame::Typing { .. } => "typing",
            ClientFrame::Open { .. } => "open",
            ClientFrame::Accept { .. } => "accept",
            ClientFrame::Conversations { .. } => "conversations",
            ClientFrame::History { .. } => "history",
            ClientFrame::Block { .. } => "block",
            ClientFrame::Unblock { .. } => "unblock",
            ClientFrame::Settings { .. } => "settings",
            ClientFrame::GroupCreate { .. } => "group_create",
            ClientFrame::GroupAdd { .. } => "group_add",
            ClientFrame::GroupRemove { .. } => "group_remove",
            ClientFrame::GroupLeave { .. } => "group_leave",
            ClientFrame::GroupRename { .. } => "group_rename",
            ClientFrame::GroupAdmin { .. } => "group_admin",
            ClientFrame::Members { .. } => "members",
            ClientFrame::Info { .. } => "info",
        }
    }

    /// What the answer to this frame echoes: its `ref` (requests) or its
    /// `id` (sends and group changes).
    pub fn reference(&self) -> (Option<u64>, Option<&MessageId>) {
        match self {
            ClientFrame::Send { id, .. }
            | ClientFrame::GroupCreate { id, .. }
            | ClientFrame::GroupAdd { id, .. }
            | ClientFrame::GroupRemove { id, .. }
            | ClientFrame::GroupLeave { id, .. }
            | ClientFrame::GroupRename { id, .. }
            | ClientFrame::GroupAdmin { id, .. } => (None, Some(id)),
            ClientFrame::Open { req, .. }
            | ClientFrame::Conversations { req }
            | ClientFrame::History { req, .. }
            | ClientFrame::Accept { req, .. }
            | ClientFrame::Block { req, .. }
            | ClientFrame::Unblock { req, .. }
            | ClientFrame::Settings { req, .. }
            | ClientFrame::Members { req, .. }
            | ClientFrame::Info { req, .. } => (Some(*req), None),
            ClientFrame::Auth { .. }
            | ClientFrame::Ping
            | ClientFrame::Delivered { .. }
            | ClientFrame::Read { .. }
            | ClientFrame::Typing { .. } => (None, None),
        }
    }

    pub const TYPES: &'static [&'static str] = &[
        "auth",
        "ping",
        "send",
        "delivered",
        "read",
        "typing",
        "open",
        "accept",
        "conversations",
        "history",
        "block",
        "unblock",
        "settings",
        "group_create",
        "group_add",
        "group_remove",
        "group_leave",
        "group_rename",
        "group_admin",
        "members",
        "info",
    ];
}

/// A stored message as delivered to a device.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub conv: ConversationId,
    /// Position in the conversation: 1, 2, 3, ... with no gaps.
    pub seq: i64,
    /// The sender's client-chosen id.
    pub id: MessageId,
    /// Sender's username.
    pub from: String,
    pub from_device: DeviceId,
    /// Server time of the commit, milliseconds since the Unix epoch.
    pub ts: i64,
    /// Opaque to the server. Empty for a membership event.
    pub body: String,
    /// Set for a membership event written by the server (groups): the
    /// change, made by `from`. Such a message has no envelope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<ConvEvent>,
    /// Blobs (files) of this message that were deleted since, by their
    /// sender or the server's retention: in `history` and catch-up pages,
    /// never in a live `msg` (docs/files.md).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted_files: Vec<String>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ConversationSummary {
    pub conv: ConversationId,
    /// `direct` (absent from servers before groups) or `group`.
    #[serde(default)]
    pub kind: ConvKind,
    /// The other member of a direct conversation; absent for a group.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub peer: String,
    /// A group's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Current members, the user included (0 once the user left).
    #[serde(default)]
    pub members: u32,
    /// The user left the group or was removed: the conversation ends at
    /// `last_seq`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub left: bool,
    /// Sequence number of the newest message (0 when empty).
    pub last_seq: i64,
    /// Messages from others after the user's read cursor.
    pub unread: i64,
    /// Commit time of the newest message, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ts: Option<i64>,
    /// A message request: the peer started it and this user has neither
    /// answered nor accepted it (`accept`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub request: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub message: String,
    /// The `ref` of the request this answers, when it had one.
    #[serde(rename = "ref", default, skip_serializing_if = "Option::is_none")]
    pub req: Option<u64>,
    /// The message id of the `send` this answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<MessageId>,
    /// With `devices_changed`: how the send's devices differ from the
    /// members' current devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Box<DeviceDiff>>,
    /// With `rate_limited` and `quota_exceeded`: how long to wait (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

/// Devices a `send` must add (`missing`) and drop (`extra`) to be
/// encrypted for exactly the conversation members' current devices.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct DeviceDiff {
    pub missing: Vec<DeviceId>,
    pub extra: Vec<DeviceId>,
}

impl DeviceDiff {
    /// What `have` lacks of `wanted`, and what it has beyond it.
    pub fn between(wanted: &[i64], have: &[i64]) -> Self {
        let minus = |a: &[i64], b: &[i64]| {
            a.iter()
                .filter(|d| !b.contains(d))
                .map(|&d| DeviceId(d))
                .collect()
        };
        Self {
            missing: minus(wanted, have),
            extra: minus(have, wanted),
        }
    }
}

/// The server's answer to a valid `auth`: who this is and the limits in force.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    pub v: u32,
    pub user: String,
    pub device: DeviceId,
    /// How often the client should send a heartbeat.
    pub heartbeat_ms: u64,
    /// The server closes a connection that sends nothing for this long.
    pub idle_timeout_ms: u64,
    /// Largest message body accepted (larger: `too_large`, the socket stays open).
    pub max_body_bytes: usize,
    /// Largest WebSocket message read at all (larger: `too_large`, then close).
    pub max_frame_bytes: usize,
    /// When this session's token expires; the socket is closed then.
    pub expires_at: i64,
    pub server_time: i64,
    /// The user's settings as they are now (absent from servers before it
    /// was added).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<Settings>,
}

/// A user's settings, shared by all the user's devices.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Whether the user shares read receipts (and sees others').
    pub read_receipts: bool,
}

/// A frame from the server to a client.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Welcome(Welcome),
    Pong,
    /// The message `id` is committed as `seq` of `conv`.
    Sent {
        id: MessageId,
        conv: ConversationId,
        seq: i64,
        ts: i64,
        /// True when this answers a resend of a message already stored and
        /// already in this device's stream: it acknowledges only, and says
        /// nothing about the order of the conversation.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resent: bool,
    },
    Msg(Message),
    /// `user`'s devices have received (`delivered`) / read (`read`) every
    /// message of `conv` up to these sequence numbers. `read` is absent when
    /// read receipts are off on either side.
    Receipt {
        conv: ConversationId,
        user: String,
        delivered: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        read: Option<i64>,
    },
    /// `user` is online, or was last seen at `last_seen` (ms since epoch).
    Presence {
        user: String,
        online: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        last_seen: Option<i64>,
    },
    Typing {
        conv: ConversationId,
        user: String,
    },
    /// Everything this device missed while offline has been sent.
    Synced,
    Conversation {
        #[serde(rename = "ref")]
        req: u64,
        conv: ConversationId,
        peer: String,
    },
    Conversations {
        #[serde(rename = "ref")]
        req: u64,
        items: Vec<ConversationSummary>,
    },
    History {
        #[serde(rename = "ref")]
        req: u64,
        conv: ConversationId,
        messages: Vec<Message>,
    },
    Ok {
        #[serde(rename = "ref")]
        req: u64,
    },
    Members {
        #[serde(rename = "ref")]
        req: u64,
        conv: ConversationId,
        kind: ConvKind,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
        items: Vec<MemberSummary>,
    },
    Info {
        #[serde(rename = "ref")]
        req: u64,
        conv: ConversationId,
        seq: i64,
        /// Every member the message went to, the sender excluded.
        items: Vec<ReceiptInfo>,
    },
    Error(ErrorFrame),
}

impl ErrorFrame {
    /// An error that points at no request (yet).
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorFrame {
            code,
            message: message.into(),
            req: None,
            id: None,
            devices: None,
            retry_after_ms: None,
        }
    }
}

impl ServerFrame {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerFrame::Error(ErrorFrame::new(code, message))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("server frames always serialize")
    }

    pub const TYPES: &'static [&'static str] = &[
        "welcome",
        "pong",
        "sent",
        "msg",
        "receipt",
        "presence",
        "typing",
        "synced",
        "conversation",
        "conversations",
        "history",
        "ok",
        "members",
        "info",
        "error",
    ];
}

/// Why a client frame could not be parsed, with whatever of `ref` and `id`
/// could still be read so that the error frame can point at the request.
#[derive(Debug, Clone, PartialEq)]
pub struct FrameError {
    pub code: ErrorCode,
    pub message: String,
    pub req: Option<u64>,
    pub id: Option<MessageId>,
}

impl From<FrameError> for ErrorFrame {
    fn from(e: FrameError) -> Self {
        ErrorFrame {
            req: e.req,
            id: e.id,
            ..ErrorFrame::new(e.code, e.message)
        }
    }
}

/// Parses a client frame, classifying failures into `bad_json`,
/// `unknown_type` and `bad_frame`. The slow path (a second, loose parse)
/// runs only for frames that fail.
pub fn parse_client_frame(text: &str) -> Result<ClientFrame, FrameError> {
    // serde would also take a JSON array, field by field in declaration
    // order (`["open",5,"bob"]`); a frame is an object. An object's text
    // starts with `{` once leading white space is skipped.
    if !text
        .trim_start_matches([' ', '\t', '\n', '\r'])
        .starts_with('{')
    {
        return Err(FrameError {
            code: ErrorCode::BadJson,
            message: "a frame is a JSON object".into(),
            req: None,
            id: None,
        });
    }
    let err = match serde_json::from_str::<ClientFrame>(text) {
        Ok(frame) => return Ok(frame),
        Err(err) => err,
    };
    #[derive(Deserialize)]
    struct Loose {
        #[serde(rename = "type")]
        kind: Option<serde_json::Value>,
        #[serde(rename = "ref")]
        req: Option<serde_json::Value>,
        id: Option<serde_json::Value>,
    }
    let Ok(loose) = serde_json::from_str::<Loose>(text) else {
        return Err(FrameError {
            code: ErrorCode::BadJson,
            message: format!("not a JSON object: {err}"),
            req: None,
            id: None,
        });
    };
    let req = loose.req.and_then(|v| v.as_u64());
    let id = loose
        .id
        .and_then(|v| v.as_str().and_then(|s| MessageId::new(s).ok()));
    let (code, message) = match loose.kind {
        None => (ErrorCode::BadFrame, "missing field `type`".to_string()),
        Some(serde_json::Value::String(kind)) if !ClientFrame::TYPES.contains(&kind.as_str()) => (
            ErrorCode::UnknownType,
            format!("unknown frame type {kind:?}"),
        ),
        Some(serde_json::Value::String(_)) => (ErrorCode::BadFrame, err.to_string()),
        Some(_) => (ErrorCode::BadFrame, "`type` must be a string".to_string()),
    };
    Err(FrameError {
        code,
        message,
        req,
        id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_send() {
        let f = parse_client_frame(r#"{"type":"send","id":"m1","conv":7,"body":"aGk"}"#).unwrap();
        assert_eq!(
            f,
            ClientFrame::Send {
                id: MessageId::new("m1").unwrap(),
                conv: ConversationId(7),
                body: "aGk".into(),
                blobs: vec![],
            }
        );
    }

    #[test]
    fn classifies_bad_frames() {
        let code = |s: &str| parse_client_frame(s).unwrap_err().code;
        assert_eq!(code("{nope"), ErrorCode::BadJson);
        assert_eq!(code("[1,2]"), ErrorCode::BadJson);
        // An array is not a frame, even one in the fields' order.
        let array = parse_client_frame(r#"["open",5,"bob"]"#).unwrap_err();
        assert_eq!((array.code, array.req), (ErrorCode::BadJson, None));
        assert_eq!(code(r#"[1,2,3]"#), ErrorCode::BadJson);
        assert_eq!(code("  \n\"ping\""), ErrorCode::BadJson);
        assert!(parse_client_frame(" \n {\"type\":\"ping\"}").is_ok());
        assert_eq!(code(r#"{"type":"dance"}"#), ErrorCode::UnknownType);
        assert_eq!(code(r#"{"conv":1}"#), ErrorCode::BadFrame);
        assert_eq!(code(r#"{"type":5}"#), ErrorCode::BadFrame);
        assert_eq!(
            code(r#"{"type":"send","conv":1,"body":"x"}"#),
            ErrorCode::BadFrame
        );
        assert_eq!(
            code(r#"{"type":"send","id":"a b","conv":1,"body":"x"}"#),
            ErrorCode::BadFrame
        );
    }

    #[test]
    fn errors_keep_ref_and_id() {
        let e = parse_client_frame(r#"{"type":"open","ref":9}"#).unwrap_err();
        assert_eq!((e.code, e.req), (ErrorCode::BadFrame, Some(9)));
        let e =
            parse_client_frame(r#"{"type":"send","id":"m2","conv":"x","body":"b"}"#).unwrap_err();
        assert_eq!(e.id, Some(MessageId::new("m2").unwrap()));
    }

    #[test]
    fn type_lists_match_the_enums() {
        let samples = [
            ClientFrame::Auth {
                v: 1,
                token: "t".into(),
            },
            ClientFrame::Ping,
            ClientFrame::Send {
                id: MessageId::new("a").unwrap(),
                conv: ConversationId(1),
                body: String::new(),
                blobs: vec!["AAAAAAAAAAAAAAAAAAAAAA".into()],
            },
            ClientFrame::Delivered {
                conv: ConversationId(1),
                seq: 1,
            },
            ClientFrame::Read {
                conv: ConversationId(1),
                seq: 1,
            },
            ClientFrame::Typing {
                conv: ConversationId(1),
            },
            ClientFrame::Open {
                req: 1,
                peer: "bob".into(),
            },
            ClientFrame::Accept {
                req: 1,
                conv: ConversationId(1),
            },
            ClientFrame::Conversations { req: 1 },
            ClientFrame::History {
                req: 1,
                conv: ConversationId(1),
                before: None,
                limit: 5,
            },
            ClientFrame::Block {
                req: 1,
                user: "bob".into(),
            },
            ClientFrame::Unblock {
                req: 1,
                user: "bob".into(),
            },
            ClientFrame::Settings {
                req: 1,
                read_receipts: false,
            },
            ClientFrame::GroupCreate {
                id: MessageId::new("g").unwrap(),
                name: "Family".into(),
                members: vec!["bob".into()],
            },
            ClientFrame::GroupAdd {
                id: MessageId::new("g").unwrap(),
                conv: ConversationId(1),
                users: vec!["bob".into()],
            },
            ClientFrame::GroupRemove {
                id: MessageId::new("g").unwrap(),
                conv: ConversationId(1),
                users: vec!["bob".into()],
            },
            ClientFrame::GroupLeave {
                id: MessageId::new("g").unwrap(),
                conv: ConversationId(1),
            },
            ClientFrame::GroupRename {
                id: MessageId::new("g").unwrap(),
                conv: ConversationId(1),
                name: "x".into(),
            },
            ClientFrame::GroupAdmin {
                id: MessageId::new("g").unwrap(),
                conv: ConversationId(1),
                users: vec!["bob".into()],
            },
            ClientFrame::Members {
                req: 1,
                conv: ConversationId(1),
            },
            ClientFrame::Info {
                req: 1,
                conv: ConversationId(1),
                seq: 2,
            },
        ];
        assert_eq!(samples.len(), ClientFrame::TYPES.len());
        for (frame, kind) in samples.iter().zip(ClientFrame::TYPES) {
            assert_eq!(frame.kind(), *kind);
            let json = serde_json::to_value(frame).unwrap();
            assert_eq!(json["type"], *kind);
            assert_eq!(&parse_client_frame(&json.to_string()).unwrap(), frame);
        }
    }

    #[test]
    fn server_frames_round_trip() {
        let msg = Message {
            conv: ConversationId(3),
            seq: 2,
            id: MessageId::new("m").unwrap(),
            from: "alice".into(),
            from_device: DeviceId(4),
            ts: 1,
            body: "b".into(),
            event: None,
            deleted_files: vec!["AAAAAAAAAAAAAAAAAAAAAA".into()],
        };
        let frames = [
            ServerFrame::Msg(msg),
            ServerFrame::Synced,
            ServerFrame::error(ErrorCode::Blocked, "no"),
        ];
        for f in frames {
            let back: ServerFrame = serde_json::from_str(&f.to_json()).unwrap();
            assert_eq!(back, f);
        }
        assert_eq!(ServerFrame::Pong.to_json(), r#"{"type":"pong"}"#);
    }
}
