//! Writing to the socket: frames are queued and flushed in bursts, every
//! write bounded in time, and closing with a reason.

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message as WsMessage, Utf8Bytes, WebSocket};
use confab_protocol::{ErrorCode, ErrorFrame, MessageId, ServerFrame};
use confab_store::StoreError;
use futures_util::SinkExt;

use super::{Closing, Connection, WRITE_TIMEOUT};
use crate::hub::Kick;

impl Connection {
    pub(super) async fn write_error(
        &mut self,
        code: ErrorCode,
        message: impl Into<String>,
        req: Option<u64>,
        id: Option<MessageId>,
    ) -> Result<(), Closing> {
        let error = ErrorFrame {
            req,
            id,
            ..ErrorFrame::new(code, message)
        };
        self.write_frame(&ServerFrame::Error(error)).await
    }

    pub(super) async fn write_frame(&mut self, frame: &ServerFrame) -> Result<(), Closing> {
        self.write_text(frame.to_json().into()).await
    }

    /// Queues a frame; [`Connection::flush`] sends what is queued, so that a
    /// burst of events costs one write to the socket.
    pub(super) async fn write_text(&mut self, text: Utf8Bytes) -> Result<(), Closing> {
        self.unflushed = true;
        bounded_write(&self.kick, self.ws.feed(WsMessage::Text(text))).await
    }

    pub(super) async fn flush(&mut self) -> Result<(), Closing> {
        if !self.unflushed {
            return Ok(());
        }
        self.unflushed = false;
        bounded_write(&self.kick, self.ws.flush()).await
    }
}

pub(super) async fn close(ws: &mut WebSocket, closing: Closing) {
    if let Closing::Because(code, message) = closing {
        let frame = ServerFrame::error(code, message).to_json();
        let close_code = match code {
            ErrorCode::TooLarge => 1009,
            ErrorCode::ShuttingDown => 1001,
            // RFC 6455: a protocol error, and text that is not UTF-8.
            ErrorCode::BadFrame => 1002,
            ErrorCode::BadJson => 1007,
            _ => 1008,
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            ws.send(WsMessage::Text(frame.into())).await?;
            ws.send(WsMessage::Close(Some(CloseFrame {
                code: close_code,
                reason: Utf8Bytes::from(code.as_str()),
            })))
            .await
        })
        .await;
    }
}

/// A socket write that gives up when the client stops reading, or when the
/// connection is kicked meanwhile: a kick (say, for a full event queue) must
/// not wait behind a socket the client no longer reads.
pub(super) async fn bounded_write(
    kick: &Kick,
    write: impl Future<Output = Result<(), axum::Error>>,
) -> Result<(), Closing> {
    tokio::select! {
        written = tokio::time::timeout(WRITE_TIMEOUT, write) => match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Closing::Gone),
            Err(_) => Err(Closing::because(ErrorCode::TooSlow, "the client is not reading")),
        },
        reason = kick.kicked() => Err(Closing::because(reason, kick_message(reason))),
    }
}

/// The store failed where the connection cannot go on without it.
pub(super) fn storage_closing(error: StoreError, message: &str) -> Closing {
    tracing::error!(%error, "store read failed; closing the connection");
    Closing::because(ErrorCode::StorageUnavailable, message)
}

pub(super) fn kick_message(reason: ErrorCode) -> &'static str {
    match reason {
        ErrorCode::TooSlow => "the connection could not keep up; reconnect to catch up",
        ErrorCode::DeviceRemoved => "this device was removed",
        ErrorCode::Unauthorized => "the session was ended",
        ErrorCode::ShuttingDown => "the server is shutting down",
        ErrorCode::Replaced => "a newer connection of this device took this one's place",
        _ => "closed by the server",
    }
}

/// A read error: an oversized message, a broken WebSocket frame and text
/// that is not UTF-8 get a reason (and their close codes); anything else
/// means the socket is gone.
pub(super) fn read_error(e: axum::Error) -> Closing {
    use tokio_tungstenite::tungstenite::Error;
    let inner = e.into_inner();
    match inner.downcast_ref::<Error>() {
        Some(Error::Capacity(_)) => {
            Closing::because(ErrorCode::TooLarge, "frame larger than the server accepts")
        }
        Some(Error::Protocol(violation)) => Closing::because(
            ErrorCode::BadFrame,
            format!("WebSocket protocol error: {violation}"),
        ),
        Some(Error::Utf8(_)) => Closing::because(ErrorCode::BadJson, "text frame is not UTF-8"),
        _ => Closing::Gone,
    }
}
