//! confab's client library: the account API over HTTP ([`account`]) and one
//! authenticated WebSocket ([`Client`]) that delivers [`Event`]s in order and
//! exactly once per conversation, confirms delivery as it reads, and keeps
//! the heartbeat. The CLI, the integration tests and the benchmark all use it.

pub mod account;
pub mod blobs;
mod client;
pub mod e2e;
pub mod files;
mod groups;

pub use account::ServerUrl;
pub use client::{Client, ConnectOptions, Event, Events, Sent, SyncState, new_message_id};
pub use confab_protocol::Welcome;
pub use groups::MemberList;

use confab_protocol::{ApiError, ErrorFrame};

#[derive(Debug, thiserror::Error, Clone)]
pub enum ClientError {
    /// The HTTP API answered with an error.
    #[error("{} ({status}): {}", error.code, error.message)]
    Api { status: u16, error: ApiError },
    /// The server answered a WebSocket request with an error frame.
    #[error("{}: {}", .0.code, .0.message)]
    Server(ErrorFrame),
    /// The connection closed before the answer came.
    #[error("disconnected: {0}")]
    Disconnected(String),
    #[error("network: {0}")]
    Io(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("{0}")]
    Usage(String),
    /// Encryption or verification failed on this side.
    #[error("encryption: {0}")]
    Crypto(String),
    /// The user's devices changed without a valid signature from their old
    /// devices (a reset, or the server's doing): nothing is sent to them
    /// until the change is accepted.
    #[error(
        "{0}'s keys changed; compare safety numbers (`confab keys {0}`) and accept the change to go on"
    )]
    KeyChanged(String),
}

impl ClientError {
    /// Whether asking again later may succeed: the network, the server
    /// busy or unavailable, a rate limit. Everything else is an answer.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Io(_) | ClientError::Disconnected(_) => true,
            ClientError::Api { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

impl ClientError {
    /// The machine-readable code, when the server gave one.
    pub fn code(&self) -> Option<confab_protocol::ErrorCode> {
        match self {
            ClientError::Api { error, .. } => Some(error.code),
            ClientError::Server(frame) => Some(frame.code),
            _ => None,
        }
    }
}
