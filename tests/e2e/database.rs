//! A node on PostgreSQL whose database goes away: killed with SIGKILL
//! (every backend with it) while clients are connected, then started
//! again. Runs in every suite, on a PostgreSQL server of its own.

use confab_protocol::ErrorCode;
use confab_testpg::Postgres;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_dies_and_comes_back_and_nothing_acked_is_lost() {
    let pg = Postgres::start();
    let server = TestServer::start_with(&["--database", &pg.fresh_database()]).await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, mut a_events, _) = alice.connect_synced().await;
    let (b, mut b_events, _) = bob.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    bob.accepts("alice").await;
    a.send(conv, "before").await.unwrap();
    expect_event(&mut b_events, "bob gets it", is_message("before")).await;
    expect_event(
        &mut a_events,
        "alice sees it delivered",
        is_receipt("bob", |delivered, _| delivered >= 1),
    )
    .await;

    pg.kill();
    // Alice's send is refused, never acked: storage_unavailable, and the
    // node and her connection stay up.
    let during = a.send(conv, "during").await;
    assert_eq!(
        during.as_ref().err().and_then(|e| e.code()),
        Some(ErrorCode::StorageUnavailable),
        "{during:?}"
    );
    assert!(!server.healthy().await, "healthz says the store is down");

    pg.start_again();
    // The pool replaces its broken connections as calls fail: the first
    // sends after the restart may still be refused.
    let mut after = None;
    for attempt in 0..50 {
        match a.send(conv, format!("after {attempt}")).await {
            Ok(seq) => {
                after = Some((attempt, seq));
                break;
            }
            Err(e) if e.code() == Some(ErrorCode::StorageUnavailable) => {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    }
    let (attempt, _) = after.expect("sending works again once the database is back");
    assert!(server.healthy().await);
    let text = format!("after {attempt}");
    expect_event(&mut b_events, "bob gets the next one", is_message(&text)).await;
    expect_event(
        &mut a_events,
        "alice sees it delivered",
        is_receipt("bob", |delivered, _| delivered >= 2),
    )
    .await;

    // What the store has: the two acked ones, once each, in order; nothing
    // refused.
    let history = b.history(conv, None, 100).await.unwrap();
    let got: Vec<String> = history
        .iter()
        .map(|r| match r {
            confab_client::e2e::Received::Text(m) => m.body.clone(),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(got, ["before".to_string(), text]);
    server.assert_no_panics();
}
