//! The store for several nodes: one PostgreSQL database shared by every
//! node.
//!
//! No writer thread: every write is one short transaction on a pooled
//! connection, and PostgreSQL shares a WAL flush between the transactions
//! that commit at once (its own group commit). What the SQLite store gets
//! from being the only writer is here a lock inside the commit (the
//! contract in `lib.rs`, docs/storage.md):
//! - an append or group change locks its conversation's row (`FOR NO KEY
//!   UPDATE`) and takes the next seq from it, so seqs of one conversation
//!   are assigned one at a time, in commit order, with no gap;
//! - cursors move with `GREATEST`, never to a value computed from a cache;
//! - an append holds a shared advisory lock on each member whose device
//!   list it checked, and a new device list takes it exclusively, so that a
//!   message and a device-list change never commit past each other;
//! - a blob a message binds is locked `FOR NO KEY UPDATE` (the message
//!   updates its expiry), its deletion `FOR UPDATE`.

mod blobs;
mod groups;

use std::time::Duration;

use async_trait::async_trait;
use confab_crypto::PublicKeys;
use confab_protocol::{ConvKind, ConversationId, DeviceId, Message, MessageId, Username};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgRow};
use sqlx::{Postgres, Row, Transaction};

use crate::rows::{KEPT_MOVES, MOVE_BYTES, conv_kind, direct_key, passed_at, role, take_within};
use crate::{
    Appended, BlobCreated, BlobPart, BlobRecord, Clock, ConversationState, CursorUpdate,
    CursorsMoved, DeviceRecord, Member, MemberCursors, MemberReceipt, NewBlob, NewGroupEvent,
    NewMessage, OtherMember, OverQuota, Page, Result, SessionRecord, Store, StoreError,
    StoredDeviceList, StoredMessage, UserId, UserRecord, utc_day, within,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Times a transaction is run again after PostgreSQL chose it as a
/// deadlock victim or failed to serialize it. The lock order makes both
/// unexpected; this is the safety net, not the plan.
const ATTEMPTS: usize = 5;

#[derive(Clone, Debug)]
pub struct PgOptions {
    /// Connections this node keeps to the database. Every write holds one
    /// for its transaction, so it bounds the node's writes in flight.
    pub max_connections: u32,
    /// How long a call waits for a connection before it fails with
    /// `Unavailable` (the database is down, or every connection is busy).
    pub acquire_timeout: Duration,
    pub clock: Clock,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
            acquire_timeout: Duration::from_secs(3),
            clock: Clock::system(),
        }
    }
}

pub struct PgStore {
    pool: PgPool,
    clock: Clock,
}

/// What a transaction attempt ended in: an answer, or "run me again".
enum Failed {
    Store(StoreError),
    Retry,
}

/// The SQLSTATE `confab_append_counted` raises for a message over the
/// sender's daily bytes.
const OVER_QUOTA: &str = "CQ001";

fn db_code(e: &sqlx::Error) -> Option<String> {
    Some(e.as_database_error()?.code()?.into_owned())
}

impl From<sqlx::Error> for Failed {
    fn from(e: sqlx::Error) -> Self {
        match db_code(&e).as_deref() {
            // serialization_failure, deadlock_detected
            Some("40001" | "40P01") => Failed::Retry,
            _ => Failed::Store(e.into()),
        }
    }
}

impl From<StoreError> for Failed {
    fn from(e: StoreError) -> Self {
        Failed::Store(e)
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match db_code(&e).as_deref() {
            // unique_violation: another writer got there first.
            Some("23505") => StoreError::Conflict,
            _ if matches!(e, sqlx::Error::PoolClosed) => StoreError::Closed,
            _ => StoreError::Unavailable(e.to_string()),
        }
    }
}

type Attempt<T> = std::result::Result<T, Failed>;

/// Runs a transaction attempt until it does not ask to be run again.
macro_rules! retrying {
    ($attempt:expr) => {{
        let mut tries = 0;
        loop {
            tries += 1;
            let started = std::time::Instant::now();
            match $attempt.await {
                Ok(value) => {
                    // One call, one transaction: no batch to measure.
                    metrics::histogram!("confab_store_commit_seconds")
                        .record(started.elapsed().as_secs_f64());
                    break Ok(value);
                }
                Err(Failed::Store(e)) => break Err(e),
                Err(Failed::Retry) if tries < ATTEMPTS => {
                    tracing::debug!(tries, "transaction retried");
                    continue;
                }
                Err(Failed::Retry) => {
                    break Err(StoreError::Unavailable(
                        "the transaction kept conflicting with others".into(),
                    ));
                }
            }
        }
    }};
}

/// The columns `stored_message` reads, as a query's start.
macro_rules! select_message {
    ($($tail:literal),*) => {
        concat!(
            "SELECT m.conv_id, m.seq, m.client_id, u.username, m.sender_device, m.ts, m.body, m.sender_id, m.event
             FROM messages m JOIN users u ON u.id = m.sender_id ",
            $($tail),*
        )
    };
}

/// The columns `member` reads, of a `members <p> JOIN users u` row.
macro_rules! member_columns {
    ($alias:literal) => {
        concat!(
            $alias,
            ".user_id, u.username, ",
            $alias,
            ".has_sent, ",
            $alias,
            ".accepted, ",
            $alias,
            ".role, ",
            $alias,
            ".joined_seq, ",
            $alias,
            ".left_seq"
        )
    };
}
const MEMBER_FIELDS: usize = 7;

