//! Requests answered from the store: open, conversations, history, block,
//! and the membership cache every frame about a conversation goes through.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use confab_protocol::{ConversationId, ConversationSummary, ErrorCode, ServerFrame, Username};
use confab_store::{OverQuota, Page, StoreError, UserId};

use super::{
    Connection, ConvInfo, Fault, MAX_CACHED_CONVERSATIONS, MAX_HISTORY_PAGE, PAGE_BYTES, refuse,
    throttled,
};
use crate::hub::Event;
use crate::limits::RetryAfter;

impl Connection {
    /// The conversation as this user sees it, checking that the user is
    /// or was a member (a former member still reads what it saw).
    pub(super) async fn conv_info(&mut self, conv: ConversationId) -> Result<&mut ConvInfo, Fault> {
        if !self.convs.contains_key(&conv) {
            let not_member = || {
                refuse(
                    ErrorCode::NotMember,
                    "no such conversation, or you are not in it",
                )
            };
            let (kind, _, members) = match self.state.store.members(conv).await {
                Err(StoreError::NotFound) => return Err(not_member()),
                other => other?,
            };
            let Some(me) = members.iter().find(|m| m.user == self.user).cloned() else {
                return Err(not_member());
            };
            let current: Arc<[UserId]> = members
                .iter()
                .filter(|m| m.current() && me.current())
                .map(|m| m.user)
                .collect();
            let others: Vec<UserId> = current
                .iter()
                .copied()
                .filter(|u| *u != self.user)
                .collect();
            let blocked_with = self.state.store.blocked_among(self.user, &others).await?;
            if self.convs.len() >= MAX_CACHED_CONVERSATIONS {
                self.convs.clear();
            }
            let info = ConvInfo {
                kind,
                members: current,
                blocked_with,
                i_have_sent: me.has_sent,
                i_accepted: me.accepted,
                me,
            };
            self.convs.insert(conv, info);
        }
        Ok(self.convs.get_mut(&conv).expect("inserted above"))
    }

    /// [`Connection::conv_info`] for a frame that only a current member
    /// may send.
    pub(super) async fn current_conv(
        &mut self,
        conv: ConversationId,
    ) -> Result<&mut ConvInfo, Fault> {
        let info = self.conv_info(conv).await?;
        if !info.me.current() {
            return Err(refuse(
                ErrorCode::NotMember,
                "you are no longer a member of this conversation",
            ));
        }
        Ok(self.convs.get_mut(&conv).expect("looked up above"))
    }

    pub(super) async fn lookup_user(
        &mut self,
        name: &str,
    ) -> Result<confab_store::UserRecord, Fault> {
        let unknown = || refuse(ErrorCode::UnknownUser, format!("no user named {name:?}"));
        let name = Username::new(name).map_err(|_| unknown())?;
        self.state
            .store
            .user_by_name(name.as_str())
            .await?
            .ok_or_else(unknown)
    }

    pub(super) async fn on_open(&mut self, req: u64, peer: &str) -> Result<(), Fault> {
        let peer = self.lookup_user(peer).await?;
        if peer.id == self.user {
            return Err(refuse(
                ErrorCode::SelfConversation,
                "a conversation needs someone else",
            ));
        }
        let store = self.state.store.clone();
        let conv = match store.find_direct(self.user, peer.id).await? {
            Some(conv) => conv,
            None => {
                // A new conversation is a request for the other side:
                // their number per day is what keeps spam in check.
                self.new_conversation_allowed().await?;
                store
                    .open_direct(self.user, peer.id, self.state.config.clock.now())
                    .await?
            }
        };
        Ok(self
            .write_frame(&ServerFrame::Conversation {
                req,
                conv,
                peer: peer.username,
            })
            .await?)
    }

