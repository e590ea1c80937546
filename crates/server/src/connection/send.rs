//! `send`: the checks before the store, and what happens when the commit
//! (or the cursor update of `delivered`/`read`) comes back.

use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use confab_crypto::Envelope;
use confab_protocol::{ConversationId, DeviceDiff, ErrorCode, ErrorFrame, MessageId, ServerFrame};
use confab_store::{Appended, CursorUpdate, NewMessage, UserId};

use super::{Closing, Completed, Connection, Fault, refuse};
use crate::hub::{Delivery, Event, Receipt};

impl Connection {
    pub(super) async fn on_send(
        &mut self,
        id: MessageId,
        conv: ConversationId,
        body: String,
    ) -> Result<(), Fault> {
        let max = self.state.config.max_body_bytes;
        if body.len() > max {
            return Err(refuse(
                ErrorCode::TooLarge,
                format!("message bodies are at most {max} bytes"),
            ));
        }
        let accepted_at = Instant::now();
        let info = self.conv_info(conv).await?;
        if info.blocked {
            return Err(refuse(
                ErrorCode::Blocked,
                "messages cannot pass between these users",
            ));
        }
        let members = info.members.clone();
        self.check_envelope(&body, &members).await?;
        let message = NewMessage {
            conv,
            sender: self.user,
            sender_name: self.username.clone(),
            sender_device: self.device,
            client_id: id.clone(),
            body,
        };
        let store = self.state.store.clone();
        self.pending.push_back(Box::pin(async move {
            let result = store.append(message).await;
            Completed::Append {
                id,
                conv,
                members,
                accepted_at,
                result,
            }
        }));
        Ok(())
    }

    /// The server cannot read a message, but it makes sure the sender
    /// encrypted it for every current device of every member and no other:
    /// a device added to a list is never silently left out, and a device
    /// taken off one is never written to again.
    pub(super) async fn check_envelope(
        &mut self,
        body: &str,
        members: &[UserId],
    ) -> Result<(), Fault> {
        let bad = |why: &str| refuse(ErrorCode::BadEnvelope, format!("bad envelope: {why}"));
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| bad("the body is not base64url"))?;
        let envelope = Envelope::parse(&bytes).map_err(|e| bad(&e.to_string()))?;
        if envelope.sender_device() != self.device.0 {
            return Err(bad("it names another sender device"));
        }
        let directory = &self.state.directory;
        let store = &*self.state.store;
        let mut expected = Vec::with_capacity(4);
        for &member in members {
            let devices = directory.devices(store, member).await?;
            if member == self.user && !devices.contains(&self.device) {
                return Err(refuse(
                    ErrorCode::DeviceNotListed,
                    "this device is not on your signed device list yet: approve it from another of your devices",
                ));
            }
            expected.extend(devices.iter().map(|d| d.0));
        }
        expected.sort_unstable();
        // Both ascending: the envelope's order is checked by its parser.
        if envelope.devices().eq(expected.iter().copied()) {
            return Ok(());
        }
        let wrapped: Vec<i64> = envelope.devices().collect();
        Err(Fault::Refused(ErrorFrame {
            devices: Some(DeviceDiff::between(&expected, &wrapped)),
            ..ErrorFrame::new(
                ErrorCode::DevicesChanged,
                "encrypt for exactly the current devices of the members",
            )
        }))
    }

    pub(super) async fn on_cursor(
        &mut self,
        conv: ConversationId,
        delivered: i64,
        read: i64,
    ) -> Result<(), Fault> {
        if delivered < 0 {
            return Err(refuse(ErrorCode::BadFrame, "seq must not be negative"));
        }
        self.conv_info(conv).await?;
        let update = CursorUpdate {
            conv,
            user: self.user,
            device: self.device,
            delivered,
            read,
        };
        let store = self.state.store.clone();
        self.pending.push_back(Box::pin(async move {
            Completed::Cursor {
                conv,
                result: store.advance_cursors(update).await,
            }
        }));
        Ok(())
    }

    /// A commit came back: publish it, then answer. Publishing never
    /// depends on this socket still working, so whatever the store accepted
    /// is forwarded even if the sender vanished meanwhile.
    pub(super) async fn completed(&mut self, done: Completed) -> Result<(), Closing> {
        match done {
            Completed::Append {
                id,
                conv,
                members,
                accepted_at,
                result,
            } => match result {
                Ok(Appended::New {
                    message,
                    first_from_sender,
                }) => {
                    // Published before anything else, and whatever the state
                    // of this socket: the store has accepted it.
                    self.state.meters.accepted.increment(1);
                    let delivery = Arc::new(Delivery::new(&message, accepted_at));
                    self.state
                        .router
                        .deliver(&members, Event::Message(delivery));
                    let peer = match self.convs.get_mut(&conv) {
                        Some(info) => {
                            info.i_have_sent = true;
                            info.peer.clone()
                        }
                        None => None,
                    };
                    if first_from_sender
                        && let (Some(presence), Some(peer)) = (self.state.presence.clone(), peer)
                        && presence.is_online(self.user).await
                    {
                        // The peer may see this user's presence from now on.
                        let event = self.presence_event(true, None);
                        self.state.router.deliver(&[peer.user], event);
                    }
                    Ok(())
                }
                Ok(Appended::Duplicate(original)) => {
                    let m = original.message;
                    // Not written on this socket yet (and this device's own,
                    // and the session still valid): write it in its place in
                    // the stream. Otherwise acknowledge only.
                    if m.from_device == self.device
                        && m.seq > self.watermark(m.conv)
                        && !self.session_ended
                    {
                        self.fill_gap(m.conv, m.seq).await
                    } else {
                        self.write_frame(&ServerFrame::Sent {
                            id: m.id,
                            conv: m.conv,
                            seq: m.seq,
                            ts: m.ts,
                            resent: true,
                        })
                        .await
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "message not stored");
                    self.write_error(
                        ErrorCode::StorageUnavailable,
                        "the message was not stored; resend it with the same id",
                        None,
                        Some(id),
                    )
                    .await
                }
            },
            Completed::Cursor { conv, result } => match result {
                Ok(cursors) if cursors.advanced() => {
                    let receipt = Arc::new(Receipt {
                        conv,
                        user: self.user,
                        username: self.username.clone(),
                        delivered: cursors.delivered,
                        read: cursors.read,
                        shares_read: self.read_receipts,
                    });
                    // Others care when either cursor they may see moved; this
                    // user's own devices only about reading (unread counts).
                    let others_see =
                        cursors.delivered_advanced || (cursors.read_advanced && self.read_receipts);
                    let me = self.user;
                    let mut targets: Vec<UserId> = match self.conv_info(conv).await {
                        Ok(info) if !info.blocked && others_see => {
                            info.members.iter().copied().filter(|u| *u != me).collect()
                        }
                        _ => Vec::new(),
                    };
                    if cursors.read_advanced {
                        targets.push(self.user);
                    }
                    if !targets.is_empty() {
                        self.state.router.deliver(&targets, Event::Receipt(receipt));
                    }
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(e) => {
                    tracing::error!(error = %e, "cursor not stored");
                    self.write_error(
                        ErrorCode::StorageUnavailable,
                        "receipt not stored; send it again",
                        None,
                        None,
                    )
                    .await
                }
            },
        }
    }
}
