//! Blob rows on PostgreSQL (docs/files.md). A blob's row is its lock: a
//! part added, a deletion, and a message binding it take it in turn.

use confab_protocol::ConversationId;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Postgres, Row, Transaction};

use super::Attempt;
use crate::{
    BlobCreated, BlobPart, BlobRecord, NewBlob, Result, StoreError, StoredMessage, UserId,
};

fn blob_record(r: &PgRow) -> Result<BlobRecord> {
    Ok(BlobRecord {
        id: r.try_get(0)?,
        owner: UserId(r.try_get(1)?),
        length: r.try_get(2)?,
        received: r.try_get(3)?,
        created_at: r.try_get(4)?,
        expires_at: r.try_get(5)?,
        deleted_at: r.try_get(6)?,
    })
}

fn blob_part(r: &PgRow) -> Result<BlobPart> {
    Ok(BlobPart {
        index: r.try_get(0)?,
        start: r.try_get(1)?,
        len: r.try_get(2)?,
        object: r.try_get(3)?,
    })
}

pub(super) async fn create(pool: &PgPool, b: &NewBlob) -> Attempt<BlobCreated> {
    let mut tx = pool.begin().await?;
    // The owner's row serializes its uploads' quota checks across nodes.
    sqlx::query("SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE")
        .bind(b.owner.0)
        .execute(&mut *tx)
        .await?;
    let used: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(length), 0)::bigint FROM blobs WHERE owner = $1 AND deleted_at IS NULL",
    )
    .bind(b.owner.0)
    .fetch_one(&mut *tx)
    .await?;
    if used + b.length > b.quota_bytes {
        return Ok(BlobCreated::OverQuota { used });
    }
    sqlx::query(
        "INSERT INTO blobs (id, owner, length, received, created_at, expires_at)
         VALUES ($1, $2, $3, 0, $4, $5)",
    )
    .bind(&b.id)
    .bind(b.owner.0)
    .bind(b.length)
    .bind(b.now)
    .bind(b.expires_at)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(BlobCreated::Created(BlobRecord {
        id: b.id.clone(),
        owner: b.owner,
        length: b.length,
        received: 0,
        created_at: b.now,
        expires_at: b.expires_at,
        deleted_at: None,
    }))
}

macro_rules! select_blob {
    ($tail:literal) => {
        concat!(
            "SELECT id, owner, length, received, created_at, expires_at, deleted_at FROM blobs WHERE id = $1",
            $tail
        )
    };
}

pub(super) async fn get(pool: &PgPool, id: &str) -> Result<Option<BlobRecord>> {
    sqlx::query(select_blob!(""))
        .bind(id)
        .fetch_optional(pool)
        .await?
        .as_ref()
        .map(blob_record)
        .transpose()
}

async fn locked(tx: &mut Transaction<'_, Postgres>, id: &str) -> Attempt<Option<BlobRecord>> {
    Ok(sqlx::query(select_blob!(" FOR UPDATE"))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?
        .as_ref()
        .map(blob_record)
        .transpose()?)
}

pub(super) async fn parts<'c, E: sqlx::PgExecutor<'c>>(pool: E, id: &str) -> Result<Vec<BlobPart>> {
    sqlx::query("SELECT idx, start, len, object FROM blob_parts WHERE blob_id = $1 ORDER BY idx")
        .bind(id)
        .fetch_all(pool)
        .await?
        .iter()
        .map(blob_part)
        .collect()
}

