//! Several nodes on one PostgreSQL database and one Redis: live events
//! cross nodes through Redis; without Redis they still arrive, at the
//! repair round. Every node here has a PostgreSQL database and a Redis of
//! this test's own.

use confab_client::{ConnectOptions, Event};
use confab_protocol::ErrorCode;
use confab_testpg::Postgres;
use confab_testredis::Redis;

use crate::harness::*;

/// Two nodes, each with `repair_ms` between repair rounds, taken for dead
/// 1.5 s after their last heartbeat.
async fn two_nodes(redis: &Redis, repair_ms: &str) -> (TestServer, TestServer) {
    two_nodes_with(redis, &["--repair-interval-ms", repair_ms]).await
}

async fn two_nodes_with(redis: &Redis, more: &[&str]) -> (TestServer, TestServer) {
    let url = Postgres::shared().fresh_database();
    let redis_url = redis.url();
    let mut flags = vec![
        "--database",
        &url,
        "--redis",
        &redis_url,
        "--presence-ttl-ms",
        "1500",
    ];
    flags.extend_from_slice(more);
    (
        TestServer::start_with(&flags).await,
        TestServer::start_with(&flags).await,
    )
}

/// Alice is on the first node, bob on the second. With a repair round a
/// minute apart, everything here arrives through Redis: the message, all
/// three ticks, and typing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alice_and_bob_on_two_nodes_chat_live_with_every_tick() {
    let redis = Redis::start();
    let (one, two) = two_nodes(&redis, "60000").await;
    let alice = one.user("alice").await;
    let bob = two.user("bob").await;
    bob.accepts("alice").await;
    let (a, mut a_events, _) = alice.connect_synced().await;
    let (b, mut b_events, _) = bob.connect_synced().await;
    let conv = a.open("bob").await.unwrap();

    every_tick(
        (&a, &mut a_events),
        (&b, &mut b_events, "bob"),
        conv,
        "across the cluster",
    )
    .await;
    b.send(conv, "and back").await.unwrap();
    expect_event(&mut a_events, "bob's reply", is_message("and back")).await;
    a.typing(conv).await.unwrap();
    expect_event(
        &mut b_events,
        "alice is typing",
        |e| matches!(e, Event::Typing { user, .. } if user == "alice"),
    )
    .await;
    let forwarded = metric(&two.metrics().await, "confab_forwards_received_total");
    assert!(forwarded.is_some_and(|n| n >= 3.0), "{forwarded:?}");
    one.assert_no_panics();
    two.assert_no_panics();
}

/// Redis goes away while both are connected: alice's sends still commit
/// and are acked, and bob gets them at his node's repair round. When Redis
/// is back, the nodes subscribe again by themselves and delivery is live
/// again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_messages_still_arrive_and_live_delivery_comes_back() {
    let redis = Redis::start();
    let (one, two) = two_nodes(&redis, "2000").await;
    let alice = one.user("alice").await;
    let bob = two.user("bob").await;
    bob.accepts("alice").await;
    let (a, _a_events, _) = alice.connect_synced().await;
    let (_b, mut b_events, _) = bob.connect_synced().await;
    let conv = a.open("bob").await.unwrap();

    redis.kill();
    a.send(conv, "while redis is down").await.unwrap();
    expect_event(
        &mut b_events,
        "the repair round brings it",
        is_message("while redis is down"),
    )
    .await;
    let repaired = || async { metric(&two.metrics().await, "confab_messages_repaired_total") };
    assert!(repaired().await.is_some_and(|n| n >= 1.0));

    redis.start_again();
    // Both nodes have subscribed again (alice's channel and bob's).
    let deadline = tokio::time::Instant::now() + WAIT;
    while channels(&redis) < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not subscribed again"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let before = repaired().await;
    a.send(conv, "redis is back").await.unwrap();
    expect_event(&mut b_events, "live again", is_message("redis is back")).await;
    assert_eq!(
        repaired().await,
        before,
        "it came live, not from a repair round"
    );
    one.assert_no_panics();
    two.assert_no_panics();
}

/// Presence is the cluster's: bob, on the second node, sees alice online
/// while she is connected to the first only; alice on both nodes who
/// closes one stays online; and when the node she is left on is killed
/// with -9, the other node sweeps it and bob sees her offline, last seen
/// at its last heartbeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_holds_across_nodes_and_a_killed_node_is_swept() {
    let redis = Redis::start();
    let (mut one, two) = two_nodes(&redis, "60000").await;
    let alice = one.user("alice").await;
    let bob = two.user("bob").await;
    bob.accepts("alice").await;
    {
        // Each writes once: presence shows between those who have.
        let (a, _a_events, _) = alice.connect_synced().await;
        let (b, _b_events, _) = bob.connect_synced().await;
        let conv = a.open("bob").await.unwrap();
        a.send(conv, "hi").await.unwrap();
        b.send(conv, "hello").await.unwrap();
    }
    let (_a1, _a1_events, _) = alice.connect_synced().await;
    let (_b, mut b_events, backlog) = bob.connect_synced().await;
    assert!(
        backlog.iter().any(is_presence("alice", true)),
        "bob's node asks Redis: {backlog:?}"
    );

    let alice_too = alice.relogin_at(&two.url).await;
    let (a2, a2_events, _) = alice_too.connect_synced().await;
    drop(a2_events);
    a2.close().await;
    expect_no_event(
        &mut b_events,
        "alice is still on the first node",
        is_presence("alice", false),
    )
    .await;

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    one.kill9().await;
    let gone = expect_event(
        &mut b_events,
        "the first node is swept",
        is_presence("alice", false),
    )
    .await;
    let Event::Presence { last_seen, .. } = gone else {
        unreachable!()
    };
    // Her last heartbeat: at most a heartbeat (0.5 s) before the kill.
    assert!(
        last_seen.is_some_and(|t| t >= before - 1_000 && t <= before + 1_000),
        "{last_seen:?} against {before}"
    );
    two.assert_no_panics();
}

