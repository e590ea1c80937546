//! `send`: the checks before the store, and what happens when its commit
//! comes back.
//!
//! Every `send` frame gets exactly one answer with its id: `sent` (new, and
//! then also the message's place in this device's stream), `sent` with
//! `resent: true` (a resend: an acknowledgement only), or an `error`. A
//! resend is recognised before any other check, in the store's commit and
//! before a refusal here, so it always gets its original.

use std::sync::Arc;
use std::time::Instant;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use confab_crypto::Envelope;
use confab_protocol::{
    ConversationId, DeviceDiff, ErrorCode, ErrorFrame, MAX_BLOBS_PER_MESSAGE, MessageId,
    ServerFrame,
};
use confab_store::{Appended, NewMessage, OverQuota, StoreError, StoredMessage, UserId};

use futures_util::StreamExt;
use futures_util::stream::FuturesOrdered;

use super::{Closing, Completed, Connection, Fault, Order, Pending, refuse, throttled};
use crate::AppState;
use crate::blobs::Blobs;
use crate::hub::{Delivery, Event};

/// A `send` whose commit came back.
pub(super) struct AppendDone {
    pub id: MessageId,
    pub conv: ConversationId,
    /// The devices the envelope was sealed for, to say what changed if the
    /// commit finds a newer device list.
    pub wrapped: Vec<i64>,
    pub accepted_at: Instant,
    pub result: Result<Appended, StoreError>,
}

/// What a `send` was checked against.
struct Checked {
    wrapped: Vec<i64>,
    device_epochs: Vec<(UserId, i64)>,
}

/// Base64url characters one key wrap adds to a body (88 bytes each,
/// docs/encryption.md): what a body may hold beyond `max_body_bytes`, so
/// that the limit is the same for a group of 100 as for two.
pub(super) const WRAP_CHARS: usize = 88 * 4 / 3 + 1;
/// Wraps an envelope may have at most (docs/encryption.md).
pub(super) const MAX_WRAPS: usize = 1024;

/// The user's send rate or daily bytes, across all its connections.
/// The same answer whether a listed blob does not exist, is someone else's
/// or is not complete yet, so that ids cannot be probed through `send`.
fn unknown_blob() -> ErrorFrame {
    ErrorFrame::new(
        ErrorCode::UnknownBlob,
        format!(
            "a message may list at most {MAX_BLOBS_PER_MESSAGE} blobs, each a complete upload of yours"
        ),
    )
}

fn over_quota(OverQuota { retry_after_ms }: OverQuota) -> ErrorFrame {
    ErrorFrame {
        retry_after_ms: Some(retry_after_ms.max(1) as u64),
        ..ErrorFrame::new(
            ErrorCode::QuotaExceeded,
            "you have sent as many bytes as you may today",
        )
    }
}

impl Connection {
    pub(super) async fn on_send(
        &mut self,
        id: MessageId,
        conv: ConversationId,
        body: String,
        blobs: Vec<String>,
    ) -> Result<(), Fault> {
        let accepted_at = Instant::now();
        let checked = match self.check_send(conv, &body, &blobs).await {
            Ok(checked) => checked,
            Err(Fault::Refused(refusal)) => {
                // Whatever changed since the first attempt (a block, a lower
                // body limit, a new device list), a resend of a stored
                // message is answered with its original.
                return match self.state.store.sent_message(self.user, &id).await? {
                    Some(original) => Ok(self.answer_resend(original).await?),
                    None => Err(Fault::Refused(refusal)),
                };
            }
            Err(close) => return Err(close),
        };
        let message = NewMessage {
            conv,
            sender: self.user,
            sender_name: self.username.clone(),
            sender_device: self.device,
            client_id: id.clone(),
            body,
            device_epochs: checked.device_epochs,
            // The store knows whether the peer has accepted; its answer for
            // a conversation everyone accepted is cached.
            unanswered_limit: Some(self.state.limits.config().request_messages),
            daily_bytes: Some(self.state.limits.config().bytes_per_day),
            blobs,
        };
        let store = self.state.store.clone();
        // The frame's bytes stay charged to the budget until committed.
        let charge = self.charge.take();
        self.queue(Order::Kept, async move {
            let result = store.append(message).await;
            drop(charge);
            Completed::Append(Box::new(AppendDone {
                id,
                conv,
                wrapped: checked.wrapped,
                accepted_at,
                result,
            }))
        });
        Ok(())
    }

