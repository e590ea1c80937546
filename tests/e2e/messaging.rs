//! One-to-one messaging: ticks, offline delivery, resends, devices, history.

use confab_client::e2e::Received;
use confab_client::{ConnectOptions, Event, new_message_id};
use confab_protocol::{ErrorCode, MessageId};

use crate::harness::*;

#[tokio::test]
async fn alice_and_bob_online_alice_sees_sent_delivered_read() {
    let server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, mut a_events, _) = alice.connect_synced().await;
    let (b, mut b_events, _) = bob.connect_synced().await;

    let conv = a.open("bob").await.unwrap();
    bob.accepts("alice").await;
    assert_eq!(
        b.open("alice").await.unwrap(),
        conv,
        "one conversation per pair"
    );
    let sent = a.send(conv, "hello bob").await.unwrap();
    assert_eq!(sent.seq, 1);
    expect_event(
        &mut a_events,
        "sent event",
        |e| matches!(e, Event::Sent(s) if s.seq == 1),
    )
    .await;

    let Event::Message(m) = expect_event(
        &mut b_events,
        "bob gets the message",
        is_message("hello bob"),
    )
    .await
    else {
        unreachable!()
    };
    assert_eq!(
        (m.from.as_str(), m.seq, m.id.clone()),
        ("alice", 1, sent.id)
    );
    // Bob's client confirmed delivery as it read; Alice sees the second tick.
    expect_event(&mut a_events, "delivered", is_receipt("bob", |d, _| d >= 1)).await;
    b.read(conv, 1).await.unwrap();
    expect_event(
        &mut a_events,
        "read",
        is_receipt("bob", |_, r| r == Some(1)),
    )
    .await;
}

#[tokio::test]
async fn bob_offline_gets_everything_in_order_when_he_reconnects() {
    let server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, mut a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    bob.accepts("alice").await;
    for i in 1..=5 {
        a.send(conv, format!("m{i}")).await.unwrap();
    }
    expect_no_event(
        &mut a_events,
        "delivered before bob is online",
        is_receipt("bob", |d, _| d > 0),
    )
    .await;

    let (_b, _b_events, backlog) = bob.connect_synced().await;
    let got = messages(&backlog);
    assert_eq!(
        got.iter()
            .map(|(_, seq, body)| (*seq, body.as_str()))
            .collect::<Vec<_>>(),
        [(1, "m1"), (2, "m2"), (3, "m3"), (4, "m4"), (5, "m5")]
    );
    expect_event(
        &mut a_events,
        "delivered after bob connects",
        is_receipt("bob", |d, _| d == 5),
    )
    .await;
}

#[tokio::test]
async fn alice_offline_when_bob_reads_sees_read_on_her_next_connect() {
    let server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    bob.accepts("alice").await;
    a.send(conv, "are you there?").await.unwrap();
    a.close().await;

    let (b, mut b_events, backlog) = bob.connect_synced().await;
    assert_eq!(messages(&backlog).len(), 1);
    b.read(conv, 1).await.unwrap();
    // Bob's own devices hear of his read cursor too: that is when it is stored.
    expect_event(
        &mut b_events,
        "own read receipt",
        is_receipt("bob", |_, r| r == Some(1)),
    )
    .await;

    let (_a, _a_events, backlog) = alice.connect_synced().await;
    assert!(
        backlog
            .iter()
            .any(is_receipt("bob", |d, r| d == 1 && r == Some(1))),
        "alice sees delivered and read at connect: {backlog:?}"
    );
}