fn stored_message(r: &PgRow) -> Result<StoredMessage> {
    let client_id: String = r.try_get(2)?;
    let id = MessageId::new(client_id)
        .map_err(|e| StoreError::Unavailable(format!("a stored client id is invalid: {e}")))?;
    let event = match r.try_get::<Option<String>, _>(8)? {
        Some(json) => Some(
            serde_json::from_str(&json)
                .map_err(|e| StoreError::Unavailable(format!("a stored event is invalid: {e}")))?,
        ),
        None => None,
    };
    Ok(StoredMessage {
        sender: UserId(r.try_get(7)?),
        message: Message {
            conv: ConversationId(r.try_get(0)?),
            seq: r.try_get(1)?,
            id,
            from: r.try_get(3)?,
            from_device: DeviceId(r.try_get(4)?),
            ts: r.try_get(5)?,
            body: r.try_get(6)?,
            event,
            deleted_files: Vec::new(),
        },
    })
}

fn member(r: &PgRow, at: usize) -> Result<Member> {
    Ok(Member {
        user: UserId(r.try_get(at)?),
        username: r.try_get(at + 1)?,
        has_sent: r.try_get(at + 2)?,
        accepted: r.try_get(at + 3)?,
        role: role(r.try_get::<&str, _>(at + 4)?),
        joined_seq: r.try_get(at + 5)?,
        left_seq: r.try_get(at + 6)?,
    })
}

fn user_record(r: &PgRow) -> Result<UserRecord> {
    Ok(UserRecord {
        id: UserId(r.try_get(0)?),
        username: r.try_get(1)?,
        password_hash: r.try_get(2)?,
        read_receipts: r.try_get(3)?,
    })
}

fn key(bytes: Option<Vec<u8>>) -> Option<[u8; 32]> {
    bytes.and_then(|b| b.try_into().ok())
}

fn device_record(r: &PgRow) -> Result<DeviceRecord> {
    Ok(DeviceRecord {
        id: DeviceId(r.try_get(0)?),
        user: UserId(r.try_get(1)?),
        name: r.try_get(2)?,
        created_at: r.try_get(3)?,
        keys: match (key(r.try_get(4)?), key(r.try_get(5)?)) {
            (Some(sign), Some(kem)) => Some(PublicKeys { sign, kem }),
            _ => None,
        },
    })
}

fn device_list(r: &PgRow) -> Result<StoredDeviceList> {
    Ok(StoredDeviceList {
        epoch: r.try_get(0)?,
        signed: r.try_get(1)?,
    })
}

fn ids(users: &[UserId]) -> Vec<i64> {
    users.iter().map(|u| u.0).collect()
}