    /// The checks in the order `docs/protocol.md` gives them.
    async fn check_send(
        &mut self,
        conv: ConversationId,
        body: &str,
        blobs: &[String],
    ) -> Result<Checked, Fault> {
        let max = self.state.config.max_body_bytes;
        let too_large = || {
            refuse(
                ErrorCode::TooLarge,
                format!("message bodies are at most {max} bytes, besides their key wraps"),
            )
        };
        if body.len() > max + MAX_WRAPS * WRAP_CHARS {
            return Err(too_large());
        }
        // Whether each blob is the sender's and complete, the commit checks.
        if blobs.len() > MAX_BLOBS_PER_MESSAGE || !blobs.iter().all(|b| Blobs::valid_id(b)) {
            return Err(Fault::Refused(unknown_blob()));
        }
        let info = self.current_conv(conv).await?;
        if info.blocked() {
            return Err(refuse(
                ErrorCode::Blocked,
                "messages cannot pass between these users",
            ));
        }
        let members = info.members.clone();
        let (wrapped, device_epochs) = self.check_envelope(body, &members).await?;
        // Last, so that only what would be stored counts against the user
        // (its bytes of the day, the commit counts).
        self.state.limits.message(self.user).await.map_err(|wait| {
            throttled(
                ErrorCode::RateLimited,
                "you are sending too fast; slow down",
                wait,
            )
        })?;
        Ok(Checked {
            wrapped,
            device_epochs,
        })
    }

