//! Presence, last seen, typing and blocks.

use std::time::{Duration, Instant};

use confab_client::{ConnectOptions, Event};
use confab_protocol::ErrorCode;

use crate::harness::*;

/// Short heartbeats so that a silent connection is noticed within a second.
const FAST: &[&str] = &["--heartbeat-ms", "200", "--idle-timeout-ms", "1000"];

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

#[tokio::test]
async fn bob_sees_alice_come_and_go_and_her_last_seen() {
    let server = TestServer::start_with(FAST).await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (_b, mut b_events, _) = bob.connect_synced().await;
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    expect_no_event(&mut b_events, "alice's presence before she wrote", |e| {
        matches!(e, Event::Presence { .. })
    })
    .await;

    a.send(conv, "hi bob").await.unwrap();
    expect_event(
        &mut b_events,
        "alice online once she wrote",
        is_presence("alice", true),
    )
    .await;

    let before = now_ms();
    a.close().await;
    let Event::Presence { last_seen, .. } =
        expect_event(&mut b_events, "alice offline", is_presence("alice", false)).await
    else {
        unreachable!()
    };
    let last_seen = last_seen.expect("offline comes with last seen");
    assert!(
        (before..=now_ms()).contains(&last_seen),
        "{before} <= {last_seen}"
    );

    // Someone connecting later is told when she was last seen.
    let (_b2, _b2_events, backlog) = bob.connect_synced().await;
    assert!(
        backlog.iter().any(|e| matches!(e,
            Event::Presence { user, online: false, last_seen: Some(t) } if user == "alice" && *t == last_seen)),
        "{backlog:?}"
    );
}

#[tokio::test]
async fn a_connection_that_dies_silently_goes_offline_within_the_timeout() {
    let server = TestServer::start_with(FAST).await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    a.send(conv, "hi").await.unwrap();
    let (_b, mut b_events, backlog) = bob.connect_synced().await;
    assert!(backlog.iter().any(is_presence("alice", true)));

    // Heartbeats keep a quiet but healthy connection open well past the timeout.
    expect_no_event(
        &mut b_events,
        "offline while heartbeating",
        is_presence("alice", false),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    expect_no_event(
        &mut b_events,
        "offline while heartbeating",
        is_presence("alice", false),
    )
    .await;

    let stalled = Instant::now();
    let stalled_ms = now_ms();
    a.stall().await;
    let Event::Presence { last_seen, .. } =
        expect_event(&mut b_events, "alice offline", is_presence("alice", false)).await
    else {
        unreachable!()
    };
    let took = stalled.elapsed();
    assert!(took < Duration::from_millis(2500), "noticed after {took:?}");
    // Last seen is her last heartbeat (every 200 ms), not when the server
    // noticed the silence a timeout (1 s) later.
    let last_seen = last_seen.expect("offline comes with last seen");
    assert!(
        (stalled_ms - 1000..=stalled_ms + 100).contains(&last_seen),
        "stalled at {stalled_ms}, last seen {last_seen}, offline announced {} ms later",
        took.as_millis()
    );

    // The same when the client vanishes without a close frame.
    let (a, _a_events, _) = alice.connect_synced().await;
    expect_event(&mut b_events, "alice back", is_presence("alice", true)).await;
    drop(a);
    expect_event(&mut b_events, "alice gone", is_presence("alice", false)).await;
}

#[tokio::test]
async fn a_silent_client_is_closed_with_idle_timeout() {
    let server = TestServer::start_with(FAST).await;
    let alice = server.user("alice").await;
    let options = ConnectOptions {
        heartbeat: false,
        ..ConnectOptions::default()
    };
    let (_a, mut events) = alice.connect_with(options).await;
    let closed = expect_event(&mut events, "closed", |e| matches!(e, Event::Closed(_))).await;
    assert!(
        matches!(&closed, Event::Closed(Some(e)) if e.code == ErrorCode::IdleTimeout),
        "{closed:?}"
    );
}

#[tokio::test]
async fn a_stranger_cannot_watch_presence() {
    let server = TestServer::start_with(FAST).await;
    let (alice, carol) = (server.user("alice").await, server.user("carol").await);
    let (c, mut c_events, _) = carol.connect_synced().await;
    let conv = c.open("alice").await.unwrap();
    c.send(conv, "hello, you don't know me").await.unwrap();

    let (a, _a_events, backlog) = alice.connect_synced().await;
    assert!(
        backlog.iter().any(is_presence("carol", true)),
        "carol wrote, so alice may see her"
    );
    a.close().await;
    expect_no_event(&mut c_events, "alice's presence", |e| {
        matches!(e, Event::Presence { .. })
    })
    .await;

    let (a, _a_events, _) = alice.connect_synced().await;
    expect_no_event(&mut c_events, "alice's presence", |e| {
        matches!(e, Event::Presence { .. })
    })
    .await;
    a.send(conv, "hi carol").await.unwrap();
    expect_event(
        &mut c_events,
        "alice visible once she replied",
        is_presence("alice", true),
    )
    .await;
}

#[tokio::test]
async fn several_connections_count_as_one_presence() {
    let server = TestServer::start_with(FAST).await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let laptop = alice;
    let phone = laptop.add_device().await;
    let (a1, _e1, _) = laptop.connect_synced().await;
    let conv = a1.open("bob").await.unwrap();
    a1.send(conv, "hi").await.unwrap();
    let (a2, _e2, _) = phone.connect_synced().await;
    let (_b, mut b_events, _) = bob.connect_synced().await;

    a1.close().await;
    expect_no_event(
        &mut b_events,
        "offline while the phone is on",
        is_presence("alice", false),
    )
    .await;
    a2.close().await;
    expect_event(&mut b_events, "offline", is_presence("alice", false)).await;
}

#[tokio::test]
async fn typing_is_forwarded_under_the_presence_rule_and_rate_limited() {
    let server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, mut a_events, _) = alice.connect_synced().await;
    let (b, mut b_events, _) = bob.connect_synced().await;
    let conv = a.open("bob").await.unwrap();

    b.typing(conv).await.unwrap();
    expect_no_event(&mut a_events, "typing from bob before he wrote", |e| {
        matches!(e, Event::Typing { .. })
    })
    .await;

    a.send(conv, "hi").await.unwrap();
    for _ in 0..5 {
        a.typing(conv).await.unwrap();
    }
    let seen = collect_for(&mut b_events, QUIET).await;
    let typing = seen
        .iter()
        .filter(|e| matches!(e, Event::Typing { user, conv: c } if user == "alice" && *c == conv))
        .count();
    assert_eq!(typing, 1, "one notice per second at most: {seen:?}");
    expect_no_event(&mut a_events, "own typing echoed", |e| {
        matches!(e, Event::Typing { .. })
    })
    .await;
}

