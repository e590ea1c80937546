//! Groups: making and changing them, their members, and who has read what.
//!
//! Each change carries a fresh message id and is answered like a send: the
//! [`Sent`] says where its event sits in the conversation. Every device of
//! every member (before and after the change) gets the event as
//! [`crate::Event::GroupChange`].

use confab_protocol::{
    ClientFrame, ConvKind, ConversationId, MemberSummary, MessageId, ReceiptInfo, ServerFrame,
};

use crate::client::{new_message_id, unexpected};
use crate::{Client, ClientError, Sent};

/// A conversation's current members, as the server has them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberList {
    pub conv: ConversationId,
    pub kind: ConvKind,
    pub name: Option<String>,
    pub items: Vec<MemberSummary>,
}

impl Client {
    /// Makes a group of this user (its first admin) and `members`. The
    /// answer's `conv` is the new conversation.
    pub async fn create_group(&self, name: &str, members: &[&str]) -> Result<Sent, ClientError> {
        let (name, members) = (name.into(), names(members));
        self.change(|id| ClientFrame::GroupCreate { id, name, members })
            .await
    }

    pub async fn add_members(
        &self,
        conv: ConversationId,
        users: &[&str],
    ) -> Result<Sent, ClientError> {
        let users = names(users);
        self.change(|id| ClientFrame::GroupAdd { id, conv, users })
            .await
    }

    pub async fn remove_members(
        &self,
        conv: ConversationId,
        users: &[&str],
    ) -> Result<Sent, ClientError> {
        let users = names(users);
        self.change(|id| ClientFrame::GroupRemove { id, conv, users })
            .await
    }

    pub async fn leave_group(&self, conv: ConversationId) -> Result<Sent, ClientError> {
        self.change(|id| ClientFrame::GroupLeave { id, conv }).await
    }

    pub async fn rename_group(
        &self,
        conv: ConversationId,
        name: &str,
    ) -> Result<Sent, ClientError> {
        let name = name.into();
        self.change(|id| ClientFrame::GroupRename { id, conv, name })
            .await
    }

    pub async fn make_admins(
        &self,
        conv: ConversationId,
        users: &[&str],
    ) -> Result<Sent, ClientError> {
        let users = names(users);
        self.change(|id| ClientFrame::GroupAdmin { id, conv, users })
            .await
    }

    /// A group change under a fresh id, answered like a send.
    async fn change(
        &self,
        frame: impl FnOnce(MessageId) -> ClientFrame,
    ) -> Result<Sent, ClientError> {
        let id = new_message_id();
        self.send_like(id.clone(), frame(id)).await
    }

    /// The conversation's current members (none once this user left).
    pub async fn members(&self, conv: ConversationId) -> Result<MemberList, ClientError> {
        let req = self.next_ref();
        match self
            .request(req, ClientFrame::Members { req, conv })
            .await?
        {
            ServerFrame::Members {
                conv,
                kind,
                name,
                items,
                ..
            } => {
                let users: std::sync::Arc<[String]> =
                    items.iter().map(|m| m.user.clone()).collect();
                self.members
                    .lock()
                    .expect("members poisoned")
                    .insert(conv, users);
                Ok(MemberList {
                    conv,
                    kind,
                    name,
                    items,
                })
            }
            other => Err(unexpected(&other)),
        }
    }

    /// For one of this user's own messages: each other member it went to,
    /// whether (and when) it has it, and read it.
    pub async fn info(
        &self,
        conv: ConversationId,
        seq: i64,
    ) -> Result<Vec<ReceiptInfo>, ClientError> {
        let req = self.next_ref();
        match self
            .request(req, ClientFrame::Info { req, conv, seq })
            .await?
        {
            ServerFrame::Info { items, .. } => Ok(items),
            other => Err(unexpected(&other)),
        }
    }
}

fn names(users: &[&str]) -> Vec<String> {
    users.iter().map(|u| u.to_string()).collect()
}
