//! What only the SQLite store has: a size limit, its own schema version,
//! file backups.

use std::sync::Arc;

use confab_store::sqlite::{SqliteOptions, SqliteStore};
use confab_store::{Page, Store, StoreError};

use crate::common::{msg, page, pair};

struct Fixture {
    dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
}

fn open() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
    Fixture { dir, store }
}

#[tokio::test]
async fn a_full_database_fails_writes_without_losing_committed_ones() {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions {
        max_size_bytes: Some(256 * 1024),
        ..Default::default()
    };
    let s = SqliteStore::open(dir.path(), options).unwrap();
    let (alice, _bob, conv) = pair(&s).await;
    let mut acked = 0;
    let mut failed = None;
    for i in 0..10_000 {
        let mut m = msg(conv, alice, "alice", &format!("m{i}"));
        m.body = "x".repeat(1000);
        match s.append(m).await {
            Ok(a) => {
                acked += 1;
                assert_eq!(a.message().expect("stored").message.seq, acked);
            }
            Err(e) => {
                failed = Some(e);
                break;
            }
        }
    }
    assert!(
        matches!(failed, Some(StoreError::Unavailable(_))),
        "{failed:?}"
    );
    let stored = s
        .messages_after(
            conv,
            0,
            Page {
                limit: 100_000,
                max_bytes: usize::MAX,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        stored.len() as i64,
        acked,
        "every acked message is there, no unacked one"
    );
    // Reads and small writes still work; the failed seq was not consumed.
    assert_eq!(
        s.conversations(alice.0, alice.1).await.unwrap()[0].last_seq,
        acked
    );
}

#[tokio::test]
async fn refuses_a_schema_newer_than_it_knows() {
    let f = open();
    f.store.close().await;
    rusqlite_bump(f.dir.path());
    match SqliteStore::open(f.dir.path(), SqliteOptions::default()) {
        Err(StoreError::SchemaTooNew { found: 99, .. }) => {}
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("opened a database from the future"),
    }
}

fn rusqlite_bump(dir: &std::path::Path) {
    let conn = rusqlite::Connection::open(dir.join(confab_store::sqlite::DB_FILE)).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
}

#[tokio::test]
async fn backup_is_a_consistent_copy() {
    let f = open();
    let s = f.store.as_ref();
    let (alice, _bob, conv) = pair(s).await;
    for i in 0..20 {
        s.append(msg(conv, alice, "alice", &format!("m{i}")))
            .await
            .unwrap();
    }
    let copy_dir = tempfile::tempdir().unwrap();
    SqliteStore::backup(
        f.dir.path(),
        &copy_dir.path().join(confab_store::sqlite::DB_FILE),
    )
    .unwrap();
    let copy = SqliteStore::open(copy_dir.path(), SqliteOptions::default()).unwrap();
    assert_eq!(
        copy.messages_after(conv, 0, page(100)).await.unwrap().len(),
        20
    );
}

#[tokio::test]
async fn a_failed_batch_leaves_no_gap_for_the_next_message() {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions {
        max_size_bytes: Some(256 * 1024),
        ..Default::default()
    };
    let s = SqliteStore::open(dir.path(), options).unwrap();
    let (alice, bob, conv) = pair(&s).await;
    let mut last = 0;
    loop {
        let mut m = msg(conv, alice, "alice", &format!("big{last}"));
        m.body = "x".repeat(4000);
        match s.append(m).await {
            Ok(a) => last = a.message().expect("stored").message.seq,
            Err(_) => break,
        }
    }
    // Whatever fits after the failure gets the very next seq.
    let mut small = msg(conv, bob, "bob", "small");
    small.body = String::new();
    if let Ok(a) = s.append(small).await {
        assert_eq!(a.message().expect("stored").message.seq, last + 1);
    }
    let stored = s
        .messages_after(
            conv,
            0,
            Page {
                limit: 10_000,
                max_bytes: usize::MAX,
            },
        )
        .await
        .unwrap();
    let seqs: Vec<i64> = stored.iter().map(|m| m.message.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>(), "no gaps");
}

/// A second process on the same files would reuse seqs (the writer's
/// caches are the truth): the directory is locked while a store has it
/// open, and free again once it closes (or its process dies).
#[tokio::test]
async fn a_second_store_on_the_same_directory_is_refused() {
    let f = open();
    match SqliteStore::open(f.dir.path(), SqliteOptions::default()) {
        Err(StoreError::Unavailable(why)) => assert!(why.contains("in use"), "{why}"),
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("two writers on one database"),
    }
    f.store.close().await;
    SqliteStore::open(f.dir.path(), SqliteOptions::default()).unwrap();
}