#[tokio::test]
async fn a_resend_after_a_dropped_socket_is_not_a_second_message() {
    let server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    let id = new_message_id();
    let first = a.send_with_id(conv, id.clone(), "once").await.unwrap();
    drop(a);

    let (a, _a_events, _) = alice.connect_synced().await;
    let again = a
        .send_with_id(conv, id.clone(), "once, again")
        .await
        .unwrap();
    assert_eq!(again, first, "the resend gets the original ack");
    let next = a.send(conv, "after").await.unwrap();
    assert_eq!(next.seq, 2, "no seq was used by the resend");

    let (b, _b_events, backlog) = bob.connect_synced().await;
    assert_eq!(
        messages(&backlog)
            .into_iter()
            .map(|(_, s, b)| (s, b))
            .collect::<Vec<_>>(),
        [(1, "once".to_string()), (2, "after".to_string())]
    );
    assert_eq!(b.history(conv, None, 50).await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_device_that_never_confirms_gives_no_delivered_tick() {
    let server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, mut a_events, _) = alice.connect_synced().await;
    let options = ConnectOptions {
        confirm_delivery: false,
        ..ConnectOptions::default()
    };
    let (b, mut b_events) = bob.connect_with(options).await;
    let conv = a.open("bob").await.unwrap();
    bob.accepts("alice").await;
    a.send(conv, "did you get this?").await.unwrap();
    expect_event(
        &mut b_events,
        "bob receives",
        is_message("did you get this?"),
    )
    .await;
    expect_no_event(
        &mut a_events,
        "a delivered tick",
        is_receipt("bob", |d, _| d > 0),
    )
    .await;

    b.delivered(conv, 1).await.unwrap();
    expect_event(
        &mut a_events,
        "delivered once confirmed",
        is_receipt("bob", |d, _| d == 1),
    )
    .await;
}

#[tokio::test]
async fn two_devices_each_see_the_conversation_once_in_order() {
    let server = TestServer::start().await;
    let alice1 = server.user("alice").await;
    let alice2 = alice1.add_device().await;
    let bob = server.user("bob").await;
    assert_ne!(alice1.login.device, alice2.login.device);
    let (a1, mut a1_events, _) = alice1.connect_synced().await;
    let (_a2, mut a2_events, _) = alice2.connect_synced().await;
    let (b, mut b_events, _) = bob.connect_synced().await;
    let conv = a1.open("bob").await.unwrap();

    a1.send(conv, "from laptop").await.unwrap();
    let Event::Message(m) = expect_event(
        &mut a2_events,
        "alice's other device",
        is_message("from laptop"),
    )
    .await
    else {
        unreachable!()
    };
    assert_eq!(
        (m.from.as_str(), m.from_device),
        ("alice", alice1.login.device)
    );
    expect_event(&mut b_events, "bob", is_message("from laptop")).await;

    b.send(conv, "hi both").await.unwrap();
    for events in [&mut a1_events, &mut a2_events] {
        expect_event(events, "both alice devices", is_message("hi both")).await;
    }
    for (i, events) in [&mut a1_events, &mut a2_events].into_iter().enumerate() {
        let late = collect_for(events, QUIET).await;
        assert!(
            messages(&late).is_empty(),
            "device {i} got extra messages: {late:?}"
        );
    }
    for client in [&a1, &_a2, &b] {
        assert_eq!(client.state().duplicates() + client.state().gaps(), 0);
    }
}

#[tokio::test]
async fn a_new_device_starts_at_the_head_and_pages_back() {
    let server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    for i in 1..=25 {
        a.send(conv, format!("m{i}")).await.unwrap();
    }
    let phone = bob.add_device().await;
    assert!(phone.login.new_device);
    let (p, _p_events, backlog) = phone.connect_synced().await;
    assert!(
        messages(&backlog).is_empty(),
        "a new device gets no backlog: {backlog:?}"
    );

    let newest = p.history(conv, None, 10).await.unwrap();
    assert_eq!(
        newest.iter().map(|m| m.message().seq).collect::<Vec<_>>(),
        (16..=25).collect::<Vec<_>>()
    );
    let older = p.history(conv, Some(16), 10).await.unwrap();
    assert_eq!(
        older.iter().map(|m| m.message().seq).collect::<Vec<_>>(),
        (6..=15).collect::<Vec<_>>()
    );
    let oldest = p.history(conv, Some(6), 10).await.unwrap();
    assert_eq!(
        oldest.iter().map(|m| m.message().seq).collect::<Vec<_>>(),
        (1..=5).collect::<Vec<_>>()
    );
    assert!(p.history(conv, Some(1), 10).await.unwrap().is_empty());
    // Older messages were encrypted before this device was on bob's list:
    // it sees that they exist, and why it cannot read them.
    assert!(
        newest.iter().chain(&older).chain(&oldest).all(|r| matches!(
            r,
            Received::Undecryptable(u) if u.reason.contains("not addressed to this device")
        )),
        "{newest:?}"
    );
    a.send(conv, "m26").await.unwrap();
    let latest = p.history(conv, None, 1).await.unwrap();
    assert_eq!(
        latest[0].text(),
        Some("m26"),
        "readable from when it was added"
    );

    // The device's old owner (bob's first device) still gets everything.
    let (_b, _b_events, backlog) = bob.connect_synced().await;
    assert_eq!(messages(&backlog).len(), 26);
}

#[tokio::test]
async fn logging_in_again_with_the_device_id_keeps_the_device_and_its_place() {
    let server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    a.send(conv, "one").await.unwrap();
    let (b, _b_events, backlog) = bob.connect_synced().await;
    assert_eq!(messages(&backlog).len(), 1);
    b.close().await;
    a.send(conv, "two").await.unwrap();

    let again = bob.relogin().await;
    assert!(!again.login.new_device);
    assert_eq!(again.login.device, bob.login.device);
    let (_b, _b_events, backlog) = again.connect_synced().await;
    assert_eq!(
        messages(&backlog)
            .into_iter()
            .map(|(_, s, _)| s)
            .collect::<Vec<_>>(),
        [2],
        "resumes after what the device confirmed"
    );
}

#[tokio::test]
async fn offline_messages_survive_a_server_restart() {
    let mut server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    for i in 1..=3 {
        a.send(conv, format!("m{i}")).await.unwrap();
    }
    drop(a);
    server.stop().await;
    server.restart().await;
    let (_b, _b_events, backlog) = bob.connect_synced().await;
    assert_eq!(messages(&backlog).len(), 3);
}

#[tokio::test]
async fn with_read_receipts_off_neither_side_sees_read() {
    let server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, mut a_events, _) = alice.connect_synced().await;
    let (b, mut b_events, _) = bob.connect_synced().await;
    b.set_read_receipts(false).await.unwrap();
    let conv = a.open("bob").await.unwrap();
    bob.accepts("alice").await;
    a.send(conv, "ping").await.unwrap();
    expect_event(&mut b_events, "bob receives", is_message("ping")).await;
    expect_event(
        &mut a_events,
        "delivered still shows",
        is_receipt("bob", |d, _| d == 1),
    )
    .await;
    b.read(conv, 1).await.unwrap();
    expect_no_event(
        &mut a_events,
        "bob's read",
        is_receipt("bob", |_, r| r.is_some()),
    )
    .await;

    b.send(conv, "pong").await.unwrap();
    expect_event(&mut a_events, "alice receives", is_message("pong")).await;
    a.read(conv, 2).await.unwrap();
    expect_no_event(
        &mut b_events,
        "alice's read, hidden from bob",
        is_receipt("alice", |_, r| r.is_some()),
    )
    .await;
}

