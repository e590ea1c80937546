//! confab's wire protocol: the JSON frames exchanged over the WebSocket, the
//! JSON bodies of the HTTP account API, ids and error codes.
//!
//! This crate does no I/O and knows nothing of storage; `docs/protocol.md` is
//! its prose counterpart and must change with it.

mod error;
mod frames;
mod group;
mod http;
mod ids;
pub mod text;

pub use error::ErrorCode;
pub use frames::{
    ClientFrame, ConversationSummary, DeviceDiff, ErrorFrame, FrameError, Message, ServerFrame,
    Settings, Welcome, parse_client_frame,
};
pub use group::{
    ConvEvent, ConvKind, MAX_GROUP_NAME_BYTES, MemberSummary, ReceiptInfo, Role, valid_group_name,
};
pub use http::{
    ApiError, DeviceInfo, DeviceListsResponse, LoginRequest, LoginResponse, PasswordChangeRequest,
    RegisterRequest, RegisterResponse, ResetRequest,
};
pub use ids::{ConversationId, DeviceId, InvalidId, MessageId, Username};

/// The protocol version this build speaks. A client names the version it
/// speaks in its first frame (`auth`); the server answers with the same
/// number in `welcome` or refuses with `unsupported_version`.
///
/// Version 2: message bodies are end-to-end encrypted envelopes
/// (docs/encryption.md), checked against the members' device lists.
pub const PROTOCOL_VERSION: u32 = 2;

/// Path of the WebSocket endpoint.
pub const WS_PATH: &str = "/v1/ws";

/// Blobs one message may refer to.
pub const MAX_BLOBS_PER_MESSAGE: usize = 32;

#[cfg(test)]
mod doc_tests {
    /// docs/protocol.md is what clients are written from: it must name
    /// every frame type and every error code.
    #[test]
    fn the_protocol_document_covers_every_frame_and_error_code() {
        let doc = include_str!("../../../docs/protocol.md");
        let types = crate::ClientFrame::TYPES
            .iter()
            .chain(crate::ServerFrame::TYPES);
        for name in types
            .copied()
            .chain(crate::ErrorCode::ALL.iter().map(|c| c.as_str()))
        {
            assert!(
                doc.contains(&format!("`{name}`")),
                "docs/protocol.md does not mention `{name}`"
            );
        }
    }
}
