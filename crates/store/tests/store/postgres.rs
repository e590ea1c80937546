//! What only the PostgreSQL store has: migrations in a table of their
//! own, several nodes starting at once, a server that can go away and
//! come back.

use std::time::Duration;

use confab_store::postgres::{PgOptions, PgStore};
use confab_store::{Store, StoreError};
use confab_testpg::Postgres;

use crate::common::{msg, page, pair};

fn options() -> PgOptions {
    PgOptions {
        acquire_timeout: Duration::from_secs(1),
        ..Default::default()
    }
}

#[tokio::test]
async fn nodes_starting_at_once_migrate_once() {
    let url = Postgres::shared().fresh_database();
    let starts: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PgStore::connect(&url, options()).await })
        })
        .collect();
    for start in starts {
        let store = start.await.unwrap().unwrap();
        assert!(store.schema_version().await.unwrap() >= 1);
    }
}

#[tokio::test]
async fn refuses_a_schema_newer_than_it_knows() {
    let pg = Postgres::shared();
    let url = pg.fresh_database();
    let store = PgStore::connect(&url, options()).await.unwrap();
    store.close().await;
    let db = url.rsplit('/').next().unwrap();
    pg.psql(
        db,
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
         VALUES (99, 'from the future', true, '\\x00', 0)",
    );
    match PgStore::connect(&url, options()).await {
        Err(StoreError::SchemaTooNew { found: 99, .. }) => {}
        Err(other) => panic!("unexpected error {other}"),
        Ok(_) => panic!("opened a database from the future"),
    }
}

/// The database is killed (`kill -9`, every backend with it) while a
/// node writes: its calls fail with `Unavailable`, never a panic or a
/// wrong answer; once the database is back the same store works again,
/// every acked message is there, and seqs go on with no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_goes_away_fails_calls_until_it_is_back() {
    let pg = Postgres::start();
    let store = PgStore::connect(&pg.fresh_database(), options())
        .await
        .unwrap();
    let (alice, _bob, conv) = pair(&store).await;
    for i in 0..10 {
        store
            .append(msg(conv, alice, "alice", &format!("m{i}")))
            .await
            .unwrap();
    }

    pg.kill();
    let down = store.append(msg(conv, alice, "alice", "down")).await;
    assert!(matches!(down, Err(StoreError::Unavailable(_))), "{down:?}");
    let read = store.messages_after(conv, 0, page(100)).await;
    assert!(matches!(read, Err(StoreError::Unavailable(_))), "{read:?}");

    pg.start_again();
    // The pool replaces its broken connections as calls fail; the first
    // calls after the restart may still meet one.
    let mut back = None;
    for _ in 0..20 {
        match store.append(msg(conv, alice, "alice", "back")).await {
            Ok(appended) => {
                back = Some(appended);
                break;
            }
            Err(StoreError::Unavailable(_)) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(other) => panic!("{other}"),
        }
    }
    let back = back.expect("works again once the database is back");
    assert_eq!(back.message().unwrap().message.seq, 11);
    let stored = store.messages_after(conv, 0, page(100)).await.unwrap();
    let ids: Vec<&str> = stored.iter().map(|m| m.message.id.as_str()).collect();
    let mut expected: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    expected.push("back".into());
    assert_eq!(ids, expected, "acked ones kept; the failed one not stored");
}