    /// Counts a new conversation (direct or group) against the user's
    /// daily number, which the store keeps for every node.
    pub(super) async fn new_conversation_allowed(&mut self) -> Result<(), Fault> {
        let per_day = self.state.limits.config().new_conversations_per_day;
        match self
            .state
            .store
            .count_new_conversation(self.user, per_day)
            .await?
        {
            Ok(()) => Ok(()),
            Err(OverQuota { retry_after_ms }) => Err(throttled(
                ErrorCode::RateLimited,
                "you have started as many conversations as you may today",
                RetryAfter(Duration::from_millis(retry_after_ms.max(1) as u64)),
            )),
        }
    }

    pub(super) async fn on_conversations(&mut self, req: u64) -> Result<(), Fault> {
        let store = &self.state.store;
        let unread: HashMap<ConversationId, i64> =
            store.unread_counts(self.user).await?.into_iter().collect();
        let items = store
            .conversations(self.user, self.device)
            .await?
            .into_iter()
            .map(|c| ConversationSummary {
                unread: unread.get(&c.conv).copied().unwrap_or(0),
                conv: c.conv,
                kind: c.kind,
                peer: c
                    .peer()
                    .map(|p| p.member.username.clone())
                    .unwrap_or_default(),
                members: if c.left { 0 } else { c.others.len() as u32 + 1 },
                name: c.name,
                left: c.left,
                last_seq: c.last_seq,
                last_ts: c.last_ts,
                request: !c.accepted,
            })
            .collect();
        Ok(self
            .write_frame(&ServerFrame::Conversations { req, items })
            .await?)
    }

    pub(super) async fn on_history(
        &mut self,
        req: u64,
        conv: ConversationId,
        before: Option<i64>,
        limit: u32,
    ) -> Result<(), Fault> {
        let me = self.conv_info(conv).await?.me.clone();
        let page = Page {
            limit: limit.clamp(1, MAX_HISTORY_PAGE),
            max_bytes: PAGE_BYTES,
        };
        // Only the span this user sees: nothing before it joined, nothing
        // after it left.
        let before = before
            .unwrap_or(i64::MAX)
            .min(me.left_seq.map_or(i64::MAX, |left| left + 1));
        let Some(_charge) = self.state.budget.try_charge(self.page_charge(page.limit)) else {
            return Err(throttled(
                ErrorCode::Busy,
                "the server is short of memory; retry the page shortly",
                RetryAfter(Duration::from_secs(1)),
            ));
        };
        let messages = self
            .state
            .store
            .history(conv, before, page)
            .await?
            .into_iter()
            .filter(|m| m.message.seq > me.joined_seq)
            .map(|m| m.message)
            .collect();
        Ok(self
            .write_frame(&ServerFrame::History {
                req,
                conv,
                messages,
            })
            .await?)
    }

    /// Accepts a message request: from now on the peer sees this user's
    /// receipts (the current ones at once) and may send without limit.
    pub(super) async fn on_accept(&mut self, req: u64, conv: ConversationId) -> Result<(), Fault> {
        if !self.current_conv(conv).await?.i_accepted {
            self.state.store.accept(conv, self.user).await?;
            self.accepted(conv).await;
            // The user's other connections: their receipts may go out now.
            self.state
                .router
                .deliver(&[self.user], Event::Accepted(conv));
        }
        Ok(self.write_frame(&ServerFrame::Ok { req }).await?)
    }

    pub(super) async fn on_block(&mut self, req: u64, name: &str, on: bool) -> Result<(), Fault> {
        let other = self.lookup_user(name).await?;
        if other.id == self.user {
            return Err(refuse(ErrorCode::BadFrame, "you cannot block yourself"));
        }
        self.state
            .store
            .set_blocked(self.user, other.id, on, self.state.config.clock.now())
            .await?;
        self.state.router.deliver(
            &[self.user, other.id],
            Event::BlockChanged {
                a: self.user,
                b: other.id,
            },
        );
        Ok(self.write_frame(&ServerFrame::Ok { req }).await?)
    }
}
