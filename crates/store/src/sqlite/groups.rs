//! Group changes, run by the writer thread: the members table changes and
//! the change's event takes the conversation's next seq in one commit, so
//! that every device sees the change in its place among the messages and
//! every append after it is checked against the new members.

use confab_protocol::{ConvKind, ConversationId, Role};
use rusqlite::{OptionalExtension, params};

use super::{Writer, sent_message};
use crate::group_plan::{Current, Group, Step, audience, plan};
use crate::rows::{conv_kind, role, role_str};
use crate::{Appended, GroupChange, NewGroupEvent, Result, StoreError, UserId};

impl Writer {
    pub(super) fn change_group(&mut self, ev: NewGroupEvent, now: i64) -> Result<Appended> {
        if let Some(original) = sent_message(&self.conn, ev.actor, &ev.client_id)? {
            return Ok(Appended::Duplicate(original));
        }
        let (conv, kind, name, before) = match (&ev.change, ev.conv) {
            (GroupChange::Create { .. }, _) => (None, None, None, Vec::new()),
            (_, Some(conv)) => {
                let (kind, name, before) = self.current(conv)?;
                (Some(conv), Some(kind), name, before)
            }
            (_, None) => return Err(StoreError::NotFound),
        };
        let (last_seq, last_ts) = match conv {
            Some(conv) if !before.is_empty() => self.head(conv)?,
            _ => (0, 0),
        };
        let seq = last_seq + 1;
        let ts = now.max(last_ts);
        let group = Group {
            kind,
            name: name.as_deref(),
            current: &before,
        };
        let (event, steps) = match plan(&ev, &group, seq) {
            Ok(planned) => planned,
            Err(refused) => return Ok(refused.into()),
        };
        let conv = match conv {
            Some(conv) => conv,
            None => {
                let GroupChange::Create { name, .. } = &ev.change else {
                    unreachable!("only a creation has no conversation yet")
                };
                self.conn
                    .prepare_cached(
                        "INSERT INTO conversations (kind, name, created_at) VALUES ('group', ?1, ?2)",
                    )?
                    .execute(params![name, now])?;
                ConversationId(self.conn.last_insert_rowid())
            }
        };
        for step in &steps {
            match step {
                Step::Join {
                    user,
                    role,
                    joined_seq,
                } => self.join(conv, *user, ev.actor, *role, *joined_seq)?,
                Step::Leave(user) => self.leave(conv, *user, seq)?,
                Step::Promote(user) => self.set_role(conv, *user, Role::Admin)?,
                Step::Rename(name) => {
                    self.conn
                        .prepare_cached("UPDATE conversations SET name = ?2 WHERE id = ?1")?
                        .execute(params![conv.0, name])?;
                }
            }
        }
        let json = serde_json::to_string(&event)
            .map_err(|e| StoreError::Unavailable(format!("event not encoded: {e}")))?;
        self.conn
            .prepare_cached(
                "INSERT INTO messages (conv_id, seq, sender_id, sender_device, client_id, ts, body, event)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, '', ?7)",
            )?
            .execute(params![
                conv.0,
                seq,
                ev.actor.0,
                ev.actor_device.0,
                ev.client_id.as_str(),
                ts,
                json
            ])?;
        self.heads.insert(conv, (seq, ts));
        self.members_changed(conv);
        Ok(Appended::New {
            message: ev.stored(conv, seq, ts, event),
            first_from_sender: false,
            members: audience(&before, &steps).into(),
        })
    }

    /// The conversation's kind and name, and its current members with
    /// their roles; `NotFound` when it does not exist, or is a direct
    /// conversation without current members.
    fn current(&self, conv: ConversationId) -> Result<(ConvKind, Option<String>, Vec<Current>)> {
        let (kind, name): (String, Option<String>) = self
            .conn
            .prepare_cached("SELECT kind, name FROM conversations WHERE id = ?1")?
            .query_row([conv.0], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?
            .ok_or(StoreError::NotFound)?;
        let mut stmt = self.conn.prepare_cached(
            "SELECT m.user_id, u.username, m.role, m.joined_seq FROM members m JOIN users u ON u.id = m.user_id
             WHERE m.conv_id = ?1 AND m.left_seq IS NULL",
        )?;
        let rows = stmt.query_map([conv.0], |r| {
            Ok(Current {
                user: UserId(r.get(0)?),
                username: r.get(1)?,
                role: role(&r.get::<_, String>(2)?),
                joined_seq: r.get(3)?,
            })
        })?;
        let current = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        let kind = conv_kind(&kind);
        // A group without current members takes no changes (NotMember);
        // such a direct conversation is not found.
        if current.is_empty() && kind != ConvKind::Group {
            return Err(StoreError::NotFound);
        }
        Ok((kind, name, current))
    }

    /// Makes `user` a current member seeing the messages after `joined_seq`
    /// (a former member starts a new span). Being added by someone it never
    /// wrote to makes the group a message request for it.
    fn join(
        &self,
        conv: ConversationId,
        user: UserId,
        by: UserId,
        role: Role,
        joined_seq: i64,
    ) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO members (conv_id, user_id, role, joined_seq, accepted)
                 VALUES (?1, ?2, ?3, ?4,
                         ?2 = ?5 OR EXISTS (SELECT 1 FROM members a JOIN members b ON b.conv_id = a.conv_id
                                             WHERE a.user_id = ?2 AND a.has_sent = 1 AND b.user_id = ?5))
                 ON CONFLICT (conv_id, user_id) DO UPDATE
                 SET role = excluded.role, joined_seq = excluded.joined_seq, left_seq = NULL,
                     accepted = excluded.accepted",
            )?
            .execute(params![conv.0, user.0, role_str(role), joined_seq, by.0])?;
        Ok(())
    }

    fn leave(&self, conv: ConversationId, user: UserId, seq: i64) -> Result<()> {
        self.conn
            .prepare_cached("UPDATE members SET left_seq = ?3 WHERE conv_id = ?1 AND user_id = ?2")?
            .execute(params![conv.0, user.0, seq])?;
        Ok(())
    }

    fn set_role(&self, conv: ConversationId, user: UserId, role: Role) -> Result<()> {
        self.conn
            .prepare_cached("UPDATE members SET role = ?3 WHERE conv_id = ?1 AND user_id = ?2")?
            .execute(params![conv.0, user.0, role_str(role)])?;
        Ok(())
    }
}
