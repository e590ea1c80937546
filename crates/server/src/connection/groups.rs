//! Groups: the changes admins and members make, `members` and `info`.
//!
//! A group change is answered like a `send` (`sent` with its id, or an
//! error with it): its event is a message of the conversation, committed
//! with the change and published to everyone before and after it through
//! the same path as every message (`send.rs`, `appended`).

use std::time::Instant;

use confab_protocol::{
    ConversationId, ErrorCode, ErrorFrame, MemberSummary, MessageId, ReceiptInfo, ServerFrame,
    valid_group_name,
};
use confab_store::{GroupChange, GroupRefusal, NewGroupEvent, Page, UserId};

use super::send::AppendDone;
use super::{Completed, Connection, Fault, Order, refuse, throttled};

/// A group change as asked, with usernames.
pub(super) enum Asked {
    Add(Vec<String>),
    Remove(Vec<String>),
    Leave,
    Rename(String),
    MakeAdmins(Vec<String>),
}

/// The error frame for a group change the store refused.
pub(super) fn refusal(refusal: GroupRefusal) -> ErrorFrame {
    let (code, message) = match refusal {
        GroupRefusal::NotAGroup => (
            ErrorCode::NotAGroup,
            "a one-to-one conversation has no members to change",
        ),
        GroupRefusal::NotAdmin => (
            ErrorCode::NotAdmin,
            "only an admin of the group may do that",
        ),
        GroupRefusal::TooManyMembers => (
            ErrorCode::TooManyMembers,
            "the group would have more members than this server allows",
        ),
        GroupRefusal::NoChange => (
            ErrorCode::NoChange,
            "that changes nothing (already members, not members, already admins, or the same name)",
        ),
    };
    ErrorFrame::new(code, message)
}

fn bad_name() -> Fault {
    refuse(
        ErrorCode::BadFrame,
        "a group name is 1-64 bytes of visible text",
    )
}

impl Connection {
    pub(super) async fn on_group_create(
        &mut self,
        id: MessageId,
        name: String,
        members: Vec<String>,
    ) -> Result<(), Fault> {
        // A resend must not count as another new group.
        if let Some(original) = self.state.store.sent_message(self.user, &id).await? {
            return Ok(self.answer_resend(original).await?);
        }
        let checked = async {
            if !valid_group_name(&name) {
                return Err(bad_name());
            }
            let members = self.group_users(&members).await?;
            self.changes_rate().await?;
            self.new_conversation_allowed().await?;
            Ok(members)
        }
        .await;
        let change = match checked {
            Ok(members) => GroupChange::Create { name, members },
            Err(fault) => return self.refused_unless_resent(&id, fault).await,
        };
        self.commit_group_change(id, None, change).await
    }

    pub(super) async fn on_group_change(
        &mut self,
        id: MessageId,
        conv: ConversationId,
        asked: Asked,
    ) -> Result<(), Fault> {
        let checked = async {
            self.current_conv(conv).await?;
            let change = match asked {
                Asked::Add(users) => GroupChange::Add(self.group_users(&users).await?),
                Asked::Remove(users) => GroupChange::Remove(self.known_users(&users).await?),
                Asked::MakeAdmins(users) => {
                    GroupChange::MakeAdmins(self.known_users(&users).await?)
                }
                Asked::Leave => GroupChange::Leave,
                Asked::Rename(name) if valid_group_name(&name) => GroupChange::Rename(name),
                Asked::Rename(_) => return Err(bad_name()),
            };
            self.changes_rate().await?;
            Ok(change)
        }
        .await;
        let change = match checked {
            Ok(change) => change,
            Err(fault) => return self.refused_unless_resent(&id, fault).await,
        };
        self.commit_group_change(id, Some(conv), change).await
    }

    /// A refused group change, unless it is a resend of one already made:
    /// that gets its original, like a resent message.
    async fn refused_unless_resent(&mut self, id: &MessageId, fault: Fault) -> Result<(), Fault> {
        match fault {
            Fault::Refused(refusal) => match self.state.store.sent_message(self.user, id).await? {
                Some(original) => Ok(self.answer_resend(original).await?),
                None => Err(Fault::Refused(refusal)),
            },
            close => Err(close),
        }
    }

