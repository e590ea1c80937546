//! `delivered` and `read`: cursor updates, and the receipts they publish.

use std::sync::Arc;

use confab_protocol::{ConversationId, ErrorCode};
use confab_store::{CursorUpdate, MemberCursors, StoreError, UserId};

use super::{Closing, Completed, Connection, Fault, refuse};
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
        self.pending.push_back(Box::pin(async move {
            Completed::Cursor {
                conv,
                result: store.advance_cursors(update).await,
            }
        }));
        Ok(())
    }

    /// A cursor update came back: tell whoever may see that it moved.
    pub(super) async fn cursor_moved(
        &mut self,
        conv: ConversationId,
        result: Result<MemberCursors, StoreError>,
    ) -> Result<(), Closing> {
        let cursors = match result {
            Ok(cursors) if cursors.advanced() => cursors,
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
        let receipt = Arc::new(Receipt {
            conv,
            user: self.user,
            username: self.username.clone(),
            delivered: cursors.delivered,
            read: cursors.read,
            shares_read: self.read_receipts,
        });
        // Others care when either cursor they may see moved; this user's own
        // devices only about reading (unread counts).
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
}
