use std::fmt;

use serde::{Deserialize, Serialize};

/// Machine-readable error codes, shared by WebSocket error frames and HTTP
/// error bodies. Clients match on these, never on the human message.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame was not valid JSON.
    BadJson,
    /// Valid JSON, but a field is missing, has the wrong type or an invalid value.
    BadFrame,
    /// The `type` names no frame this server knows.
    UnknownType,
    /// The client's protocol version is not spoken here.
    UnsupportedVersion,
    /// No valid session: bad token, or a frame before `auth`.
    Unauthorized,
    /// The session token has expired; log in again (the device is kept).
    TokenExpired,
    /// The frame or message body is larger than the server allows.
    TooLarge,
    /// Too many frames too fast; the frame was dropped.
    RateLimited,
    /// The conversation does not exist or the user is not in it.
    NotMember,
    /// No user with that name.
    UnknownUser,
    /// One of the two users has blocked the other.
    Blocked,
    /// The message could not be stored; it was not accepted. Retry with the same id.
    StorageUnavailable,
    /// A conversation with oneself.
    SelfConversation,
    /// Authentication did not complete in time.
    AuthTimeout,
    /// No frame (not even a heartbeat) arrived within the idle timeout.
    IdleTimeout,
    /// HTTP: the request body did not arrive in time.
    RequestTimeout,
    /// The server is shutting down.
    ShuttingDown,
    /// The connection could not keep up with what it was sent; reconnect to catch up.
    TooSlow,
    /// This device was removed or logged out.
    DeviceRemoved,
    /// HTTP: the username breaks the naming rules.
    InvalidUsername,
    /// HTTP: the password is too short or too long.
    WeakPassword,
    /// HTTP: the username is already registered.
    UsernameTaken,
    /// HTTP: unknown user or wrong password (deliberately not saying which).
    InvalidCredentials,
    /// HTTP: too many password checks at once; try again shortly.
    Busy,
    /// HTTP: too many open connections.
    TooManyConnections,
    /// HTTP: a browser origin not on the allowlist.
    ForbiddenOrigin,
    /// HTTP: no such resource.
    NotFound,
    /// A `send` was not encrypted for exactly the current devices of the
    /// conversation's members; the error frame lists the difference. Fetch
    /// the device lists, check them, and resend under the same id.
    DevicesChanged,
    /// A `send` body is not a well-formed envelope from this device.
    BadEnvelope,
    /// This device is not on its user's signed device list: another device
    /// of the user must approve it (or the user resets), before it can send.
    DeviceNotListed,
    /// HTTP: a device list that is malformed, badly signed, or names devices
    /// that are not the user's or with other keys.
    BadDeviceList,
    /// HTTP: the device list's epoch is not the next one; fetch and rebuild.
    StaleDeviceList,
    /// HTTP: login with keys other than those this device registered.
    KeysMismatch,
    /// HTTP: a device on the signed list is removed by signing a list without
    /// it, not by a bare request.
    ListedDevice,
    /// HTTP: the account has as many devices waiting for approval as it may.
    TooManyDevices,
    /// The user's message bytes for today are used up (`retry_after_ms`
    /// says when they renew).
    QuotaExceeded,
    /// A newer connection of this device took this socket's place (a
    /// device keeps at most a few open).
    Replaced,
    /// A `send` into a message request the recipient has not accepted,
    /// past the few messages allowed until then.
    NotAccepted,
    /// A `send` lists a blob that is not a complete upload of the sender's
    /// (the same whether it exists or not), or too many blobs.
    UnknownBlob,
    /// HTTP: a blob request that breaks tus 1.0 or the blob rules: a
    /// missing or malformed header, an offset other than the upload's, a
    /// body past its length, a range outside the file (docs/files.md).
    BadUpload,
    /// HTTP: a file its sender deleted, or that the server's retention
    /// removed; the message that announced it stays (docs/files.md).
    FileDeleted,
    /// A group change only an admin of the group may make.
    NotAdmin,
    /// A group change asked of a one-to-one conversation.
    NotAGroup,
    /// The group would have more members than the server allows.
    TooManyMembers,
    /// The group change would change nothing (they are members already,
    /// the name is the same, ...).
    NoChange,
    /// A server-side fault that is not the client's doing.
    Internal,
}

