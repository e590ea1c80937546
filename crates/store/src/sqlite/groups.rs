//! Group changes, run by the writer thread: the members table changes and
//! the change's event takes the conversation's next seq in one commit, so
//! that every device sees the change in its place among the messages and
//! every append after it is checked against the new members.

use std::collections::BTreeSet;

use confab_protocol::{ConvEvent, ConvKind, ConversationId, Message, Role};
use rusqlite::{OptionalExtension, params};

use super::{Writer, conv_kind, role, role_str, sent_message};
use crate::{
    Appended, GroupChange, GroupRefusal, NewGroupEvent, Result, StoreError, StoredMessage, UserId,
};

/// A current member as a group change sees it.
struct Current {
    user: UserId,
    role: Role,
    joined_seq: i64,
}

impl Writer {
    pub(super) fn change_group(&mut self, ev: NewGroupEvent, now: i64) -> Result<Appended> {
        if let Some(original) = sent_message(&self.conn, ev.actor, &ev.client_id)? {
            return Ok(Appended::Duplicate(original));
        }
        let (conv, before) = match (&ev.change, ev.conv) {
            (GroupChange::Create { name, members }, _) => {
                if dedup(members).len() + 1 > ev.max_members as usize {
                    return Ok(Appended::Group(GroupRefusal::TooManyMembers));
                }
                self.conn
                    .prepare_cached(
                        "INSERT INTO conversations (kind, name, created_at) VALUES ('group', ?1, ?2)",
                    )?
                    .execute(params![name, now])?;
                (ConversationId(self.conn.last_insert_rowid()), Vec::new())
            }
            (_, Some(conv)) => (conv, self.current(conv)?),
            (_, None) => return Err(StoreError::NotFound),
        };
        let is_group = matches!(ev.change, GroupChange::Create { .. })
            || self.membership(conv)?.kind == ConvKind::Group;
        if !is_group {
            return Ok(Appended::Group(GroupRefusal::NotAGroup));
        }
        let me = before.iter().find(|m| m.user == ev.actor);
        if !matches!(ev.change, GroupChange::Create { .. }) {
            let Some(me) = me else {
                return Ok(Appended::NotMember);
            };
            if me.role != Role::Admin && !matches!(ev.change, GroupChange::Leave) {
                return Ok(Appended::Group(GroupRefusal::NotAdmin));
            }
        }
        let (last_seq, last_ts) = if before.is_empty() {
            (0, 0)
        } else {
            self.head(conv)?
        };
        let seq = last_seq + 1;
        let ts = now.max(last_ts);
        let is_current = |user: UserId| before.iter().any(|m| m.user == user);
        let event = match &ev.change {
            GroupChange::Create { name, members } => {
                self.join(conv, ev.actor, ev.actor, Role::Admin, 0)?;
                let members: Vec<_> = dedup(members)
                    .into_iter()
                    .filter(|(u, _)| *u != ev.actor)
                    .collect();
                for (user, _) in &members {
                    self.join(conv, *user, ev.actor, Role::Member, 0)?;
                }
                let mut names = vec![ev.actor_name.clone()];
                names.extend(members.into_iter().map(|(_, name)| name));
                ConvEvent::Created {
                    name: name.clone(),
                    members: names,
                }
            }
            GroupChange::Add(users) => {
                let new: Vec<_> = dedup(users)
                    .into_iter()
                    .filter(|(u, _)| !is_current(*u))
                    .collect();
                if new.is_empty() {
                    return Ok(Appended::Group(GroupRefusal::NoChange));
                }
                if before.len() + new.len() > ev.max_members as usize {
                    return Ok(Appended::Group(GroupRefusal::TooManyMembers));
                }
                for (user, _) in &new {
                    // Sees its own `added` event and what follows.
                    self.join(conv, *user, ev.actor, Role::Member, seq - 1)?;
                }
                ConvEvent::Added {
                    users: new.into_iter().map(|(_, name)| name).collect(),
                }
            }
            GroupChange::Remove(users) => {
                let gone: Vec<_> = dedup(users)
                    .into_iter()
                    .filter(|(u, _)| is_current(*u) && *u != ev.actor)
                    .collect();
                if gone.is_empty() {
                    return Ok(Appended::Group(GroupRefusal::NoChange));
                }
                for (user, _) in &gone {
                    self.leave(conv, *user, seq)?;
                }
                ConvEvent::Removed {
                    users: gone.into_iter().map(|(_, name)| name).collect(),
                }
            }
            GroupChange::Leave => {
                self.leave(conv, ev.actor, seq)?;
                let rest: Vec<&Current> = before.iter().filter(|m| m.user != ev.actor).collect();
                // A group is never left without an admin: the member who
                // has been in it longest takes over.
                let admins = match rest.iter().any(|m| m.role == Role::Admin) {
                    true => Vec::new(),
                    false => match rest.iter().min_by_key(|m| (m.joined_seq, m.user)) {
                        Some(next) => {
                            self.set_role(conv, next.user, Role::Admin)?;
                            vec![self.username(next.user)?]
                        }
                        None => Vec::new(),
                    },
                };
                ConvEvent::Left { admins }
            }
            GroupChange::Rename(name) => {
                let changed = self
                    .conn
                    .prepare_cached(
                        "UPDATE conversations SET name = ?2 WHERE id = ?1 AND name IS NOT ?2",
                    )?
                    .execute(params![conv.0, name])?;
                if changed == 0 {
                    return Ok(Appended::Group(GroupRefusal::NoChange));
                }
                ConvEvent::Renamed { name: name.clone() }
            }
            GroupChange::MakeAdmins(users) => {
                let promoted: Vec<_> = dedup(users)
                    .into_iter()
                    .filter(|(u, _)| {
                        before
                            .iter()
                            .any(|m| m.user == *u && m.role == Role::Member)
                    })
                    .collect();
                if promoted.is_empty() {
                    return Ok(Appended::Group(GroupRefusal::NoChange));
                }
                for (user, _) in &promoted {
                    self.set_role(conv, *user, Role::Admin)?;
                }
                ConvEvent::Admins {
                    users: promoted.into_iter().map(|(_, name)| name).collect(),
                }
            }
        };
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
        // Everyone before and after: the removed see their removal, the
        // added their addition.
        let mut members: BTreeSet<UserId> = before.iter().map(|m| m.user).collect();
        members.extend(self.membership(conv)?.current.iter().copied());
        Ok(Appended::New {
            message: StoredMessage {
                sender: ev.actor,
                message: Message {
                    conv,
                    seq,
                    id: ev.client_id,
                    from: ev.actor_name,
                    from_device: ev.actor_device,
                    ts,
                    body: String::new(),
                    event: Some(event),
                    deleted_files: Vec::new(),
                },
            },
            first_from_sender: false,
            members: members.into_iter().collect(),
        })
    }

