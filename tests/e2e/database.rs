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

/// The settings of `confab serve` come from flags, the environment or a
/// config file holding the environment's names; a name it does not know
/// is refused at start, with the line it is on.
#[tokio::test]
async fn a_node_takes_its_database_from_a_config_file() {
    let url = Postgres::shared().fresh_database();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("confab.conf");
    std::fs::write(
        &config,
        format!(
            "# the shared database\nCONFAB_DATABASE_URL = {url}\n\nCONFAB_DATABASE_CONNECTIONS=4\n"
        ),
    )
    .unwrap();
    let server = TestServer::start_with(&["--config", config.to_str().unwrap()]).await;
    server.user("alice").await;
    let db = url.rsplit('/').next().unwrap();
    assert_eq!(
        Postgres::shared().psql(db, "SELECT username FROM users"),
        "alice",
        "the account is in the database the file names"
    );

    std::fs::write(
        &config,
        "CONFAB_DATABASE_URL=postgres://x/y\nCONFAB_NO_SUCH=1\n",
    )
    .unwrap();
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_confab"))
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("confab.conf:2") && stderr.contains("CONFAB_NO_SUCH"),
        "{stderr}"
    );
}

/// Two nodes share one database, as behind a load balancer: alice is
/// connected to one, bob to the other. Each writes through its own node;
/// the seqs of their conversation are one sequence, and each gets the
/// other's messages, once each and in order (until Redis routing lands,
/// a node finds what another committed at its repair round), with the
/// receipts that go with them. The second node's clock is an hour behind
/// the first's: time still never runs backwards in the conversation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_one_database_serve_one_conversation() {
    let url = Postgres::shared().fresh_database();
    let flags = ["--database", &url, "--repair-interval-ms", "200"];
    let behind = [&flags[..], &["--clock-skew-ms", "-3600000"]].concat();
    let (one, two) = (
        TestServer::start_with(&flags).await,
        TestServer::start_with(&behind).await,
    );
    let alice = one.user("alice").await;
    let bob = two.user("bob").await;
    bob.accepts("alice").await;
    let (a, mut a_events, _) = alice.connect_synced().await;
    let (b, mut b_events, _) = bob.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    assert_eq!(
        b.open("alice").await.unwrap(),
        conv,
        "one conversation, whichever node opens it"
    );

    let mut seqs = Vec::new();
    for i in 0..10 {
        let (client, name) = if i % 2 == 0 {
            (&a, "alice")
        } else {
            (&b, "bob")
        };
        seqs.push(client.send(conv, format!("{name} {i}")).await.unwrap().seq);
    }
    assert_eq!(
        seqs,
        (1..=10).collect::<Vec<_>>(),
        "one sequence across both nodes"
    );
    let got = until(
        &mut b_events,
        |e| matches!(e, confab_client::Event::Message(m) if m.body == "alice 8"),
    )
    .await;
    let from_alice: Vec<String> = got
        .iter()
        .filter_map(|e| match e {
            confab_client::Event::Message(m) if m.from == "alice" => Some(m.body.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(
        from_alice,
        // Up to "alice 8", where `until` stopped: once each, in order.
        ["alice 0", "alice 2", "alice 4", "alice 6"]
    );
    expect_event(&mut a_events, "alice gets bob's last", is_message("bob 9")).await;
    let history = b.history(conv, None, 100).await.unwrap();
    let times: Vec<i64> = history
        .iter()
        .map(|r| match r {
            confab_client::e2e::Received::Text(m) => m.ts,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(times.len(), 10);
    assert!(times.windows(2).all(|t| t[1] >= t[0]), "{times:?}");
    // Receipts travel between nodes only live (Redis routing, next): what
    // bob's node committed, alice's sees when she connects again.
    drop(a_events);
    a.close().await;
    let (_a, _events, backlog) = alice.connect_synced().await;
    assert!(
        backlog
            .iter()
            .any(is_receipt("bob", |delivered, _| delivered >= 9)),
        "{backlog:?}"
    );
    one.assert_no_panics();
    two.assert_no_panics();
}

/// Alice's daily allowances are the database's, not each node's: the
/// conversations she starts through two nodes count together, and so do
/// the bytes she sends through both at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_daily_allowances_hold_across_nodes() {
    let url = Postgres::shared().fresh_database();
    let flags = [
        "--database",
        &url,
        "--new-conversations-per-day",
        "2",
        "--message-mib-per-day",
        "1",
    ];
    let (one, two) = (
        TestServer::start_with(&flags).await,
        TestServer::start_with(&flags).await,
    );
    let alice = one.user("alice").await;
    let bob = one.user("bob").await;
    for name in ["carol", "dan", "erin"] {
        one.user(name).await;
    }
    // Bob's request: a conversation he starts, not alice.
    bob.accepts("alice").await;
    let alice_too = alice.relogin_at(&two.url).await;
    let (a1, _a1_events, _) = alice.connect_synced().await;
    let (a2, _a2_events, _) = alice_too.connect_synced().await;

    let conv = a1.open("bob").await.unwrap();
    a1.open("carol").await.unwrap();
    a2.open("dan").await.unwrap();
    for a in [&a1, &a2] {
        let refused = a.open("erin").await.unwrap_err();
        assert_eq!(refused.code(), Some(ErrorCode::RateLimited), "{refused}");
    }

    // 30 KB of text each (about 40 KB of envelope), through both nodes at
    // once: about 1 MiB fits in all.
    let text = "q".repeat(30_000);
    let sends = (0..20).flat_map(|_| [a1.send(conv, text.clone()), a2.send(conv, text.clone())]);
    let results = futures_util::future::join_all(sends).await;
    let sent = results.iter().filter(|r| r.is_ok()).count();
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| e.code() == Some(ErrorCode::QuotaExceeded)),
        "{results:?}"
    );
    assert!(
        (25..=35).contains(&sent),
        "about 1 MiB of 30 KB messages in all: {sent}"
    );
    let history = a1.history(conv, None, 100).await.unwrap();
    assert_eq!(history.len(), sent, "nothing refused was stored");
    one.assert_no_panics();
    two.assert_no_panics();
}