impl ErrorCode {
    /// Every code, for documentation checks and exhaustive tests.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::BadJson,
        ErrorCode::BadFrame,
        ErrorCode::UnknownType,
        ErrorCode::UnsupportedVersion,
        ErrorCode::Unauthorized,
        ErrorCode::TokenExpired,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::NotMember,
        ErrorCode::UnknownUser,
        ErrorCode::Blocked,
        ErrorCode::StorageUnavailable,
        ErrorCode::SelfConversation,
        ErrorCode::AuthTimeout,
        ErrorCode::IdleTimeout,
        ErrorCode::RequestTimeout,
        ErrorCode::ShuttingDown,
        ErrorCode::TooSlow,
        ErrorCode::DeviceRemoved,
        ErrorCode::InvalidUsername,
        ErrorCode::WeakPassword,
        ErrorCode::UsernameTaken,
        ErrorCode::InvalidCredentials,
        ErrorCode::Busy,
        ErrorCode::TooManyConnections,
        ErrorCode::ForbiddenOrigin,
        ErrorCode::NotFound,
        ErrorCode::DevicesChanged,
        ErrorCode::BadEnvelope,
        ErrorCode::DeviceNotListed,
        ErrorCode::BadDeviceList,
        ErrorCode::StaleDeviceList,
        ErrorCode::KeysMismatch,
        ErrorCode::ListedDevice,
        ErrorCode::TooManyDevices,
        ErrorCode::QuotaExceeded,
        ErrorCode::Replaced,
        ErrorCode::NotAccepted,
        ErrorCode::UnknownBlob,
        ErrorCode::BadUpload,
        ErrorCode::FileDeleted,
        ErrorCode::NotAdmin,
        ErrorCode::NotAGroup,
        ErrorCode::TooManyMembers,
        ErrorCode::NoChange,
        ErrorCode::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotMember => "not_member",
            ErrorCode::UnknownUser => "unknown_user",
            ErrorCode::Blocked => "blocked",
            ErrorCode::StorageUnavailable => "storage_unavailable",
            ErrorCode::SelfConversation => "self_conversation",
            ErrorCode::AuthTimeout => "auth_timeout",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::ShuttingDown => "shutting_down",
            ErrorCode::TooSlow => "too_slow",
            ErrorCode::DeviceRemoved => "device_removed",
            ErrorCode::InvalidUsername => "invalid_username",
            ErrorCode::WeakPassword => "weak_password",
            ErrorCode::UsernameTaken => "username_taken",
            ErrorCode::InvalidCredentials => "invalid_credentials",
            ErrorCode::Busy => "busy",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::ForbiddenOrigin => "forbidden_origin",
            ErrorCode::NotFound => "not_found",
            ErrorCode::DevicesChanged => "devices_changed",
            ErrorCode::BadEnvelope => "bad_envelope",
            ErrorCode::DeviceNotListed => "device_not_listed",
            ErrorCode::BadDeviceList => "bad_device_list",
            ErrorCode::StaleDeviceList => "stale_device_list",
            ErrorCode::KeysMismatch => "keys_mismatch",
            ErrorCode::ListedDevice => "listed_device",
            ErrorCode::TooManyDevices => "too_many_devices",
            ErrorCode::QuotaExceeded => "quota_exceeded",
            ErrorCode::Replaced => "replaced",
            ErrorCode::NotAccepted => "not_accepted",
            ErrorCode::UnknownBlob => "unknown_blob",
            ErrorCode::BadUpload => "bad_upload",
            ErrorCode::FileDeleted => "file_deleted",
            ErrorCode::NotAdmin => "not_admin",
            ErrorCode::NotAGroup => "not_a_group",
            ErrorCode::TooManyMembers => "too_many_members",
            ErrorCode::NoChange => "no_change",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn as_str_matches_serde() {
        for &code in ErrorCode::ALL {
            assert_eq!(
                serde_json::to_string(&code).unwrap(),
                format!("\"{}\"", code.as_str())
            );
        }
    }
}
