//! What both stores make of the rows they read and write: names of kinds
//! and roles, a page's byte budget, and the kept moves of a member's
//! cursors.

use confab_protocol::{ConvKind, Role};

use crate::{StoredMessage, UserId};

/// The key that makes a pair's conversation unique, whoever opens it.
pub(crate) fn direct_key(a: UserId, b: UserId) -> String {
    format!("{}:{}", a.0.min(b.0), a.0.max(b.0))
}

pub(crate) fn conv_kind(kind: &str) -> ConvKind {
    match kind {
        "group" => ConvKind::Group,
        _ => ConvKind::Direct,
    }
}

pub(crate) fn role(role: &str) -> Role {
    match role {
        "admin" => Role::Admin,
        _ => Role::Member,
    }
}

pub(crate) fn role_str(role: Role) -> &'static str {
    match role {
        Role::Admin => "admin",
        Role::Member => "member",
    }
}

/// Rows in order until their bodies pass `max_bytes`; always at least one.
pub(crate) fn take_within<E>(
    rows: impl IntoIterator<Item = Result<StoredMessage, E>>,
    max_bytes: usize,
) -> Result<Vec<StoredMessage>, E> {
    let mut taken = Vec::new();
    let mut bytes = 0;
    for row in rows {
        let stored = row?;
        bytes += stored.message.body.len();
        if !taken.is_empty() && bytes > max_bytes {
            break;
        }
        taken.push(stored);
    }
    Ok(taken)
}

/// Moves of each cursor a group member's row keeps (`delivered_moves`,
/// `read_moves`), and the bytes of one: seq and time, i64 big-endian.
pub(crate) const KEPT_MOVES: usize = 16;
pub(crate) const MOVE_BYTES: usize = 16;

pub(crate) fn cursor_move(seq: i64, ts: i64) -> Vec<u8> {
    let mut bytes = seq.to_be_bytes().to_vec();
    bytes.extend_from_slice(&ts.to_be_bytes());
    bytes
}

/// When the cursor whose newest moves are `moves` first reached `seq`:
/// the time of the first kept move at or past it, unless moves before that
/// one were dropped (the first move past `seq` may have been among them).
pub(crate) fn passed_at(moves: Option<Vec<u8>>, seq: i64) -> Option<i64> {
    let moves = moves?;
    let entries: Vec<(i64, i64)> = moves
        .chunks_exact(MOVE_BYTES)
        .map(|c| {
            let (s, t) = c.split_at(8);
            (
                i64::from_be_bytes(s.try_into().expect("8 bytes")),
                i64::from_be_bytes(t.try_into().expect("8 bytes")),
            )
        })
        .collect();
    let first = entries.iter().position(|&(s, _)| s >= seq)?;
    let all_kept = entries.len() < KEPT_MOVES;
    (first > 0 || all_kept).then(|| entries[first].1)
}
