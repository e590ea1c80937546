//! Group changes on PostgreSQL: under the conversation's lock, the members
//! are read, `group_plan` decides, and the steps and the change's event
//! (the conversation's next seq) commit together.

use confab_protocol::{ConversationId, Role};
use sqlx::Row;

use super::{Attempt, PgStore, sent_message};
use crate::group_plan::{Current, Group, Step, audience, plan};
use crate::rows::{conv_kind, role, role_str};
use crate::{Appended, GroupChange, NewGroupEvent, StoreError, UserId};

impl PgStore {
    pub(super) async fn change_group_once(&self, ev: &NewGroupEvent) -> Attempt<Appended> {
        let mut tx = self.pool.begin().await?;
        let (conv, kind, name, last_seq, last_ts) = match (&ev.change, ev.conv) {
            (GroupChange::Create { .. }, _) => (None, None, None, 0, 0),
            (_, Some(conv)) => {
                let row = sqlx::query(
                    "SELECT kind, name, last_seq, COALESCE(last_ts, 0) FROM conversations
                     WHERE id = $1 FOR NO KEY UPDATE",
                )
                .bind(conv.0)
                .fetch_optional(&mut *tx)
                .await?
                .ok_or(StoreError::NotFound)?;
                (
                    Some(conv),
                    Some(conv_kind(row.try_get::<&str, _>(0)?)),
                    row.try_get::<Option<String>, _>(1)?,
                    row.try_get::<i64, _>(2)?,
                    row.try_get::<i64, _>(3)?,
                )
            }
            (_, None) => return Err(StoreError::NotFound.into()),
        };
        // A resend gets its original, whatever changed since.
        if let Some(original) = sent_message(&mut *tx, ev.actor, &ev.client_id).await? {
            return Ok(Appended::Duplicate(original));
        }
        let before = match conv {
            None => Vec::new(),
            Some(conv) => sqlx::query(
                "SELECT m.user_id, u.username, m.role, m.joined_seq
                 FROM members m JOIN users u ON u.id = m.user_id
                 WHERE m.conv_id = $1 AND m.left_seq IS NULL",
            )
            .bind(conv.0)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| {
                Ok(Current {
                    user: UserId(r.try_get(0)?),
                    username: r.try_get(1)?,
                    role: role(r.try_get::<&str, _>(2)?),
                    joined_seq: r.try_get(3)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?,
        };
        if conv.is_some() && before.is_empty() && kind.is_some_and(|k| k.is_direct()) {
            return Err(StoreError::NotFound.into());
        }
        let seq = last_seq + 1;
        let ts = self.clock.now().max(last_ts);
        let group = Group {
            kind,
            name: name.as_deref(),
            current: &before,
        };
        let (event, steps) = match plan(ev, &group, seq) {
            Ok(planned) => planned,
            Err(refused) => return Ok(refused.into()),
        };
        let conv = match conv {
            Some(conv) => conv,
            None => {
                let GroupChange::Create { name, .. } = &ev.change else {
                    unreachable!("only a creation has no conversation yet")
                };
                let id: i64 = sqlx::query_scalar(
                    "INSERT INTO conversations (kind, name, created_at) VALUES ('group', $1, $2) RETURNING id",
                )
                .bind(name)
                .bind(ts)
                .fetch_one(&mut *tx)
                .await?;
                ConversationId(id)
            }
        };
        for step in &steps {
            let query = match step {
                // Being added by someone it never wrote to makes the group
                // a message request for it.
                Step::Join {
                    user,
                    role,
                    joined_seq,
                } => sqlx::query(
                    "INSERT INTO members (conv_id, user_id, role, joined_seq, accepted)
                     VALUES ($1, $2, $3, $4,
                             $2 = $5 OR EXISTS (SELECT 1 FROM members a JOIN members b ON b.conv_id = a.conv_id
                                                 WHERE a.user_id = $2 AND a.has_sent AND b.user_id = $5))
                     ON CONFLICT (conv_id, user_id) DO UPDATE
                     SET role = excluded.role, joined_seq = excluded.joined_seq, left_seq = NULL,
                         accepted = excluded.accepted",
                )
                .bind(conv.0)
                .bind(user.0)
                .bind(role_str(*role))
                .bind(*joined_seq)
                .bind(ev.actor.0),
                Step::Leave(user) => {
                    sqlx::query("UPDATE members SET left_seq = $3 WHERE conv_id = $1 AND user_id = $2")
                        .bind(conv.0)
                        .bind(user.0)
                        .bind(seq)
                }
                Step::Promote(user) => {
                    sqlx::query("UPDATE members SET role = $3 WHERE conv_id = $1 AND user_id = $2")
                        .bind(conv.0)
                        .bind(user.0)
                        .bind(role_str(Role::Admin))
                }
                Step::Rename(name) => sqlx::query("UPDATE conversations SET name = $2 WHERE id = $1")
                    .bind(conv.0)
                    .bind(name),
            };
            query.execute(&mut *tx).await?;
        }
        let json = serde_json::to_string(&event)
            .map_err(|e| StoreError::Unavailable(format!("event not encoded: {e}")))?;
        let inserted = sqlx::query(
            "WITH event AS (
                 INSERT INTO messages (conv_id, seq, sender_id, sender_device, client_id, ts, body, event)
                 VALUES ($1, $2, $3, $4, $5, $6, '', $7)
                 ON CONFLICT (client_id, sender_id) DO NOTHING
                 RETURNING seq
             )
             UPDATE conversations SET last_seq = $2, last_ts = $6
              WHERE id = $1 AND EXISTS (SELECT 1 FROM event)",
        )
        .bind(conv.0)
        .bind(seq)
        .bind(ev.actor.0)
        .bind(ev.actor_device.0)
        .bind(ev.client_id.as_str())
        .bind(ts)
        .bind(&json)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if inserted == 0 {
            // The same client id committed meanwhile elsewhere: its
            // original is the answer, and nothing of this change stays.
            drop(tx);
            let original = sent_message(&self.pool, ev.actor, &ev.client_id)
                .await?
                .ok_or_else(|| StoreError::Unavailable("a conflicting row vanished".into()))?;
            return Ok(Appended::Duplicate(original));
        }
        tx.commit().await?;
        Ok(Appended::New {
            message: ev.clone().stored(conv, seq, ts, event),
            first_from_sender: false,
            members: audience(&before, &steps).into(),
        })
    }
}
