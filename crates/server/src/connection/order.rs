//! In-order delivery: each conversation is written to the socket in seq
//! order, each message once, whatever order events arrive in.

use confab_protocol::{ConversationId, ErrorCode, ServerFrame};
use confab_store::Page;

use super::{Closing, Connection, Fault, PAGE_BYTES, SYNC_PAGE, short_of_memory, storage_closing};
use crate::budget::WAIT;
use crate::hub::{Delivery, Event};

impl Connection {
    /// The highest seq of `conv` written to this socket.
    pub(super) fn watermark(&self, conv: ConversationId) -> i64 {
        *self.watermarks.get(&conv).unwrap_or(&0)
    }

    /// Writes `delivery` if it is next in its conversation, after filling
    /// any gap before it from the store; drops it if already written.
    pub(super) async fn deliver_in_order(&mut self, delivery: &Delivery) -> Result<(), Closing> {
        let watermark = self.watermark(delivery.conv);
        if delivery.seq <= watermark {
            return Ok(());
        }
        if delivery.membership {
            // Read again at the next use: the members, and where this
            // user's span starts (an `added` event may be the first this
            // connection hears of the conversation).
            self.convs.remove(&delivery.conv);
        }
        if delivery.seq > watermark + 1 {
            self.fill_gap(delivery.conv, delivery.seq - 1).await?;
        }
        if delivery.sender == self.user
            && !delivery.membership
            && let Some(info) = self.convs.get_mut(&delivery.conv)
        {
            // Sending accepts a request, from whichever device (a group
            // change is not sending).
            info.i_have_sent = true;
            info.i_accepted = true;
        }
        // A membership event is a `msg` for every device, the one that made
        // the change too: it shows it in place, and takes it as its answer.
        if delivery.sender_device == self.device && !delivery.membership {
            self.write_text(delivery.sent_frame.clone()).await?;
        } else {
            self.write_text(delivery.msg_frame.clone()).await?;
            self.state.meters.delivered.increment(1);
            self.state
                .meters
                .send_to_deliver
                .record(delivery.accepted_at.elapsed().as_secs_f64());
        }
        self.watermarks.insert(delivery.conv, delivery.seq);
        Ok(())
    }

    /// Writes every message after the watermark up to `to` from the store,
    /// within the span of the conversation this user sees.
    pub(super) async fn fill_gap(&mut self, conv: ConversationId, to: i64) -> Result<(), Closing> {
        let me = match self.conv_info(conv).await {
            Ok(info) => info.me.clone(),
            // Not a member at all: nothing of it is this user's to see.
            Err(Fault::Refused(e)) if e.code == ErrorCode::NotMember => return Ok(()),
            Err(Fault::Refused(_)) => {
                return Err(Closing::because(
                    ErrorCode::StorageUnavailable,
                    "cannot catch up now; reconnect",
                ));
            }
            Err(Fault::Close(closing)) => return Err(closing),
        };
        let to = me.left_seq.map_or(to, |left| to.min(left));
        if self.watermark(conv) < me.joined_seq {
            self.watermarks.insert(conv, me.joined_seq);
        }
        loop {
            let watermark = self.watermark(conv);
            if watermark >= to {
                return Ok(());
            }
            let page = Page {
                limit: (to - watermark).min(SYNC_PAGE as i64) as u32,
                max_bytes: PAGE_BYTES,
            };
            // Held until the page is written: a reader that stops reading
            // keeps it at most the write timeout, then is closed.
            let _charge = self
                .state
                .budget
                .charge(self.page_charge(page.limit), WAIT)
                .await
                .ok_or_else(short_of_memory)?;
            let page = self
                .state
                .store
                .messages_after(conv, watermark, page)
                .await
                .map_err(|e| storage_closing(e, "cannot catch up now; reconnect"))?;
            let Some(last) = page.last().map(|m| m.message.seq) else {
                // Seqs up to `to` are committed, so this cannot happen
                // unless the store breaks its promise; don't spin on it.
                tracing::error!(%conv, watermark, to, "store returned no messages for a committed range");
                return Err(Closing::because(
                    ErrorCode::Internal,
                    "inconsistent store; reconnect",
                ));
            };
            for stored in page {
                if stored.message.event.is_some() {
                    self.convs.remove(&conv);
                } else if stored.sender == self.user
                    && let Some(info) = self.convs.get_mut(&conv)
                {
                    info.i_have_sent = true;
                    info.i_accepted = true;
                }
                self.state.meters.delivered.increment(1);
                self.write_frame(&ServerFrame::Msg(stored.message)).await?;
            }
            self.watermarks.insert(conv, last);
            if self.syncing {
                self.absorb_queued().await?;
            }
        }
    }

    /// During the sync, empties the event queue so that a long catch-up is
    /// not cut off as too slow: messages are only noted (the store has
    /// them), everything else is written now.
    pub(super) async fn absorb_queued(&mut self) -> Result<(), Closing> {
        while let Ok(event) = self.events.try_recv() {
            match event {
                Event::Message(delivery) => {
                    let to = self.catch_up.entry(delivery.conv).or_insert(0);
                    *to = (*to).max(delivery.seq);
                }
                other => self.on_other_event(other).await?,
            }
        }
        Ok(())
    }

    /// Writes what this socket lacks up to each conversation's head in the
    /// store (`repair.rs` reads them for every connected user): a live
    /// publish lost on its way is so repaired within one repair interval,
    /// without waiting for a later message of the conversation or a
    /// reconnect. Events queued before these heads were handled before
    /// them, so what is merely late is not fetched again. A failed read of
    /// the missing messages closes the connection, whose reconnect syncs
    /// them.
    pub(super) async fn repair(&mut self, heads: &[(ConversationId, i64)]) -> Result<(), Closing> {
        for &(conv, head) in heads {
            let watermark = self.watermark(conv);
            if head > watermark {
                self.state
                    .meters
                    .repaired
                    .increment((head - watermark) as u64);
                self.fill_gap(conv, head).await?;
            }
        }
        Ok(())
    }
}