    /// Hands the change to the store without waiting, like a send: its
    /// commit comes back through `appended`, which publishes the event.
    async fn commit_group_change(
        &mut self,
        id: MessageId,
        conv: Option<ConversationId>,
        change: GroupChange,
    ) -> Result<(), Fault> {
        let event = NewGroupEvent {
            conv,
            actor: self.user,
            actor_name: self.username.clone(),
            actor_device: self.device,
            client_id: id.clone(),
            change,
            max_members: self.state.limits.config().max_group_members,
        };
        let store = self.state.store.clone();
        let accepted_at = Instant::now();
        self.queue(Order::Kept, async move {
            let result = store.change_group(event).await;
            Completed::Append(Box::new(AppendDone {
                id,
                conv: conv.unwrap_or(ConversationId(0)),
                wrapped: Vec::new(),
                accepted_at,
                result,
            }))
        });
        Ok(())
    }

    /// A change costs what a message costs against the user's rate. Checked
    /// among the refusals that a resend skips.
    async fn changes_rate(&mut self) -> Result<(), Fault> {
        self.state.limits.message(self.user).await.map_err(|wait| {
            throttled(
                ErrorCode::RateLimited,
                "you are changing groups too fast; slow down",
                wait,
            )
        })
    }

    /// Users to add to a group: each must exist, not be this user, and
    /// have no block with it; at most a group's worth.
    async fn group_users(&mut self, names: &[String]) -> Result<Vec<(UserId, String)>, Fault> {
        let users = self.known_users(names).await?;
        if users.iter().any(|(u, _)| *u == self.user) {
            return Err(refuse(
                ErrorCode::SelfConversation,
                "you are in the group already",
            ));
        }
        let ids: Vec<UserId> = users.iter().map(|(u, _)| *u).collect();
        if !self
            .state
            .store
            .blocked_among(self.user, &ids)
            .await?
            .is_empty()
        {
            return Err(refuse(
                ErrorCode::Blocked,
                "a block stands between you and one of them",
            ));
        }
        Ok(users)
    }

    /// Looks up each name (`unknown_user` for the first that has no user).
    async fn known_users(&mut self, names: &[String]) -> Result<Vec<(UserId, String)>, Fault> {
        let max = self.state.limits.config().max_group_members as usize;
        if names.is_empty() {
            return Err(refuse(ErrorCode::BadFrame, "name at least one user"));
        }
        if names.len() > max {
            return Err(refuse(
                ErrorCode::TooManyMembers,
                format!("a group has at most {max} members"),
            ));
        }
        let mut users = Vec::with_capacity(names.len());
        for name in names {
            let user = self.lookup_user(name).await?;
            users.push((user.id, user.username));
        }
        Ok(users)
    }

    pub(super) async fn on_members(&mut self, req: u64, conv: ConversationId) -> Result<(), Fault> {
        let info = self.conv_info(conv).await?;
        let current = info.me.current();
        let (kind, name, members) = self.state.store.members(conv).await?;
        let items = members
            .into_iter()
            .filter(|m| current && m.current())
            .map(|m| MemberSummary {
                user: m.username,
                role: m.role,
            })
            .collect();
        Ok(self
            .write_frame(&ServerFrame::Members {
                req,
                conv,
                kind,
                name,
                items,
            })
            .await?)
    }

    /// Who has one of this user's messages, and who read it. Only for the
    /// message's author: receipts go to authors only, so nobody else
    /// learns from `info` what it would not be told anyway.
    pub(super) async fn on_info(
        &mut self,
        req: u64,
        conv: ConversationId,
        seq: i64,
    ) -> Result<(), Fault> {
        let info = self.conv_info(conv).await?;
        let blocked_with = info.blocked_with.clone();
        let not_yours = || refuse(ErrorCode::BadFrame, "info is for your own messages only");
        if !info.me.sees(seq) {
            return Err(not_yours());
        }
        let page = Page {
            limit: 1,
            max_bytes: 1,
        };
        let message = self.state.store.messages_after(conv, seq - 1, page).await?;
        if !message
            .first()
            .is_some_and(|m| m.message.seq == seq && m.sender == self.user)
        {
            return Err(not_yours());
        }
        let items = self
            .state
            .store
            .receipt_times(conv, seq)
            .await?
            .into_iter()
            .filter(|m| m.user != self.user && !blocked_with.contains(&m.user))
            .map(|m| {
                // A member who has not accepted the conversation shows
                // nothing; reads only where both share them.
                let shown = m.accepted;
                let read = shown && m.read_receipts && self.read_receipts;
                ReceiptInfo {
                    user: m.username,
                    delivered: shown && m.delivered,
                    delivered_at: m.delivered_at.filter(|_| shown),
                    read: read && m.read,
                    read_at: m.read_at.filter(|_| read),
                }
            })
            .collect();
        Ok(self
            .write_frame(&ServerFrame::Info {
                req,
                conv,
                seq,
                items,
            })
            .await?)
    }
}