#[tokio::test]
async fn conversations_list_unread_counts() {
    let server = TestServer::start().await;
    let (alice, bob, carol) = (
        server.user("alice").await,
        server.user("bob").await,
        server.user("carol").await,
    );
    let (b, _b_events, _) = bob.connect_synced().await;
    let (c, _c_events, _) = carol.connect_synced().await;
    let with_bob = b.open("alice").await.unwrap();
    let with_carol = c.open("alice").await.unwrap();
    for i in 0..3 {
        b.send(with_bob, format!("b{i}")).await.unwrap();
    }
    // Timestamps are milliseconds: make "most recent" unambiguous.
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    c.send(with_carol, "c").await.unwrap();

    let (a, _a_events, _) = alice.connect_synced().await;
    a.read(with_bob, 1).await.unwrap();
    let list = tokio::time::timeout(WAIT, async {
        loop {
            let list = a.conversations().await.unwrap();
            if list.iter().any(|c| c.peer == "bob" && c.unread == 2) {
                return list;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("read cursor stored");
    let unread: Vec<_> = list
        .iter()
        .map(|c| (c.peer.as_str(), c.unread, c.last_seq))
        .collect();
    assert!(
        unread.contains(&("bob", 2, 3)) && unread.contains(&("carol", 1, 1)),
        "{unread:?}"
    );
    assert_eq!(list[0].peer, "carol", "most recent first");
}

#[tokio::test]
async fn a_failed_commit_is_never_acked_and_the_server_stays_up() {
    if sqlite_only("--max-db-mb caps the SQLite file; the PostgreSQL scenario kills the database") {
        return;
    }
    let server = TestServer::start_with(&["--max-db-mb", "1", "--max-body-bytes", "65536"]).await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    // About 54 KB once encrypted and base64url-encoded.
    let body = "x".repeat(40_000);
    let mut acked = Vec::new();
    let failed: MessageId = loop {
        let id = new_message_id();
        match a.send_with_id(conv, id.clone(), body.clone()).await {
            Ok(sent) => acked.push(sent.seq),
            Err(e) => {
                assert_eq!(e.code(), Some(ErrorCode::StorageUnavailable), "{e}");
                break id;
            }
        }
        assert!(acked.len() < 100, "the size cap never bit");
    };
    assert!(server.healthy().await);
    let (b, _b_events, backlog) = bob.connect_synced().await;
    let got: Vec<i64> = messages(&backlog).into_iter().map(|(_, s, _)| s).collect();
    assert_eq!(
        got, acked,
        "every acked message arrives; the failed one does not"
    );
    let stored = b.history(conv, None, 500).await.unwrap();
    assert!(stored.iter().all(|m| m.message().id != failed));
    // The failed message took no seq: resent (short, so it may now fit) it
    // gets the next one, or fails again.
    match a.send_with_id(conv, failed, "short").await {
        Ok(sent) => assert_eq!(sent.seq, acked.last().unwrap() + 1),
        Err(e) => assert_eq!(e.code(), Some(ErrorCode::StorageUnavailable)),
    }
}

#[tokio::test]
async fn a_reader_that_cannot_keep_up_is_cut_off_and_catches_up_by_sync() {
    let server = TestServer::start_with(&[FAST_SENDERS, &["--send-queue", "16"]].concat()).await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (b, _b_events, _) = bob.connect_synced().await;
    let conv = b.open("alice").await.unwrap();
    b.send(conv, "hi").await.unwrap();
    let (a, mut a_events, backlog) = alice.connect_synced().await;
    assert!(backlog.iter().any(is_presence("bob", true)));

    // Bob's client stops reading; the server must not buffer for him without bound.
    b.stall().await;
    let body = "x".repeat(32 * 1024);
    for _ in 0..400 {
        a.send(conv, body.clone()).await.unwrap();
    }
    expect_event(
        &mut a_events,
        "bob's stuck connection closed",
        is_presence("bob", false),
    )
    .await;

    let (_b2, _b2_events, backlog) = bob.connect_synced().await;
    let seqs: Vec<i64> = messages(&backlog)
        .into_iter()
        .map(|(_, seq, _)| seq)
        .collect();
    assert_eq!(
        seqs,
        (2..=401).collect::<Vec<_>>(),
        "everything, in order, by sync"
    );
}

#[tokio::test]
async fn a_resend_while_the_first_attempt_is_in_flight_is_one_message() {
    let server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    drop(a);

    // The first attempt goes out and the socket dies before any answer.
    let mut raw = RawSocket::authed(&alice).await;
    let id = MessageId::new("inflight-1").unwrap();
    let members = ["alice".to_string(), "bob".to_string()];
    let envelope = alice
        .e2e
        .seal(
            conv,
            &id,
            &members,
            &confab_crypto::Content::text("first try"),
            false,
        )
        .await
        .unwrap();
    let frame = format!(
        r#"{{"type":"send","id":"inflight-1","conv":{},"body":"{envelope}"}}"#,
        conv.0
    );
    raw.send_text(&frame).await;
    drop(raw);

    let (a, _a_events, _) = alice.connect_synced().await;
    let again = a
        .send_with_id(conv, id.clone(), "second try")
        .await
        .unwrap();
    let again2 = a.send_with_id(conv, id, "third try").await.unwrap();
    assert_eq!(again.seq, again2.seq);
    let (b, _b_events, backlog) = bob.connect_synced().await;
    assert_eq!(messages(&backlog).len(), 1, "{backlog:?}");
    assert_eq!(b.history(conv, None, 10).await.unwrap().len(), 1);
}

#[tokio::test]
async fn history_pages_of_large_messages_stay_within_bounds() {
    let server =
        TestServer::start_with(&["--frames-per-second", "1000", "--frame-burst", "1000"]).await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    // About 54 KB each once encrypted: a 1 MiB history page holds ~19.
    let big = "x".repeat(40_000);
    for _ in 0..40 {
        a.send(conv, big.clone()).await.unwrap();
    }
    let (b, _b_events, backlog) = bob.connect_synced().await;
    assert_eq!(messages(&backlog).len(), 40, "sync pages through it");
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = b
            .history(conv, before, 500)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", server.log()));
        if page.is_empty() {
            break;
        }
        assert!(page.len() < 40, "a page is cut by size, not only by count");
        before = Some(page[0].message().seq);
        seen.extend(page.into_iter().map(|m| m.message().seq));
    }
    seen.sort();
    assert_eq!(
        seen,
        (1..=40).collect::<Vec<_>>(),
        "paging back finds every message once"
    );
    server.assert_no_panics();
}

#[tokio::test]
async fn sigterm_with_sends_in_flight_loses_nothing_acked() {
    let mut server = TestServer::start_with(FAST_SENDERS).await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    let a = std::sync::Arc::new(a);
    let sends: Vec<_> = (0..300)
        .map(|i| {
            let a = a.clone();
            tokio::spawn(async move { a.send(conv, format!("m{i}")).await.ok().map(|s| s.seq) })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    server.stop().await;
    let mut acked = Vec::new();
    for send in sends {
        acked.extend(send.await.unwrap());
    }
    server.restart().await;
    let (_b, _b_events, backlog) = bob.connect_synced().await;
    let stored: std::collections::HashSet<i64> =
        messages(&backlog).into_iter().map(|(_, s, _)| s).collect();
    assert!(
        acked.iter().all(|seq| stored.contains(seq)),
        "every acked message is there after a graceful stop"
    );
    println!(
        "{} of 300 acked before the stop, {} stored",
        acked.len(),
        stored.len()
    );
}