/// Alice's message rate is the cluster's: a burst of 5, then one a second,
/// through both nodes at once, lets about 5 through in all, not 5 per node.
/// Password guesses against one account through both nodes count
/// together too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_rates_hold_across_nodes() {
    let redis = Redis::start();
    let (one, two) = two_nodes_with(
        &redis,
        &[
            "--messages-per-second",
            "1",
            "--message-burst",
            "5",
            "--password-attempts-per-account",
            "8",
        ],
    )
    .await;
    let alice = one.user("alice").await;
    let bob = one.user("bob").await;
    bob.accepts("alice").await;
    let alice_too = alice.relogin_at(&two.url).await;
    let (a1, _a1_events, _) = alice.connect_synced().await;
    let (a2, _a2_events, _) = alice_too.connect_synced().await;
    let conv = a1.open("bob").await.unwrap();

    let started = std::time::Instant::now();
    let sends = (0..5).flat_map(|i| {
        [
            a1.send(conv, format!("one {i}")),
            a2.send(conv, format!("two {i}")),
        ]
    });
    let results = futures_util::future::join_all(sends).await;
    let elapsed = started.elapsed().as_secs() as usize;
    let sent = results.iter().filter(|r| r.is_ok()).count();
    assert!(
        results
            .iter()
            .filter_map(|r| r.as_ref().err())
            .all(|e| e.code() == Some(confab_protocol::ErrorCode::RateLimited)),
        "{results:?}"
    );
    assert!(
        sent <= 5 + elapsed + 1 && sent < 10,
        "{sent} sent in {elapsed} s"
    );

    // Wrong guesses at her password, through each node in turn: the
    // account's eight an hour (her first login among them) run out for
    // both at once.
    let guess = |node: &TestServer| {
        let addr = node.url.authority.clone();
        async move {
            let body = r#"{"username":"alice","password":"a wrong guess"}"#;
            let request = format!(
                "POST /v1/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let response = raw_http(&addr, &request).await;
            response.split(' ').nth(1).unwrap_or("").to_string()
        }
    };
    let mut wrong = 0;
    for i in 0..20 {
        let node = if i % 2 == 0 { &one } else { &two };
        match guess(node).await.as_str() {
            "401" => wrong += 1,
            "429" => break,
            other => panic!("{other}"),
        }
    }
    assert!((1..8).contains(&wrong), "{wrong} guesses allowed");
    assert_eq!(guess(&one).await, "429");
    assert_eq!(guess(&two).await, "429");
    one.assert_no_panics();
    two.assert_no_panics();
}

/// Alice may hold three sockets in all. Two on the first node and one on
/// the second fill them: a fourth is refused on either node. When one
/// closes, the next one fits again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_connection_limit_holds_across_nodes() {
    let redis = Redis::start();
    let (one, two) = two_nodes_with(&redis, &["--connections-per-user", "3"]).await;
    let alice = one.user("alice").await;
    let alice_too = alice.relogin_at(&two.url).await;
    let (first, _first_events, _) = alice.connect_synced().await;
    let (_second, _second_events, _) = alice.connect_synced().await;
    let (_third, _third_events, _) = alice_too.connect_synced().await;

    let attempt = |user: &TestUser| {
        let (url, token) = (user.url.clone(), user.token().to_string());
        async move { confab_client::Client::connect(&url, &token, ConnectOptions::default()).await }
    };
    for (user, node) in [(&alice_too, "the second node"), (&alice, "the first node")] {
        let refused = attempt(user).await.err().expect("over the user's limit");
        assert_eq!(
            refused.code(),
            Some(ErrorCode::TooManyConnections),
            "on {node}: {refused}"
        );
    }

    first.close().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let _fourth = loop {
        match attempt(&alice_too).await {
            Ok(connected) => break connected,
            Err(e) if e.code() == Some(ErrorCode::TooManyConnections) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "a closed socket still counts"
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    one.assert_no_panics();
    two.assert_no_panics();
}

fn channels(redis: &Redis) -> usize {
    redis
        .cli(&["PUBSUB", "CHANNELS", "confab:u:*"])
        .lines()
        .filter(|l| !l.is_empty())
        .count()
}
