//! Blob rows: one per upload, one per part object (docs/files.md).

use rusqlite::{Connection, OptionalExtension, params};

use confab_protocol::ConversationId;

use crate::{
    BlobCreated, BlobPart, BlobRecord, NewBlob, Result, StoreError, StoredMessage, UserId,
};

/// The expiry of a blob a message refers to: never.
const REFERENCED: i64 = i64::MAX;

const BLOB_COLUMNS: &str = "id, owner, length, received, created_at, expires_at, deleted_at";

fn blob_record(r: &rusqlite::Row<'_>) -> rusqlite::Result<BlobRecord> {
    Ok(BlobRecord {
        id: r.get(0)?,
        owner: UserId(r.get(1)?),
        length: r.get(2)?,
        received: r.get(3)?,
        created_at: r.get(4)?,
        expires_at: r.get(5)?,
        deleted_at: r.get(6)?,
    })
}

pub(super) fn create(conn: &Connection, b: &NewBlob) -> Result<BlobCreated> {
    let used: i64 = conn
        .prepare_cached(
            "SELECT coalesce(sum(length), 0) FROM blobs WHERE owner = ?1 AND deleted_at IS NULL",
        )?
        .query_row(params![b.owner.0], |r| r.get(0))?;
    if used + b.length > b.quota_bytes {
        return Ok(BlobCreated::OverQuota { used });
    }
    conn.prepare_cached(
        "INSERT INTO blobs (id, owner, length, received, created_at, expires_at)
         VALUES (?1, ?2, ?3, 0, ?4, ?5)",
    )?
    .execute(params![b.id, b.owner.0, b.length, b.now, b.expires_at])?;
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

pub(super) fn get(conn: &Connection, id: &str) -> Result<Option<BlobRecord>> {
    Ok(conn
        .prepare_cached(&format!("SELECT {BLOB_COLUMNS} FROM blobs WHERE id = ?1"))?
        .query_row(params![id], blob_record)
        .optional()?)
}

pub(super) fn parts(conn: &Connection, id: &str) -> Result<Vec<BlobPart>> {
    let mut stmt = conn.prepare_cached(
        "SELECT idx, start, len, object FROM blob_parts WHERE blob_id = ?1 ORDER BY idx",
    )?;
    let rows = stmt.query_map(params![id], |r| {
        Ok(BlobPart {
            index: r.get(0)?,
            start: r.get(1)?,
            len: r.get(2)?,
            object: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

pub(super) fn add_part(
    conn: &Connection,
    id: &str,
    part: &BlobPart,
    expires_at: i64,
) -> Result<BlobRecord> {
    let blob = get(conn, id)?
        .filter(|b| b.deleted_at.is_none())
        .ok_or(StoreError::NotFound)?;
    if part.start != blob.received || part.len <= 0 || blob.received + part.len > blob.length {
        return Err(StoreError::Conflict);
    }
    conn.prepare_cached(
        "INSERT INTO blob_parts (blob_id, idx, start, len, object) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![id, part.index, part.start, part.len, part.object])?;
    let received = blob.received + part.len;
    conn.prepare_cached("UPDATE blobs SET received = ?2, expires_at = ?3 WHERE id = ?1")?
        .execute(params![id, received, expires_at])?;
    Ok(BlobRecord {
        received,
        expires_at,
        ..blob
    })
}

pub(super) fn delete(conn: &Connection, id: &str, now: i64) -> Result<Option<Vec<BlobPart>>> {
    if get(conn, id)?.is_none() {
        return Ok(None);
    }
    let parts = parts(conn, id)?;
    conn.prepare_cached("DELETE FROM blob_parts WHERE blob_id = ?1")?
        .execute(params![id])?;
    let referenced: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM blob_refs WHERE blob_id = ?1)")?
        .query_row(params![id], |r| r.get(0))?;
    if referenced {
        // The messages stay, and show the file as deleted.
        conn.prepare_cached(
            "UPDATE blobs SET deleted_at = coalesce(deleted_at, ?2), received = 0 WHERE id = ?1",
        )?
        .execute(params![id, now])?;
    } else {
        conn.prepare_cached("DELETE FROM blobs WHERE id = ?1")?
            .execute(params![id])?;
    }
    Ok(Some(parts))
}

pub(super) fn sweep(
    conn: &Connection,
    now: i64,
    retired_before: Option<i64>,
    limit: u32,
) -> Result<Vec<(String, Vec<BlobPart>)>> {
    let mut ids: Vec<String> = conn
        .prepare_cached("SELECT id FROM blobs WHERE expires_at < ?1 ORDER BY expires_at LIMIT ?2")?
        .query_map(params![now, limit], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    if let Some(before) = retired_before {
        let room = limit.saturating_sub(ids.len() as u32);
        let old = conn
            .prepare_cached(
                "SELECT id FROM blobs WHERE deleted_at IS NULL AND created_at < ?1
                 ORDER BY created_at LIMIT ?2",
            )?
            .query_map(params![before, room], |r| r.get::<_, String>(0))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        ids.extend(
            old.into_iter()
                .filter(|id| !ids.contains(id))
                .collect::<Vec<_>>(),
        );
    }
    let mut swept = Vec::with_capacity(ids.len());
    for id in ids {
        if let Some(parts) = delete(conn, &id, now)? {
            swept.push((id, parts));
        }
    }
    Ok(swept)
}

/// Fills in each message's `deleted_files` from its blobs' tombstones: one
/// indexed range query for the page.
pub(super) fn mark_deleted(
    conn: &Connection,
    conv: ConversationId,
    page: &mut [StoredMessage],
) -> Result<()> {
    let (Some(first), Some(last)) = (page.first(), page.last()) else {
        return Ok(());
    };
    let (from, to) = (first.message.seq, last.message.seq);
    let mut stmt = conn.prepare_cached(
        "SELECT r.seq, r.blob_id FROM blob_refs r JOIN blobs b ON b.id = r.blob_id
         WHERE r.conv_id = ?1 AND r.seq BETWEEN ?2 AND ?3 AND b.deleted_at IS NOT NULL",
    )?;
    let rows = stmt.query_map(params![conv.0, from.min(to), from.max(to)], |r| {
        Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
    })?;
    for row in rows {
        let (seq, blob) = row?;
        if let Some(m) = page.iter_mut().find(|m| m.message.seq == seq) {
            m.message.deleted_files.push(blob);
        }
    }
    Ok(())
}

/// Whether every one of `ids` is a complete upload of `sender`'s.
pub(super) fn all_ready(conn: &Connection, sender: UserId, ids: &[String]) -> Result<bool> {
    // Every append asks; most messages carry no file.
    if ids.is_empty() {
        return Ok(true);
    }
    let mut stmt = conn.prepare_cached(
        "SELECT EXISTS (SELECT 1 FROM blobs
                        WHERE id = ?1 AND owner = ?2 AND received = length AND deleted_at IS NULL)",
    )?;
    for id in ids {
        if !stmt.query_row(params![id, sender.0], |r| r.get::<_, bool>(0))? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Binds `ids` to message `seq` of `conv`, in the message's commit; they no
/// longer expire.
pub(super) fn bind(
    conn: &Connection,
    ids: &[String],
    conv: ConversationId,
    seq: i64,
) -> Result<()> {
    for id in ids {
        conn.prepare_cached(
            "INSERT INTO blob_refs (blob_id, conv_id, seq) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        )?
        .execute(params![id, conv.0, seq])?;
        conn.prepare_cached("UPDATE blobs SET expires_at = ?2 WHERE id = ?1")?
            .execute(params![id, REFERENCED])?;
    }
    Ok(())
}

/// The blob, if `user` may download it: its owner, or a member of a
/// conversation with a message that refers to it.
pub(super) fn visible(conn: &Connection, id: &str, user: UserId) -> Result<Option<BlobRecord>> {
    let Some(blob) = get(conn, id)? else {
        return Ok(None);
    };
    if blob.owner == user {
        return Ok(Some(blob));
    }
    let member: bool = conn
        .prepare_cached(
            "SELECT EXISTS (SELECT 1 FROM blob_refs r JOIN members m ON m.conv_id = r.conv_id
                            WHERE r.blob_id = ?1 AND m.user_id = ?2 AND r.seq > m.joined_seq
                              AND (m.left_seq IS NULL OR r.seq <= m.left_seq))",
        )?
        .query_row(params![id, user.0], |r| r.get(0))?;
    Ok(member.then_some(blob))
}