    /// The server cannot read a message, but it makes sure the sender
    /// encrypted it for every current device of every member and no other:
    /// a device added to a list is never silently left out, and a device
    /// taken off one is never written to again. Returns the wrapped devices
    /// and the list epochs checked against, which the store's commit checks
    /// again (the lists here may lag behind the store).
    async fn check_envelope(
        &mut self,
        body: &str,
        members: &[UserId],
    ) -> Result<(Vec<i64>, Vec<(UserId, i64)>), Fault> {
        let bad = |why: &str| refuse(ErrorCode::BadEnvelope, format!("bad envelope: {why}"));
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| bad("the body is not base64url"))?;
        let envelope = Envelope::parse(&bytes).map_err(|e| bad(&e.to_string()))?;
        if envelope.sender_device() != self.device.0 {
            return Err(bad("it names another sender device"));
        }
        let wrapped: Vec<i64> = envelope.devices().collect();
        let max = self.state.config.max_body_bytes;
        if body.len() > max + wrapped.len() * WRAP_CHARS {
            return Err(refuse(
                ErrorCode::TooLarge,
                format!("message bodies are at most {max} bytes, besides their key wraps"),
            ));
        }
        // Both ascending: the envelope's order is checked by its parser.
        let (expected, epochs) = self.expected_devices(members).await?;
        if wrapped == expected {
            return Ok((wrapped, epochs));
        }
        // What this node holds may be the stale one (a read that raced a
        // new list): look again before refusing a sender that may be right.
        let (expected, epochs) = self.expected_devices_from_store(members).await?;
        if wrapped == expected {
            return Ok((wrapped, epochs));
        }
        Err(devices_changed(&expected, &wrapped))
    }

    /// [`Connection::expected_devices`] after dropping what this node holds
    /// of the members' lists: for when they may be stale.
    async fn expected_devices_from_store(
        &mut self,
        members: &[UserId],
    ) -> Result<(Vec<i64>, Vec<(UserId, i64)>), Fault> {
        for member in members {
            self.state.directory.forget(*member);
        }
        self.expected_devices(members).await
    }

    /// Every listed device of every member, ascending, and the epoch of each
    /// member's list.
    async fn expected_devices(
        &mut self,
        members: &[UserId],
    ) -> Result<(Vec<i64>, Vec<(UserId, i64)>), Fault> {
        let directory = &self.state.directory;
        let store = &*self.state.store;
        let mut expected = Vec::with_capacity(4);
        let mut epochs = Vec::with_capacity(members.len());
        for &member in members {
            let list = directory.current(store, member).await?;
            if member == self.user && !list.devices.contains(&self.device) {
                return Err(refuse(
                    ErrorCode::DeviceNotListed,
                    "this device is not on your signed device list yet: approve it from another of your devices",
                ));
            }
            expected.extend(list.devices.iter().map(|d| d.0));
            epochs.push((member, list.epoch));
        }
        expected.sort_unstable();
        Ok((expected, epochs))
    }

    /// A `send` came back from the store: publish it, then answer.
    /// Publishing never depends on this socket still working, so whatever
    /// the store accepted is forwarded even if the sender vanished meanwhile.
    pub(super) async fn appended(&mut self, done: AppendDone) -> Result<(), Closing> {
        match done.result {
            Ok(Appended::New {
                message,
                first_from_sender,
                members,
            }) => {
                // Published before anything else, and whatever the state of
                // this socket: the store has accepted it, and says who gets
                // it as of its commit. This connection's own `sent` comes
                // back through the hub like everyone's `msg`.
                publish(&self.state, &members, &message, done.accepted_at);
                if message.message.event.is_some() {
                    // A group change is not writing: it shows no presence.
                    return Ok(());
                }
                let (audience, newly_accepted) = match self.convs.get_mut(&done.conv) {
                    Some(info) => {
                        info.i_have_sent = true;
                        (info.audience(self.user), !info.i_accepted)
                    }
                    None => (Vec::new(), false),
                };
                if newly_accepted {
                    // A reply accepts a request.
                    self.accepted(done.conv).await;
                }
                if first_from_sender
                    && !audience.is_empty()
                    && let Some(presence) = self.state.presence.clone()
                    && presence.is_online(self.user).await
                {
                    // The others may see this user's presence from now on.
                    let event = self.presence_event(true, None);
                    self.state.router.deliver(&audience, event);
                }
                Ok(())
            }
            Ok(Appended::NotMember) => {
                self.convs.remove(&done.conv);
                let error = ErrorFrame {
                    id: Some(done.id),
                    ..ErrorFrame::new(
                        ErrorCode::NotMember,
                        "you are no longer a member of this conversation",
                    )
                };
                self.write_frame(&ServerFrame::Error(error)).await
            }
            Ok(Appended::Group(refusal)) => {
                let error = ErrorFrame {
                    id: Some(done.id),
                    ..super::groups::refusal(refusal)
                };
                self.write_frame(&ServerFrame::Error(error)).await
            }
            Ok(Appended::Duplicate(original)) => self.answer_resend(original).await,
            Ok(Appended::NotAccepted) => {
                let limit = self.state.limits.config().request_messages;
                let error = ErrorFrame {
                    id: Some(done.id),
                    ..ErrorFrame::new(
                        ErrorCode::NotAccepted,
                        format!(
                            "they have not accepted this conversation yet; until they answer, you can send {limit} messages"
                        ),
                    )
                };
                self.write_frame(&ServerFrame::Error(error)).await
            }
            Ok(Appended::OverQuota(over)) => {
                let error = ErrorFrame {
                    id: Some(done.id),
                    ..over_quota(over)
                };
                self.write_frame(&ServerFrame::Error(error)).await
            }
            Ok(Appended::UnknownBlob) => {
                let error = ErrorFrame {
                    id: Some(done.id),
                    ..unknown_blob()
                };
                self.write_frame(&ServerFrame::Error(error)).await
            }
            Ok(Appended::DevicesChanged) => {
                // A list or a member changed between the check here and the
                // commit: what this node holds of them is stale.
                self.convs.remove(&done.conv);
                let refusal = match self.current_conv(done.conv).await {
                    Ok(info) => {
                        let members = info.members.clone();
                        match self.expected_devices_from_store(&members).await {
                            Ok((expected, _)) => devices_changed(&expected, &done.wrapped),
                            Err(fault) => fault,
                        }
                    }
                    Err(fault) => fault,
                };
                match refusal {
                    Fault::Refused(error) => {
                        let error = ErrorFrame {
                            id: Some(done.id),
                            ..error
                        };
                        self.write_frame(&ServerFrame::Error(error)).await
                    }
                    Fault::Close(closing) => Err(closing),
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "message not stored");
                self.write_error(
                    ErrorCode::StorageUnavailable,
                    "the message was not stored; resend it with the same id",
                    None,
                    Some(done.id),
                )
                .await
            }
        }
    }

    /// Answers a resend of a stored message with `sent` and `resent: true`.
    /// If the original is this device's own and not yet in this socket's
    /// stream (its `sent` is still on its way through the hub, because both
    /// attempts were in flight at once; or an earlier connection gave up
    /// waiting for its commit), the stream is written up to and including
    /// it first, so that it keeps its place and the first attempt its answer.
    pub(super) async fn answer_resend(&mut self, original: StoredMessage) -> Result<(), Closing> {
        let m = &original.message;
        if m.from_device == self.device && m.seq > self.watermark(m.conv) && !self.session_ended {
            let delivery = Delivery::new(&original, Instant::now());
            self.deliver_in_order(&delivery).await?;
        }
        let m = original.message;
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

/// Publishes the messages of a closed connection's commits that came back
/// after its drain gave up waiting. Receipts of cursor moves among them are
/// not published: peers see those cursors at their next sync or receipt.
pub(super) async fn publish_late(state: AppState, mut pending: FuturesOrdered<Pending>) {
    let mut published = 0;
    while let Some(done) = pending.next().await {
        if let Completed::Append(done) = done
            && let AppendDone {
                accepted_at,
                result:
                    Ok(Appended::New {
                        message, members, ..
                    }),
                ..
            } = *done
        {
            publish(&state, &members, &message, accepted_at);
            published += 1;
        }
    }
    tracing::info!(
        published,
        "commits that outlived a connection's drain published"
    );
}

/// Hands a committed message to every connection of every member.
pub(super) fn publish(
    state: &AppState,
    members: &[UserId],
    message: &StoredMessage,
    accepted_at: Instant,
) {
    state.meters.accepted.increment(1);
    let delivery = Arc::new(Delivery::new(message, accepted_at));
    state.router.deliver(members, Event::Message(delivery));
}

fn devices_changed(expected: &[i64], wrapped: &[i64]) -> Fault {
    Fault::Refused(ErrorFrame {
        devices: Some(Box::new(DeviceDiff::between(expected, wrapped))),
        ..ErrorFrame::new(
            ErrorCode::DevicesChanged,
            "encrypt for exactly the current devices of the members",
        )
    })
}
