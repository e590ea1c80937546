//! Writing to the socket: frames are queued and flushed in bursts, large
//! ones in fragments, every write bounded in time, and closing with a reason.

use std::time::Duration;

use confab_protocol::{ErrorCode, ErrorFrame, MessageId, ServerFrame};
use confab_store::StoreError;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};

use super::{Closing, Connection, WRITE_TIMEOUT, short_of_memory};
use crate::budget::Meter;
use crate::hub::Kick;
use crate::socket::{
    Bytes, Error as WsError, FRAGMENT_BYTES, Message as WsMessage, Socket, Utf8Bytes,
};

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
        if self.mid_message {
            return Err(Closing::Gone);
        }
        self.unflushed = true;
        if text.len() <= FRAGMENT_BYTES {
            return bounded_write(&self.kick, self.ws.feed(WsMessage::Text(text))).await;
        }
        // Each fragment waits for the one before it to leave the buffer.
        let text = Bytes::from(text);
        let ws = &mut self.ws;
        let fragments = async move {
            let mut opcode = OpCode::Data(Data::Text);
            for start in (0..text.len()).step_by(FRAGMENT_BYTES) {
                let end = (start + FRAGMENT_BYTES).min(text.len());
                let frame = Frame::message(text.slice(start..end), opcode, end == text.len());
                ws.feed(WsMessage::Frame(frame)).await?;
                opcode = OpCode::Data(Data::Continue);
            }
            Ok(())
        };
        let written = bounded_write(&self.kick, fragments).await;
        // Cut off mid-message, the stream can carry no other message.
        self.mid_message = written.is_err();
        written
    }

    pub(super) async fn flush(&mut self) -> Result<(), Closing> {
        if !self.unflushed {
            return Ok(());
        }
        self.unflushed = false;
        bounded_write(&self.kick, self.ws.flush()).await
    }
}

/// Tells the client why (unless a message was cut off mid-way: then only a
/// close frame may follow) and closes.
pub(super) async fn close(ws: &mut Socket, closing: Closing, mid_message: bool) {
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
            if !mid_message {
                ws.send(WsMessage::Text(frame.into())).await?;
            }
            ws.send(WsMessage::Close(Some(CloseFrame {
                code: CloseCode::from(close_code),
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
    write: impl Future<Output = Result<(), WsError>>,
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

/// A read error: an oversized message, a broken WebSocket frame, text that
/// is not UTF-8 and a read the memory budget could not cover get a reason
/// (and their close codes); anything else means the socket is gone.
pub(super) fn read_error(e: WsError, meter: &Meter) -> Closing {
    match e {
        WsError::Capacity(_) => {
            Closing::because(ErrorCode::TooLarge, "frame larger than the server accepts")
        }
        WsError::Protocol(violation) => Closing::because(
            ErrorCode::BadFrame,
            format!("WebSocket protocol error: {violation}"),
        ),
        WsError::Utf8(_) => Closing::because(ErrorCode::BadJson, "text frame is not UTF-8"),
        WsError::Io(_) if meter.starved() => short_of_memory(),
        _ => Closing::Gone,
    }
}