pub(super) async fn add_part(
    pool: &PgPool,
    id: &str,
    part: &BlobPart,
    expires_at: i64,
) -> Attempt<BlobRecord> {
    let mut tx = pool.begin().await?;
    // Two nodes given the same part (a resumed upload) take turns; the
    // second finds the offset moved and gets Conflict.
    let blob = locked(&mut tx, id)
        .await?
        .filter(|b| b.deleted_at.is_none())
        .ok_or(StoreError::NotFound)?;
    if part.start != blob.received || part.len <= 0 || blob.received + part.len > blob.length {
        return Err(StoreError::Conflict.into());
    }
    sqlx::query(
        "INSERT INTO blob_parts (blob_id, idx, start, len, object) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(part.index)
    .bind(part.start)
    .bind(part.len)
    .bind(&part.object)
    .execute(&mut *tx)
    .await?;
    let received = blob.received + part.len;
    sqlx::query("UPDATE blobs SET received = $2, expires_at = $3 WHERE id = $1")
        .bind(id)
        .bind(received)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(BlobRecord {
        received,
        expires_at,
        ..blob
    })
}

async fn delete(
    tx: &mut Transaction<'_, Postgres>,
    id: &str,
    now: i64,
) -> Attempt<Option<Vec<BlobPart>>> {
    if locked(tx, id).await?.is_none() {
        return Ok(None);
    }
    let parts = parts(&mut **tx, id).await?;
    sqlx::query("DELETE FROM blob_parts WHERE blob_id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    // Under the blob's lock, so a message binding it either committed
    // before (and is seen here) or waits and then finds it deleted.
    let referenced: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM blob_refs WHERE blob_id = $1)")
            .bind(id)
            .fetch_one(&mut **tx)
            .await?;
    if referenced {
        // The messages stay, and show the file as deleted.
        sqlx::query(
            "UPDATE blobs SET deleted_at = COALESCE(deleted_at, $2), received = 0 WHERE id = $1",
        )
        .bind(id)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    } else {
        sqlx::query("DELETE FROM blobs WHERE id = $1")
            .bind(id)
            .execute(&mut **tx)
            .await?;
    }
    Ok(Some(parts))
}

pub(super) async fn delete_one(
    pool: &PgPool,
    id: &str,
    now: i64,
) -> Attempt<Option<Vec<BlobPart>>> {
    let mut tx = pool.begin().await?;
    let parts = delete(&mut tx, id, now).await?;
    tx.commit().await?;
    Ok(parts)
}

pub(super) async fn sweep(
    pool: &PgPool,
    now: i64,
    retired_before: Option<i64>,
    limit: u32,
) -> Attempt<Vec<(String, Vec<BlobPart>)>> {
    let mut tx = pool.begin().await?;
    // SKIP LOCKED: nodes sweeping at once share the work instead of
    // queueing on each other's rows.
    let mut ids: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM blobs WHERE expires_at < $1 ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED",
    )
    .bind(now)
    .bind(i64::from(limit))
    .fetch_all(&mut *tx)
    .await?;
    if let Some(before) = retired_before {
        let room = limit.saturating_sub(ids.len() as u32);
        let old: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM blobs WHERE deleted_at IS NULL AND created_at < $1
             ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED",
        )
        .bind(before)
        .bind(i64::from(room))
        .fetch_all(&mut *tx)
        .await?;
        for id in old {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    let mut swept = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(parts) = delete(&mut tx, &id, now).await? {
            swept.push((id, parts));
        }
    }
    tx.commit().await?;
    Ok(swept)
}

/// Fills in each message's `deleted_files` from its blobs' tombstones.
pub(super) async fn mark_deleted(
    pool: &PgPool,
    conv: ConversationId,
    page: &mut [StoredMessage],
) -> Result<()> {
    let (Some(first), Some(last)) = (page.first(), page.last()) else {
        return Ok(());
    };
    let (from, to) = (first.message.seq, last.message.seq);
    let rows: Vec<(i64, String)> = sqlx::query_as(
        "SELECT r.seq, r.blob_id FROM blob_refs r JOIN blobs b ON b.id = r.blob_id
         WHERE r.conv_id = $1 AND r.seq BETWEEN $2 AND $3 AND b.deleted_at IS NOT NULL",
    )
    .bind(conv.0)
    .bind(from.min(to))
    .bind(from.max(to))
    .fetch_all(pool)
    .await?;
    for (seq, blob) in rows {
        if let Some(m) = page.iter_mut().find(|m| m.message.seq == seq) {
            m.message.deleted_files.push(blob);
        }
    }
    Ok(())
}

/// The blob, if `user` may download it: its owner, or a member of a
/// conversation with a message that refers to it (within its span).
pub(super) async fn visible(pool: &PgPool, id: &str, user: UserId) -> Result<Option<BlobRecord>> {
    let Some(blob) = get(pool, id).await? else {
        return Ok(None);
    };
    if blob.owner == user {
        return Ok(Some(blob));
    }
    let member: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM blob_refs r JOIN members m ON m.conv_id = r.conv_id
                        WHERE r.blob_id = $1 AND m.user_id = $2 AND r.seq > m.joined_seq
                          AND (m.left_seq IS NULL OR r.seq <= m.left_seq))",
    )
    .bind(id)
    .bind(user.0)
    .fetch_one(pool)
    .await?;
    Ok(member.then_some(blob))
}