#[tokio::test]
async fn blocked_users_exchange_nothing() {
    let server = TestServer::start_with(FAST).await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, mut a_events, _) = alice.connect_synced().await;
    let (b, mut b_events, _) = bob.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    a.send(conv, "hi").await.unwrap();
    b.send(conv, "hi back").await.unwrap();
    expect_event(&mut b_events, "alice's message", is_message("hi")).await;

    b.block("alice").await.unwrap();
    collect_for(&mut b_events, Duration::from_millis(200)).await;
    collect_for(&mut a_events, Duration::from_millis(200)).await;
    let err = a.send(conv, "are you there?").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::Blocked));
    let err = b.send(conv, "go away").await.unwrap_err();
    assert_eq!(
        err.code(),
        Some(ErrorCode::Blocked),
        "a block works both ways"
    );

    a.typing(conv).await.unwrap();
    b.read(conv, 2).await.unwrap();
    // Bob's own devices hear of his read: by then the server has handled it.
    let mut seen = until(&mut b_events, is_receipt("bob", |_, r| r == Some(2))).await;
    expect_no_event(
        &mut a_events,
        "bob's read receipt",
        is_receipt("bob", |_, r| r.is_some()),
    )
    .await;
    a.close().await;
    seen.extend(collect_for(&mut b_events, QUIET).await);
    assert!(
        !seen
            .iter()
            .any(|e| matches!(e, Event::Presence { .. } | Event::Typing { .. })),
        "{seen:?}"
    );

    let (a, _a_events, backlog) = alice.connect_synced().await;
    let from_bob = |e: &Event| matches!(e, Event::Presence { user, .. } | Event::Receipt { user, .. } if user == "bob");
    assert!(!backlog.iter().any(from_bob), "{backlog:?}");

    b.unblock("alice").await.unwrap();
    a.send(conv, "friends again").await.unwrap();
    expect_event(
        &mut b_events,
        "messages flow again",
        is_message("friends again"),
    )
    .await;
}

#[tokio::test]
async fn with_presence_off_nobody_sees_presence() {
    let server = TestServer::start_with(&["--no-presence"]).await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (_b, mut b_events, _) = bob.connect_synced().await;
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    a.send(conv, "hi").await.unwrap();
    expect_event(&mut b_events, "the message", is_message("hi")).await;
    a.close().await;
    let (_a, _a_events, _) = alice.connect_synced().await;
    expect_no_event(&mut b_events, "presence", |e| {
        matches!(e, Event::Presence { .. })
    })
    .await;
}
