//! `delivered` and `read`: cursor updates, and the receipts they publish.

use std::sync::Arc;

use confab_protocol::{ConversationId, ErrorCode};
use confab_store::{CursorUpdate, CursorsMoved, MemberCursors, StoreError};

use super::{Closing, Completed, Connection, Fault, Order, refuse};
use crate::hub::{Event, Receipt};

impl Connection {
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
        self.queue(Order::Any, async move {
            Completed::Cursor {
                conv,
                result: store.advance_cursors(update).await,
            }
        });
        Ok(())
    }

    /// This user has just accepted `conv` (by `accept` or by sending): the
    /// authors of what it has, who saw no receipts from it so far, get the
    /// current ones.
    pub(super) async fn accepted(&mut self, conv: ConversationId) {
        let Some(info) = self.convs.get_mut(&conv) else {
            return;
        };
        info.i_accepted = true;
        let blocked_with = info.blocked_with.clone();
        // Moves nothing: answers with the user's cursors as they are.
        let unchanged = CursorUpdate {
            conv,
            user: self.user,
            device: self.device,
            delivered: 0,
            read: 0,
        };
        match self.state.store.advance_cursors(unchanged).await {
            Ok(CursorsMoved { cursors, authors }) if !authors.is_empty() => {
                let others: Vec<_> = authors
                    .into_iter()
                    .filter(|u| !blocked_with.contains(u))
                    .collect();
                let receipt = self.receipt(conv, &cursors);
                self.state.router.deliver(&others, Event::Receipt(receipt));
            }
            Ok(_) => {}
            // The peer sees them at its next sync.
            Err(e) => tracing::warn!(error = %e, "cursors not read after an accept"),
        }
    }

    fn receipt(&self, conv: ConversationId, cursors: &MemberCursors) -> Arc<Receipt> {
        Arc::new(Receipt {
            conv,
            user: self.user,
            username: self.username.clone(),
            delivered: cursors.delivered,
            read: cursors.read,
            shares_read: self.read_receipts,
        })
    }

    /// A cursor update came back: tell whoever may see that it moved. That
    /// is the authors of the messages the cursors passed, not every
    /// member: in a group of N, one message then costs its author N - 1
    /// receipts (times two, delivered and read), not N² frames in all.
    pub(super) async fn cursor_moved(
        &mut self,
        conv: ConversationId,
        result: Result<CursorsMoved, StoreError>,
    ) -> Result<(), Closing> {
        let CursorsMoved { cursors, authors } = match result {
            Ok(moved) if moved.cursors.advanced() => moved,
            Ok(_) => return Ok(()),
            Err(e) => {
                tracing::error!(error = %e, "cursor not stored");
                return self
                    .write_error(
                        ErrorCode::StorageUnavailable,
                        "receipt not stored; send it again",
                        None,
                        None,
                    )
                    .await;
            }
        };
        let receipt = self.receipt(conv, &cursors);
        // Others care when either cursor they may see moved; this user's own
        // devices only about reading (unread counts).
        let others_see =
            cursors.delivered_advanced || (cursors.read_advanced && self.read_receipts);
        let mut targets = match self.conv_info(conv).await {
            Ok(info) if info.i_accepted && others_see => authors
                .into_iter()
                .filter(|u| !info.blocked_with.contains(u))
                .collect(),
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
}