    /// The group's current members with their roles.
    fn current(&self, conv: ConversationId) -> Result<Vec<Current>> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT user_id, role, joined_seq FROM members WHERE conv_id = ?1 AND left_seq IS NULL",
        )?;
        let rows = stmt.query_map([conv.0], |r| {
            Ok(Current {
                user: UserId(r.get(0)?),
                role: role(&r.get::<_, String>(1)?),
                joined_seq: r.get(2)?,
            })
        })?;
        let current = rows.collect::<rusqlite::Result<Vec<_>>>()?;
        if current.is_empty() {
            // A conversation without current members takes no changes;
            // one that does not exist is not found.
            let kind: Option<String> = self
                .conn
                .prepare_cached("SELECT kind FROM conversations WHERE id = ?1")?
                .query_row([conv.0], |r| r.get(0))
                .optional()?;
            let kind = kind.ok_or(StoreError::NotFound)?;
            if conv_kind(&kind) != ConvKind::Group {
                return Err(StoreError::NotFound);
            }
        }
        Ok(current)
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

    fn username(&self, user: UserId) -> Result<String> {
        Ok(self
            .conn
            .prepare_cached("SELECT username FROM users WHERE id = ?1")?
            .query_row([user.0], |r| r.get(0))?)
    }
}

/// Each user once, in the order given.
fn dedup(users: &[(UserId, String)]) -> Vec<(UserId, String)> {
    let mut seen = BTreeSet::new();
    users
        .iter()
        .filter(|(u, _)| seen.insert(*u))
        .cloned()
        .collect()
}