/// The message `sender` stored under `client_id`, if any.
async fn sent_message<'c, E>(
    executor: E,
    sender: UserId,
    client_id: &MessageId,
) -> Result<Option<StoredMessage>>
where
    E: sqlx::PgExecutor<'c>,
{
    sqlx::query(select_message!(
        "WHERE m.client_id = $1 AND m.sender_id = $2"
    ))
    .bind(client_id.as_str())
    .bind(sender.0)
    .fetch_optional(executor)
    .await?
    .as_ref()
    .map(stored_message)
    .transpose()
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:password@host/db`)
    /// and applies the migrations it lacks (under sqlx's advisory lock, so
    /// nodes starting at once migrate once).
    pub async fn connect(url: &str, options: PgOptions) -> Result<Self> {
        let connect: PgConnectOptions = url
            .parse()
            .map_err(|e| StoreError::Unavailable(format!("bad database URL: {e}")))?;
        let pool = PgPoolOptions::new()
            .max_connections(options.max_connections)
            .acquire_timeout(options.acquire_timeout)
            .connect_with(connect.application_name("confab"))
            .await?;
        let known = MIGRATOR.iter().map(|m| m.version).max().unwrap_or(0);
        MIGRATOR.run(&pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::VersionMissing(found) => {
                StoreError::SchemaTooNew { found, known }
            }
            other => StoreError::Unavailable(format!("migration failed: {other}")),
        })?;
        Ok(Self {
            pool,
            clock: options.clock,
        })
    }

    /// The database's schema version: the last migration applied.
    pub async fn schema_version(&self) -> Result<i64> {
        Ok(sqlx::query_scalar(
            "SELECT COALESCE(max(version), 0) FROM _sqlx_migrations WHERE success",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    async fn append_once(&self, m: &NewMessage) -> Attempt<Appended> {
        // Every check and write in one function (migrations/postgres/
        // 0002_append.sql, 0003_usage.sql): the conversation's lock is held
        // for one round trip's worth of work, not six.
        let (users, epochs): (Vec<i64>, Vec<i64>) =
            m.device_epochs.iter().map(|(u, e)| (u.0, *e)).unzip();
        let now = self.clock.now();
        let (day, over) = utc_day(now);
        let row = sqlx::query(
            "SELECT outcome, seq, ts, first_from_sender, members
               FROM confab_append_counted($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(m.daily_bytes.map(|b| b.min(i64::MAX as u64) as i64))
        .bind(day)
        .bind(m.conv.0)
        .bind(m.sender.0)
        .bind(m.sender_device.0)
        .bind(m.client_id.as_str())
        .bind(&m.body)
        .bind(now)
        .bind(&users)
        .bind(&epochs)
        .bind(m.unanswered_limit.map(i64::from))
        .bind(&m.blobs)
        .fetch_one(&self.pool)
        .await;
        let row = match row {
            Err(e) if db_code(&e).as_deref() == Some(OVER_QUOTA) => {
                // Rolled back; a resend of a stored message still gets it.
                return Ok(
                    match sent_message(&self.pool, m.sender, &m.client_id).await? {
                        Some(original) => Appended::Duplicate(original),
                        None => Appended::OverQuota(over),
                    },
                );
            }
            row => row?,
        };
        Ok(match row.try_get::<&str, _>(0)? {
            "new" => Appended::New {
                message: m.clone().stored(row.try_get(1)?, row.try_get(2)?),
                first_from_sender: row.try_get(3)?,
                members: row
                    .try_get::<Vec<i64>, _>(4)?
                    .into_iter()
                    .map(UserId)
                    .collect(),
            },
            "duplicate" => Appended::Duplicate(
                sent_message(&self.pool, m.sender, &m.client_id)
                    .await?
                    .ok_or_else(|| StoreError::Unavailable("a resent message vanished".into()))?,
            ),
            "not_member" => Appended::NotMember,
            "devices_changed" => Appended::DevicesChanged,
            "not_accepted" => Appended::NotAccepted,
            "unknown_blob" => Appended::UnknownBlob,
            "not_found" => return Err(StoreError::NotFound.into()),
            other => {
                return Err(
                    StoreError::Unavailable(format!("confab_append said {other:?}")).into(),
                );
            }
        })
    }

    async fn advance_once(&self, u: &CursorUpdate) -> Attempt<CursorsMoved> {
        let now = self.clock.now();
        // One statement: both cursors move with GREATEST (never past the
        // conversation's last seq, or where the member left), a group keeps
        // the moves, and the device's cursor moves too. Nothing is locked
        // or written unless a cursor moves: most updates repeat what
        // another device or an earlier frame said, and a statement that
        // writes nothing commits without a WAL flush. The UPDATE rereads a
        // row another writer changed meanwhile (GREATEST of the newest), and
        // what moved is what it returns, not what the statement first saw.
        let row = sqlx::query(
            "WITH old AS (
                 SELECT m.delivered_seq, m.read_seq, c.kind,
                        LEAST(c.last_seq, COALESCE(m.left_seq, c.last_seq)) AS top
                   FROM members m JOIN conversations c ON c.id = m.conv_id
                  WHERE m.conv_id = $1 AND m.user_id = $2
             ), new AS (
                 SELECT delivered_seq AS old_d, read_seq AS old_r, kind,
                        LEAST(GREATEST($4, 0), top) AS r,
                        LEAST(GREATEST($3, $4, 0), top) AS d
                   FROM old
             ), moved AS (
                 UPDATE members m
                    SET delivered_seq = GREATEST(m.delivered_seq, new.d),
                        read_seq = GREATEST(m.read_seq, new.r),
                        delivered_moves = CASE WHEN new.kind = 'group' AND new.d > m.delivered_seq
                            THEN substring(COALESCE(m.delivered_moves, ''::bytea)
                                           FROM GREATEST(octet_length(COALESCE(m.delivered_moves, ''::bytea)) - $7 + 1, 1))
                                 || int8send(new.d) || int8send($6)
                            ELSE m.delivered_moves END,
                        read_moves = CASE WHEN new.kind = 'group' AND new.r > m.read_seq
                            THEN substring(COALESCE(m.read_moves, ''::bytea)
                                           FROM GREATEST(octet_length(COALESCE(m.read_moves, ''::bytea)) - $7 + 1, 1))
                                 || int8send(new.r) || int8send($6)
                            ELSE m.read_moves END
                   FROM new
                  WHERE m.conv_id = $1 AND m.user_id = $2
                    AND (new.d > m.delivered_seq OR new.r > m.read_seq)
                 RETURNING m.delivered_seq, m.read_seq
             ), device AS (
                 INSERT INTO device_cursors (device_id, conv_id, delivered_seq)
                 SELECT $5, $1, d FROM new
                  WHERE d > COALESCE((SELECT delivered_seq FROM device_cursors
                                       WHERE device_id = $5 AND conv_id = $1), 0)
                 ON CONFLICT (device_id, conv_id) DO UPDATE SET delivered_seq = excluded.delivered_seq
                  WHERE device_cursors.delivered_seq < excluded.delivered_seq
             )
             SELECT old_d, old_r, d, r, kind,
                    ARRAY(SELECT user_id FROM members
                           WHERE conv_id = $1 AND left_seq IS NULL AND user_id <> $2 ORDER BY user_id),
                    (SELECT delivered_seq FROM moved), (SELECT read_seq FROM moved)
               FROM new",
        )
        .bind(u.conv.0)
        .bind(u.user.0)
        .bind(u.delivered)
        .bind(u.read)
        .bind(u.device.0)
        .bind(now)
        .bind(((KEPT_MOVES - 1) * MOVE_BYTES) as i32)
        .fetch_optional(&self.pool)
        .await?
        .ok_or(StoreError::NotFound)?;
        let (old_delivered, old_read, delivered, read): (i64, i64, i64, i64) = (
            row.try_get(0)?,
            row.try_get(1)?,
            row.try_get(2)?,
            row.try_get(3)?,
        );
        let kind = conv_kind(row.try_get::<&str, _>(4)?);
        let others: Vec<UserId> = row
            .try_get::<Vec<i64>, _>(5)?
            .into_iter()
            .map(UserId)
            .collect();
        let stored: (Option<i64>, Option<i64>) = (row.try_get(6)?, row.try_get(7)?);
        let cursors = match stored {
            (Some(delivered), Some(read)) => MemberCursors {
                delivered,
                read,
                delivered_advanced: delivered > old_delivered,
                read_advanced: read > old_read,
            },
            // Nothing moved: the cursors were there already, or another
            // writer moved them at least as far meanwhile.
            _ => MemberCursors {
                delivered: old_delivered.max(delivered),
                read: old_read.max(read),
                delivered_advanced: false,
                read_advanced: false,
            },
        };
        let from = match (cursors.delivered_advanced, cursors.read_advanced) {
            (true, true) => old_delivered.min(old_read),
            (true, false) => old_delivered,
            (false, true) => old_read,
            // The probe that moves nothing (an accept): whom the cursors
            // as they are concern.
            (false, false) if (u.delivered, u.read) == (0, 0) && cursors.delivered > 0 => 0,
            (false, false) => {
                return Ok(CursorsMoved {
                    cursors,
                    authors: Vec::new(),
                });
            }
        };
        if kind.is_direct() {
            return Ok(CursorsMoved {
                cursors,
                authors: others,
            });
        }
        let wrote: Vec<i64> = sqlx::query_scalar(
            "SELECT DISTINCT sender_id FROM messages
              WHERE conv_id = $1 AND seq > $2 AND seq <= $3 AND sender_id <> $4",
        )
        .bind(u.conv.0)
        .bind(from)
        .bind(cursors.delivered)
        .bind(u.user.0)
        .fetch_all(&self.pool)
        .await?;
        let authors = others
            .into_iter()
            .filter(|m| wrote.contains(&m.0))
            .collect();
        Ok(CursorsMoved { cursors, authors })
    }

    async fn put_device_list_once(
        &self,
        user: UserId,
        list: &StoredDeviceList,
        remove: &[DeviceId],
        now: i64,
    ) -> Attempt<()> {
        let mut tx = self.pool.begin().await?;
        // Exclusive: waits for every append checked against the user's
        // current list, and holds back new ones until this commits.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(user.0)
            .execute(&mut *tx)
            .await?;
        let newest: i64 = sqlx::query_scalar(
            "SELECT COALESCE(max(epoch), 0) FROM device_lists WHERE user_id = $1",
        )
        .bind(user.0)
        .fetch_one(&mut *tx)
        .await?;
        if list.epoch != newest + 1 {
            return Err(StoreError::Conflict.into());
        }
        sqlx::query(
            "INSERT INTO device_lists (user_id, epoch, signed, created_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(user.0)
        .bind(list.epoch)
        .bind(&list.signed)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        for device in remove {
            remove_device(&mut tx, user, *device, now).await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn remove_device_once(&self, user: UserId, device: DeviceId, now: i64) -> Attempt<bool> {
        let mut tx = self.pool.begin().await?;
        let removed = remove_device(&mut tx, user, device, now).await?;
        tx.commit().await?;
        Ok(removed)
    }
}

async fn remove_device(
    tx: &mut Transaction<'_, Postgres>,
    user: UserId,
    device: DeviceId,
    now: i64,
) -> Attempt<bool> {
    let removed = sqlx::query(
        "UPDATE devices SET removed_at = $3 WHERE id = $1 AND user_id = $2 AND removed_at IS NULL",
    )
    .bind(device.0)
    .bind(user.0)
    .bind(now)
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if removed == 0 {
        return Ok(false);
    }
    sqlx::query("DELETE FROM sessions WHERE device_id = $1")
        .bind(device.0)
        .execute(&mut **tx)
        .await?;
    sqlx::query("DELETE FROM device_cursors WHERE device_id = $1")
        .bind(device.0)
        .execute(&mut **tx)
        .await?;
    Ok(true)
}

const FIND_DIRECT: &str = "SELECT id FROM conversations WHERE direct_key = $1";

#[async_trait]
impl Store for PgStore {
    async fn create_user(
        &self,
        username: &Username,
        password_hash: &str,
        now: i64,
    ) -> Result<UserId> {
        let id: Option<i64> = sqlx::query_scalar(
            "INSERT INTO users (username, password_hash, created_at) VALUES ($1, $2, $3)
             ON CONFLICT (username) DO NOTHING RETURNING id",
        )
        .bind(username.to_string())
        .bind(password_hash)
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        id.map(UserId).ok_or(StoreError::UsernameTaken)
    }

    async fn user_by_name(&self, username: &str) -> Result<Option<UserRecord>> {
        sqlx::query(
            "SELECT id, username, password_hash, read_receipts FROM users WHERE username = $1",
        )
        .bind(username.to_ascii_lowercase())
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(user_record)
        .transpose()
    }

    async fn user(&self, id: UserId) -> Result<Option<UserRecord>> {
        sqlx::query("SELECT id, username, password_hash, read_receipts FROM users WHERE id = $1")
            .bind(id.0)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(user_record)
            .transpose()
    }

    async fn set_password_hash(&self, user: UserId, password_hash: &str) -> Result<()> {
        sqlx::query("UPDATE users SET password_hash = $2 WHERE id = $1")
            .bind(user.0)
            .bind(password_hash)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn set_read_receipts(&self, user: UserId, on: bool) -> Result<()> {
        sqlx::query("UPDATE users SET read_receipts = $2 WHERE id = $1")
            .bind(user.0)
            .bind(on)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn set_last_seen(&self, user: UserId, ts: i64) -> Result<()> {
        // Two nodes may report the same user: the later time wins.
        sqlx::query(
            "UPDATE users SET last_seen = $2 WHERE id = $1 AND (last_seen IS NULL OR last_seen < $2)",
        )
        .bind(user.0)
        .bind(ts)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn create_device(&self, user: UserId, name: &str, now: i64) -> Result<DeviceRecord> {
        let mut tx = self.pool.begin().await?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO devices (user_id, name, created_at) VALUES ($1, $2, $3) RETURNING id",
        )
        .bind(user.0)
        .bind(name)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query(
            "INSERT INTO device_cursors (device_id, conv_id, delivered_seq)
             SELECT $1, m.conv_id, c.last_seq FROM members m JOIN conversations c ON c.id = m.conv_id
             WHERE m.user_id = $2 AND c.last_seq > 0",
        )
        .bind(id)
        .bind(user.0)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(DeviceRecord {
            id: DeviceId(id),
            user,
            name: name.to_string(),
            created_at: now,
            keys: None,
        })
    }

    async fn device(&self, id: DeviceId) -> Result<Option<DeviceRecord>> {
        sqlx::query(
            "SELECT id, user_id, name, created_at, sign_key, kem_key FROM devices
             WHERE id = $1 AND removed_at IS NULL",
        )
        .bind(id.0)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(device_record)
        .transpose()
    }

    async fn devices(&self, user: UserId) -> Result<Vec<DeviceRecord>> {
        sqlx::query(
            "SELECT id, user_id, name, created_at, sign_key, kem_key FROM devices
             WHERE user_id = $1 AND removed_at IS NULL ORDER BY id",
        )
        .bind(user.0)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(device_record)
        .collect()
    }

    async fn remove_device(&self, user: UserId, device: DeviceId, now: i64) -> Result<bool> {
        retrying!(self.remove_device_once(user, device, now))
    }

    async fn create_session(
        &self,
        token_hash: [u8; 32],
        user: UserId,
        device: DeviceId,
        now: i64,
        expires_at: i64,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO sessions (token_hash, user_id, device_id, created_at, expires_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(&token_hash[..])
        .bind(user.0)
        .bind(device.0)
        .bind(now)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
        // Expired sessions are swept at logins, as in the SQLite store.
        sqlx::query("DELETE FROM sessions WHERE expires_at < $1")
            .bind(now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn session(&self, token_hash: [u8; 32]) -> Result<Option<SessionRecord>> {
        let row = sqlx::query(
            "SELECT s.user_id, u.username, s.device_id, s.expires_at
             FROM sessions s JOIN users u ON u.id = s.user_id JOIN devices d ON d.id = s.device_id
             WHERE s.token_hash = $1 AND d.removed_at IS NULL",
        )
        .bind(&token_hash[..])
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(SessionRecord {
                user: UserId(r.try_get(0)?),
                username: r.try_get(1)?,
                device: DeviceId(r.try_get(2)?),
                expires_at: r.try_get(3)?,
            })
        })
        .transpose()
    }

    async fn end_sessions(&self, device: DeviceId) -> Result<()> {
        sqlx::query("DELETE FROM sessions WHERE device_id = $1")
            .bind(device.0)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn end_other_sessions(&self, user: UserId, keep: DeviceId) -> Result<Vec<DeviceId>> {
        let mut tx = self.pool.begin().await?;
        let devices: Vec<i64> = sqlx::query_scalar(
            "SELECT id FROM devices WHERE user_id = $1 AND id <> $2 AND removed_at IS NULL ORDER BY id",
        )
        .bind(user.0)
        .bind(keep.0)
        .fetch_all(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM sessions WHERE user_id = $1 AND device_id <> $2")
            .bind(user.0)
            .bind(keep.0)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(devices.into_iter().map(DeviceId).collect())
    }

    async fn set_device_keys(&self, device: DeviceId, keys: PublicKeys) -> Result<bool> {
        // One statement: keys are set once, and the answer says whether
        // the device now has exactly these.
        let now: Option<(Option<Vec<u8>>, Option<Vec<u8>>)> = sqlx::query_as(
            "WITH set AS (
                 UPDATE devices SET sign_key = $2, kem_key = $3
                  WHERE id = $1 AND sign_key IS NULL AND removed_at IS NULL
                 RETURNING sign_key, kem_key
             )
             SELECT sign_key, kem_key FROM set
             UNION ALL
             SELECT sign_key, kem_key FROM devices WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM set)",
        )
        .bind(device.0)
        .bind(&keys.sign[..])
        .bind(&keys.kem[..])
        .fetch_optional(&self.pool)
        .await?;
        Ok(now
            .is_some_and(|(sign, kem)| key(sign) == Some(keys.sign) && key(kem) == Some(keys.kem)))
    }

    async fn device_lists(&self, user: UserId, after: i64) -> Result<Vec<StoredDeviceList>> {
        sqlx::query(
            "SELECT epoch, signed FROM device_lists WHERE user_id = $1 AND epoch > $2 ORDER BY epoch",
        )
        .bind(user.0)
        .bind(after)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(device_list)
        .collect()
    }

    async fn latest_device_list(&self, user: UserId) -> Result<Option<StoredDeviceList>> {
        sqlx::query(
            "SELECT epoch, signed FROM device_lists WHERE user_id = $1 ORDER BY epoch DESC LIMIT 1",
        )
        .bind(user.0)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(device_list)
        .transpose()
    }

    async fn put_device_list(
        &self,
        user: UserId,
        list: StoredDeviceList,
        remove: Vec<DeviceId>,
        now: i64,
    ) -> Result<()> {
        retrying!(self.put_device_list_once(user, &list, &remove, now))
    }

    async fn open_direct(&self, a: UserId, b: UserId, now: i64) -> Result<ConversationId> {
        if let Some(conv) = self.find_direct(a, b).await? {
            return Ok(conv);
        }
        let key = direct_key(a, b);
        let mut tx = self.pool.begin().await?;
        // Two nodes opening the pair's conversation at once: the second
        // insert waits for the first and then does nothing.
        sqlx::query(
            "INSERT INTO conversations (kind, direct_key, created_at) VALUES ('direct', $1, $2)
             ON CONFLICT (direct_key) DO NOTHING",
        )
        .bind(&key)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        let id: i64 = sqlx::query_scalar(FIND_DIRECT)
            .bind(&key)
            .fetch_one(&mut *tx)
            .await?;
        // The one who opens it has accepted it; for the other it is a request.
        sqlx::query(
            "INSERT INTO members (conv_id, user_id, accepted) VALUES ($1, $2, TRUE), ($1, $3, FALSE)
             ON CONFLICT DO NOTHING",
        )
        .bind(id)
        .bind(a.0)
        .bind(b.0)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(ConversationId(id))
    }

    async fn count_new_conversation(
        &self,
        user: UserId,
        per_day: u32,
    ) -> Result<std::result::Result<(), OverQuota>> {
        let (day, over) = utc_day(self.clock.now());
        // One statement: nodes counting at once take turns on the row, and
        // the last one under the limit is the last one counted.
        let counted: Option<i32> = sqlx::query_scalar(
            "INSERT INTO usage AS u (day, user_id, conversations) VALUES ($1, $2, 1)
             ON CONFLICT (day, user_id) DO UPDATE SET conversations = u.conversations + 1
              WHERE u.conversations < $3
             RETURNING u.conversations",
        )
        .bind(day)
        .bind(user.0)
        .bind(i64::from(per_day))
        .fetch_optional(&self.pool)
        .await?;
        Ok(within(counted.map(i64::from), per_day, over))
    }

    async fn forget_old_usage(&self) -> Result<()> {
        let (today, _) = utc_day(self.clock.now());
        sqlx::query("DELETE FROM usage WHERE day < $1")
            .bind(today)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn find_direct(&self, a: UserId, b: UserId) -> Result<Option<ConversationId>> {
        let id: Option<i64> = sqlx::query_scalar(FIND_DIRECT)
            .bind(direct_key(a, b))
            .fetch_optional(&self.pool)
            .await?;
        Ok(id.map(ConversationId))
    }

    async fn accept(&self, conv: ConversationId, user: UserId) -> Result<()> {
        sqlx::query(
            "UPDATE members SET accepted = TRUE WHERE conv_id = $1 AND user_id = $2 AND NOT accepted",
        )
        .bind(conv.0)
        .bind(user.0)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn members(
        &self,
        conv: ConversationId,
    ) -> Result<(ConvKind, Option<String>, Vec<Member>)> {
        let (kind, name): (String, Option<String>) =
            sqlx::query_as("SELECT kind, name FROM conversations WHERE id = $1")
                .bind(conv.0)
                .fetch_optional(&self.pool)
                .await?
                .ok_or(StoreError::NotFound)?;
        let members = sqlx::query(concat!(
            "SELECT ",
            member_columns!("m"),
            " FROM members m JOIN users u ON u.id = m.user_id WHERE m.conv_id = $1 ORDER BY m.user_id"
        ))
        .bind(conv.0)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| member(r, 0))
        .collect::<Result<Vec<_>>>()?;
        Ok((conv_kind(&kind), name, members))
    }

    async fn change_group(&self, event: NewGroupEvent) -> Result<Appended> {
        retrying!(self.change_group_once(&event))
    }

    async fn blocked_among(&self, user: UserId, others: &[UserId]) -> Result<Vec<UserId>> {
        let blocked: Vec<i64> = sqlx::query_scalar(
            "SELECT o FROM unnest($2::bigint[]) AS o
             WHERE EXISTS (SELECT 1 FROM blocks b
                            WHERE (b.blocker = $1 AND b.blocked = o) OR (b.blocker = o AND b.blocked = $1))",
        )
        .bind(user.0)
        .bind(ids(others))
        .fetch_all(&self.pool)
        .await?;
        Ok(blocked.into_iter().map(UserId).collect())
    }

    async fn receipt_times(&self, conv: ConversationId, seq: i64) -> Result<Vec<MemberReceipt>> {
        sqlx::query(
            "SELECT m.user_id, u.username, u.read_receipts, m.accepted,
                    m.delivered_seq >= $2, m.read_seq >= $2, m.delivered_moves, m.read_moves
             FROM members m JOIN users u ON u.id = m.user_id
             WHERE m.conv_id = $1 AND m.joined_seq < $2 AND (m.left_seq IS NULL OR m.left_seq >= $2)
             ORDER BY m.user_id",
        )
        .bind(conv.0)
        .bind(seq)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            let delivered: bool = r.try_get(4)?;
            let read: bool = r.try_get(5)?;
            Ok(MemberReceipt {
                user: UserId(r.try_get(0)?),
                username: r.try_get(1)?,
                read_receipts: r.try_get(2)?,
                accepted: r.try_get(3)?,
                delivered,
                read,
                delivered_at: delivered
                    .then(|| passed_at(r.try_get(6).ok()?, seq))
                    .flatten(),
                read_at: read.then(|| passed_at(r.try_get(7).ok()?, seq)).flatten(),
            })
        })
        .collect()
    }

    async fn conversations(
        &self,
        user: UserId,
        device: DeviceId,
    ) -> Result<Vec<ConversationState>> {
        // Both reads in one snapshot, so that the members match the heads.
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
        let mut convs = sqlx::query(
            "SELECT c.id, c.kind, c.name,
                    CASE WHEN me.left_seq IS NULL THEN c.last_seq ELSE me.left_seq END,
                    c.last_ts, GREATEST(COALESCE(dc.delivered_seq, 0), me.joined_seq),
                    me.delivered_seq, me.read_seq, me.role, me.left_seq IS NOT NULL, me.accepted
             FROM members me
             JOIN conversations c ON c.id = me.conv_id
             LEFT JOIN device_cursors dc ON dc.device_id = $2 AND dc.conv_id = me.conv_id
             WHERE me.user_id = $1
             ORDER BY c.last_ts DESC NULLS LAST, c.id",
        )
        .bind(user.0)
        .bind(device.0)
        .fetch_all(&mut *tx)
        .await?
        .iter()
        .map(|r| {
            Ok(ConversationState {
                conv: ConversationId(r.try_get(0)?),
                kind: conv_kind(r.try_get::<&str, _>(1)?),
                name: r.try_get(2)?,
                last_seq: r.try_get(3)?,
                last_ts: r.try_get(4)?,
                device_delivered: r.try_get(5)?,
                delivered: r.try_get(6)?,
                read: r.try_get(7)?,
                role: role(r.try_get::<&str, _>(8)?),
                left: r.try_get(9)?,
                accepted: r.try_get(10)?,
                others: Vec::new(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
        let others = sqlx::query(concat!(
            "SELECT p.conv_id, ",
            member_columns!("p"),
            ", p.delivered_seq, p.read_seq, u.read_receipts, u.last_seen,
                    EXISTS (SELECT 1 FROM blocks b
                             WHERE (b.blocker = $1 AND b.blocked = p.user_id)
                                OR (b.blocker = p.user_id AND b.blocked = $1))
             FROM members me
             JOIN members p ON p.conv_id = me.conv_id AND p.user_id <> me.user_id AND p.left_seq IS NULL
             JOIN users u ON u.id = p.user_id
             WHERE me.user_id = $1 AND me.left_seq IS NULL
             ORDER BY p.conv_id, p.user_id"
        ))
        .bind(user.0)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut by_conv: std::collections::HashMap<ConversationId, Vec<OtherMember>> =
            Default::default();
        for r in &others {
            let at = MEMBER_FIELDS + 1;
            by_conv
                .entry(ConversationId(r.try_get(0)?))
                .or_default()
                .push(OtherMember {
                    member: member(r, 1)?,
                    delivered: r.try_get(at)?,
                    read: r.try_get(at + 1)?,
                    read_receipts: r.try_get(at + 2)?,
                    last_seen: r.try_get(at + 3)?,
                    blocked: r.try_get(at + 4)?,
                });
        }
        for c in &mut convs {
            c.others = by_conv.remove(&c.conv).unwrap_or_default();
        }
        Ok(convs)
    }

    async fn unread_counts(&self, user: UserId) -> Result<Vec<(ConversationId, i64)>> {
        let rows: Vec<(i64, i64)> = sqlx::query_as(
            "SELECT me.conv_id,
                    (SELECT count(*) FROM messages m
                      WHERE m.conv_id = me.conv_id AND m.seq > GREATEST(me.read_seq, me.joined_seq)
                        AND m.seq <= COALESCE(me.left_seq, 9223372036854775807)
                        AND m.sender_id <> me.user_id AND m.event IS NULL)
             FROM members me WHERE me.user_id = $1",
        )
        .bind(user.0)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(conv, n)| (ConversationId(conv), n))
            .collect())
    }

    async fn append(&self, message: NewMessage) -> Result<Appended> {
        retrying!(self.append_once(&message))
    }

    async fn sent_message(
        &self,
        sender: UserId,
        client_id: &MessageId,
    ) -> Result<Option<StoredMessage>> {
        sent_message(&self.pool, sender, client_id).await
    }

    async fn heads(&self, users: &[UserId]) -> Result<Vec<(UserId, ConversationId, i64)>> {
        let rows: Vec<(i64, i64, i64)> = sqlx::query_as(
            "SELECT me.user_id, me.conv_id, COALESCE(me.left_seq, c.last_seq)
             FROM members me JOIN conversations c ON c.id = me.conv_id
             WHERE me.user_id = ANY($1)",
        )
        .bind(ids(users))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(u, c, seq)| (UserId(u), ConversationId(c), seq))
            .collect())
    }

    async fn messages_after(
        &self,
        conv: ConversationId,
        after: i64,
        page: Page,
    ) -> Result<Vec<StoredMessage>> {
        let rows = sqlx::query(select_message!(
            "WHERE m.conv_id = $1 AND m.seq > $2 ORDER BY m.seq LIMIT $3"
        ))
        .bind(conv.0)
        .bind(after)
        .bind(i64::from(page.limit))
        .fetch_all(&self.pool)
        .await?;
        let mut rows = take_within(rows.iter().map(stored_message), page.max_bytes)?;
        blobs::mark_deleted(&self.pool, conv, &mut rows).await?;
        Ok(rows)
    }

    async fn history(
        &self,
        conv: ConversationId,
        before: i64,
        page: Page,
    ) -> Result<Vec<StoredMessage>> {
        let rows = sqlx::query(select_message!(
            "WHERE m.conv_id = $1 AND m.seq < $2 ORDER BY m.seq DESC LIMIT $3"
        ))
        .bind(conv.0)
        .bind(before)
        .bind(i64::from(page.limit))
        .fetch_all(&self.pool)
        .await?;
        let mut rows = take_within(rows.iter().map(stored_message), page.max_bytes)?;
        rows.reverse();
        blobs::mark_deleted(&self.pool, conv, &mut rows).await?;
        Ok(rows)
    }

    async fn advance_cursors(&self, update: CursorUpdate) -> Result<CursorsMoved> {
        retrying!(self.advance_once(&update))
    }

    async fn set_blocked(
        &self,
        blocker: UserId,
        blocked: UserId,
        on: bool,
        now: i64,
    ) -> Result<()> {
        let query = if on {
            sqlx::query(
                "INSERT INTO blocks (blocker, blocked, created_at) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            )
            .bind(blocker.0)
            .bind(blocked.0)
            .bind(now)
        } else {
            sqlx::query("DELETE FROM blocks WHERE blocker = $1 AND blocked = $2")
                .bind(blocker.0)
                .bind(blocked.0)
        };
        query.execute(&self.pool).await?;
        Ok(())
    }

    async fn is_blocked(&self, a: UserId, b: UserId) -> Result<bool> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM blocks
                            WHERE (blocker = $1 AND blocked = $2) OR (blocker = $2 AND blocked = $1))",
        )
        .bind(a.0)
        .bind(b.0)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn presence_watchers(&self, user: UserId) -> Result<Vec<UserId>> {
        let watchers: Vec<i64> = sqlx::query_scalar(
            "SELECT DISTINCT p.user_id FROM members me
             JOIN members p ON p.conv_id = me.conv_id AND p.user_id <> me.user_id AND p.left_seq IS NULL
             WHERE me.user_id = $1 AND me.has_sent AND me.left_seq IS NULL
               AND NOT EXISTS (SELECT 1 FROM blocks b
                                WHERE (b.blocker = $1 AND b.blocked = p.user_id)
                                   OR (b.blocker = p.user_id AND b.blocked = $1))",
        )
        .bind(user.0)
        .fetch_all(&self.pool)
        .await?;
        Ok(watchers.into_iter().map(UserId).collect())
    }

    async fn create_blob(&self, blob: NewBlob) -> Result<BlobCreated> {
        retrying!(blobs::create(&self.pool, &blob))
    }

    async fn blob(&self, id: &str) -> Result<Option<BlobRecord>> {
        blobs::get(&self.pool, id).await
    }

    async fn visible_blob(&self, id: &str, user: UserId) -> Result<Option<BlobRecord>> {
        blobs::visible(&self.pool, id, user).await
    }

    async fn blob_parts(&self, id: &str) -> Result<Vec<BlobPart>> {
        blobs::parts(&self.pool, id).await
    }

    async fn add_blob_part(&self, id: &str, part: BlobPart, expires_at: i64) -> Result<BlobRecord> {
        retrying!(blobs::add_part(&self.pool, id, &part, expires_at))
    }

    async fn delete_blob(&self, id: &str, now: i64) -> Result<Option<Vec<BlobPart>>> {
        retrying!(blobs::delete_one(&self.pool, id, now))
    }

    async fn sweep_blobs(
        &self,
        now: i64,
        retired_before: Option<i64>,
        limit: u32,
    ) -> Result<Vec<(String, Vec<BlobPart>)>> {
        retrying!(blobs::sweep(&self.pool, now, retired_before, limit))
    }

    async fn close(&self) {
        // Every call that returned has committed; closing waits for
        // connections in use to come back.
        self.pool.close().await;
    }
}
