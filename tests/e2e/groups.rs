//! Groups: several members with several devices each, membership changes
//! during traffic, admins, per-member receipts and `info`.

use std::collections::BTreeMap;
use std::time::Duration;

use confab_client::e2e::Received;
use confab_client::{Client, Event, Events};
use confab_protocol::{ConvEvent, ConversationId, ErrorCode, Role};

use crate::harness::*;

/// One device's view of a conversation: seq → what it was (the text of a
/// message, `[sent]` for its own, or the event kind).
type Stream = BTreeMap<i64, String>;

/// Collects what `events` brings of `conv` until seq `last` has arrived;
/// panics on a seq seen twice or out of order. What arrives is contiguous
/// from the first seq this device sees (checked by the callers).
async fn stream_until(events: &mut Events, conv: ConversationId, last: i64) -> Stream {
    let mut seen = Stream::new();
    let deadline = tokio::time::Instant::now() + WAIT * 3;
    while seen.keys().next_back() != Some(&last) {
        let event = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| panic!("timed out at {seen:?}, waiting for {last}"))
            .expect("events end");
        let (seq, what) = match &event {
            Event::Message(m) if m.conv == conv => (m.seq, m.body.clone()),
            Event::GroupChange(m) if m.conv == conv => (m.seq, event_kind(&m.event)),
            Event::Sent(s) if s.conv == conv => (s.seq, "[sent]".into()),
            Event::Undecryptable(u) if u.message.conv == conv => {
                panic!("undecryptable: {}", u.reason)
            }
            _ => continue,
        };
        if let Some(&prev) = seen.keys().next_back() {
            assert!(seq > prev, "out of order: {seq} after {prev}");
        }
        assert!(seen.insert(seq, what).is_none(), "seq {seq} twice");
    }
    seen
}

/// The code the server refused a request with.
fn refusal<T: std::fmt::Debug>(result: Result<T, confab_client::ClientError>) -> ErrorCode {
    match result {
        Err(confab_client::ClientError::Server(e)) => e.code,
        other => panic!("a refusal expected: {other:?}"),
    }
}

fn event_kind(event: &Option<ConvEvent>) -> String {
    let kind = match event {
        Some(ConvEvent::Created { .. }) => "created",
        Some(ConvEvent::Added { .. }) => "added",
        Some(ConvEvent::Removed { .. }) => "removed",
        Some(ConvEvent::Left { .. }) => "left",
        Some(ConvEvent::Renamed { .. }) => "renamed",
        Some(ConvEvent::Admins { .. }) => "admins",
        None => "none",
    };
    format!("[{kind}]")
}

fn texts(stream: &Stream) -> Vec<&str> {
    stream
        .values()
        .map(String::as_str)
        .filter(|t| !t.starts_with('['))
        .collect()
}

/// Sends `n` messages "<prefix> <i>" one after the other.
async fn send_n(client: &Client, conv: ConversationId, prefix: &str, n: usize) {
    for i in 0..n {
        client.send(conv, format!("{prefix} {i}")).await.unwrap();
    }
}

#[tokio::test]
async fn five_members_on_seven_devices_get_every_message_once_in_order() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let alice_phone = alice.add_device().await;
    let bob = server.user("bob").await;
    let bob_phone = bob.add_device().await;
    let (carol, dave, erin) = (
        server.user("carol").await,
        server.user("dave").await,
        server.user("erin").await,
    );
    let (a, mut a_events, _) = alice.connect_synced().await;
    let (_a2, mut a2_events, _) = alice_phone.connect_synced().await;
    let (b, mut b_events, _) = bob.connect_synced().await;
    let (_b2, mut b2_events, _) = bob_phone.connect_synced().await;
    let (c, mut c_events, _) = carol.connect_synced().await;
    let (_d, mut d_events, _) = dave.connect_synced().await;
    // Erin stays offline and catches up at the end.

    let created = a
        .create_group("Trip", &["bob", "carol", "dave", "erin"])
        .await
        .unwrap();
    let conv = created.conv;
    assert_eq!(created.seq, 1);
    let members = a.members(conv).await.unwrap();
    assert_eq!(members.name.as_deref(), Some("Trip"));
    let roles: Vec<_> = members
        .items
        .iter()
        .map(|m| (m.user.as_str(), m.role))
        .collect();
    assert_eq!(
        roles,
        [
            ("alice", Role::Admin),
            ("bob", Role::Member),
            ("carol", Role::Member),
            ("dave", Role::Member),
            ("erin", Role::Member)
        ]
    );

    // Three members write at once.
    tokio::join!(
        send_n(&a, conv, "from alice", 10),
        send_n(&b, conv, "from bob", 10),
        send_n(&c, conv, "from carol", 10),
    );
    let last = 31;
    let mut views = Vec::new();
    for events in [
        &mut a_events,
        &mut a2_events,
        &mut b_events,
        &mut b2_events,
        &mut c_events,
        &mut d_events,
    ] {
        views.push(stream_until(events, conv, last).await);
    }
    let (_e, mut e_events) = erin.connect().await;
    views.push(stream_until(&mut e_events, conv, last).await);

    // Everyone has the same stream: the event first, then the 30 messages,
    // each author's in the order it sent them.
    let full = &views[1]; // alice's phone: every message as a message
    assert_eq!(full[&1], "[created]");
    for view in &views {
        assert_eq!(view.len(), 31);
        for (seq, what) in view {
            assert!(
                what == &full[seq] || what == "[sent]",
                "seq {seq}: {what} vs {}",
                full[seq]
            );
        }
    }
    for author in ["alice", "bob", "carol"] {
        let theirs: Vec<_> = texts(full)
            .into_iter()
            .filter(|t| t.starts_with(&format!("from {author}")))
            .collect();
        let expected: Vec<_> = (0..10).map(|i| format!("from {author} {i}")).collect();
        assert_eq!(theirs, expected, "{author}'s messages in the order sent");
    }
}

#[tokio::test]
async fn a_removed_member_gets_nothing_after_the_removal_and_keeps_what_came_before() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let bob_phone = bob.add_device().await;
    let carol = server.user("carol").await;
    let (a, mut a_events, _) = alice.connect_synced().await;
    let (b, mut b_events, _) = bob.connect_synced().await;
    let (c, mut c_events, _) = carol.connect_synced().await;
    // Bob's phone is offline throughout and syncs at the end.

    let conv = a
        .create_group("Work", &["bob", "carol"])
        .await
        .unwrap()
        .conv;
    // Carol writes while alice removes bob: every message is on one side
    // of the removal, and bob's devices get exactly those before it.
    let writing = send_n(&c, conv, "carol", 20);
    let removing = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        a.remove_members(conv, &["bob"]).await.unwrap()
    };
    let ((), removed) = tokio::join!(writing, removing);
    let last = 22;
    let everyone = stream_until(&mut a_events, conv, last).await;
    assert_eq!(everyone[&removed.seq], "[removed]");
    let expected: Stream = everyone
        .range(..=removed.seq)
        .map(|(s, t)| (*s, t.clone()))
        .collect();

    let bob_live = stream_until(&mut b_events, conv, removed.seq).await;
    assert_eq!(
        bob_live.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    expect_no_event(
        &mut b_events,
        "a message after the removal",
        |e| matches!(e, Event::Message(m) if m.conv == conv),
    )
    .await;
    let (_p, mut phone_events, backlog) = bob_phone.connect_synced().await;
    let phone: Vec<i64> = backlog
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) | Event::GroupChange(m) if m.conv == conv => Some(m.seq),
            _ => None,
        })
        .collect();
    assert_eq!(phone, expected.keys().copied().collect::<Vec<_>>());
    expect_no_event(
        &mut phone_events,
        "anything of the group",
        |e| matches!(e, Event::Message(m) if m.conv == conv),
    )
    .await;

    // Bob can no longer send, type or read on; what he saw stays readable.
    assert_eq!(
        refusal(b.send(conv, "still here?").await),
        ErrorCode::NotMember
    );
    let history = b.history(conv, None, 100).await.unwrap();
    let seqs: Vec<i64> = history.iter().map(|r| r.message().seq).collect();
    assert_eq!(seqs, expected.keys().copied().collect::<Vec<_>>());
    assert!(
        history
            .iter()
            .all(|r| matches!(r, Received::Text(_) | Received::GroupChange(_))),
        "everything before the removal still decrypts"
    );
    let listed = b.conversations().await.unwrap();
    let item = listed.iter().find(|c| c.conv == conv).unwrap();
    assert!(item.left && item.members == 0, "{item:?}");
    assert_eq!(item.last_seq, removed.seq);

    // Carol keeps writing; bob gets none of it, carol and alice all.
    c.send(conv, "after bob").await.unwrap();
    expect_event(&mut a_events, "alice gets it", is_message("after bob")).await;
    expect_no_event(&mut b_events, "bob gets it", is_message("after bob")).await;
    let _ = until(
        &mut c_events,
        |e| matches!(e, Event::Sent(s) if s.seq == last + 1),
    )
    .await;
}

#[tokio::test]
async fn a_send_racing_its_senders_removal_is_refused_never_stored() {
    let server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let carol = server.user("carol").await;
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a
        .create_group("Race", &["bob", "carol"])
        .await
        .unwrap()
        .conv;

    // Bob seals 150 messages for the group as it is (within his frame
    // burst), and writes them all at once on a raw socket while alice
    // removes him: many are in flight at the removal's commit, so the
    // store's own check has to refuse them.
    let members = ["alice".to_string(), "bob".to_string(), "carol".to_string()];
    let mut frames = Vec::new();
    for i in 0..150 {
        let id = confab_protocol::MessageId::new(format!("bob-{i}")).unwrap();
        let content = confab_crypto::Content::text(format!("bob {i}"));
        let body = bob
            .e2e
            .seal(conv, &id, &members, &content, false)
            .await
            .unwrap();
        frames.push(format!(
            r#"{{"type":"send","id":"{id}","conv":{},"body":"{body}"}}"#,
            conv.0
        ));
    }
    let mut raw = RawSocket::authed(&bob).await;
    let (started, start) = tokio::sync::oneshot::channel();
    let writing = async {
        let mut started = Some(started);
        for (i, frame) in frames.iter().enumerate() {
            raw.send_text(frame).await;
            if i == 20 {
                let _ = started.take().unwrap().send(());
            }
        }
        let mut answers = Vec::new();
        while answers.len() < frames.len() {
            let frame = raw.next_json().await.expect("an answer to every send");
            // An own message may come back as `msg` (a gap filled from the
            // store) rather than `sent`: either is its answer.
            if frame["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("bob-"))
                && ["sent", "msg", "error"].contains(&frame["type"].as_str().unwrap())
            {
                answers.push(frame);
            }
        }
        answers
    };
    let removing = async {
        start.await.unwrap();
        a.remove_members(conv, &["bob"]).await.unwrap()
    };
    let (answers, removal) = tokio::join!(writing, removing);
    let stored: Vec<i64> = answers
        .iter()
        .filter(|f| f["type"] != "error")
        .map(|f| f["seq"].as_i64().unwrap())
        .collect();
    let refused: Vec<&str> = answers
        .iter()
        .filter(|f| f["type"] == "error")
        .map(|f| f["code"].as_str().unwrap())
        .collect();
    assert!(
        !refused.is_empty() && refused.iter().all(|c| *c == "not_member"),
        "{refused:?}"
    );
    assert!(
        stored.iter().all(|&s| s < removal.seq),
        "every acked send of bob's is before his removal at {}: {stored:?}",
        removal.seq
    );
    // The store holds nothing of bob's after the removal, and everything acked.
    let (c, _c_events, _) = carol.connect_synced().await;
    let all = c.history(conv, None, 500).await.unwrap();
    let of_bob: Vec<i64> = all
        .iter()
        .filter(|r| r.message().from == "bob")
        .map(|r| r.message().seq)
        .collect();
    assert_eq!(of_bob, stored);
    assert_eq!(all.last().unwrap().message().seq, removal.seq);
}

#[tokio::test]
async fn admins_change_the_group_and_members_may_not() {
    let server = TestServer::start_with(&["--max-group-members", "4"]).await;
    let alice = server.user("alice").await;
    let bob = server.user("bob").await;
    let (carol, dave, erin) = (
        server.user("carol").await,
        server.user("dave").await,
        server.user("erin").await,
    );
    let (a, _a_events, _) = alice.connect_synced().await;
    let (b, mut b_events, _) = bob.connect_synced().await;
    let conv = a
        .create_group("Club", &["bob", "carol"])
        .await
        .unwrap()
        .conv;

    // Bob is a member, not an admin: every admin action is refused.
    assert_eq!(
        refusal(b.add_members(conv, &["dave"]).await),
        ErrorCode::NotAdmin
    );
    assert_eq!(
        refusal(b.remove_members(conv, &["carol"]).await),
        ErrorCode::NotAdmin
    );
    assert_eq!(
        refusal(b.rename_group(conv, "Mine").await),
        ErrorCode::NotAdmin
    );
    assert_eq!(
        refusal(b.make_admins(conv, &["bob"]).await),
        ErrorCode::NotAdmin
    );

    // The size limit: four members in all.
    assert_eq!(
        refusal(a.add_members(conv, &["dave", "erin"]).await),
        ErrorCode::TooManyMembers
    );
    a.add_members(conv, &["dave"]).await.unwrap();
    assert_eq!(
        refusal(a.add_members(conv, &["erin"]).await),
        ErrorCode::TooManyMembers
    );
    assert_eq!(
        refusal(a.add_members(conv, &["dave"]).await),
        ErrorCode::NoChange
    );
    assert_eq!(refusal(a.rename_group(conv, "").await), ErrorCode::BadFrame);
    assert_eq!(
        refusal(a.add_members(conv, &["nobody"]).await),
        ErrorCode::UnknownUser
    );
    let direct = a.open("bob").await.unwrap();
    assert_eq!(
        refusal(a.add_members(direct, &["carol"]).await),
        ErrorCode::NotAGroup
    );

    // Alice makes bob admin; now he may.
    a.make_admins(conv, &["bob"]).await.unwrap();
    b.rename_group(conv, "Bob's club").await.unwrap();
    b.remove_members(conv, &["dave"]).await.unwrap();
    b.add_members(conv, &["erin"]).await.unwrap();
    let list = b.members(conv).await.unwrap();
    assert_eq!(list.name.as_deref(), Some("Bob's club"));
    let names: Vec<_> = list.items.iter().map(|m| m.user.as_str()).collect();
    assert_eq!(names, ["alice", "bob", "carol", "erin"]);

    // Every change is in bob's stream, in order.
    let stream = stream_until(&mut b_events, conv, 6).await;
    let kinds: Vec<_> = stream.values().map(String::as_str).collect();
    assert_eq!(
        kinds,
        [
            "[created]",
            "[added]",
            "[admins]",
            "[renamed]",
            "[removed]",
            "[added]"
        ],
        "{stream:?}"
    );
    let _ = (carol, dave, erin);
}

#[tokio::test]
async fn receipts_go_to_the_author_and_info_says_who_has_it_and_who_read_it() {
    let server = TestServer::start().await;
    let alice = server.user("alice").await;
    let (bob, carol, dave) = (
        server.user("bob").await,
        server.user("carol").await,
        server.user("dave").await,
    );
    let (a, mut a_events, _) = alice.connect_synced().await;
    let (b, mut b_events, _) = bob.connect_synced().await;
    let (c, mut c_events, _) = carol.connect_synced().await;
    let (d, mut d_events, _) = dave.connect_synced().await;
    let conv = a
        .create_group("Ticks", &["bob", "carol", "dave"])
        .await
        .unwrap()
        .conv;
    // Nobody here has written to alice: the group is a request for each
    // until accepted, and their receipts are hidden until then.
    let listed = b.conversations().await.unwrap();
    assert!(
        listed
            .iter()
            .any(|i| i.conv == conv && i.request && i.members == 4)
    );
    c.set_read_receipts(false).await.unwrap();
    for client in [&b, &c] {
        client.accept(conv).await.unwrap();
    }

    let sent = a.send(conv, "who reads this?").await.unwrap();
    for events in [&mut b_events, &mut c_events, &mut d_events] {
        expect_event(events, "the message", is_message("who reads this?")).await;
    }
    b.read(conv, sent.seq).await.unwrap();
    c.read(conv, sent.seq).await.unwrap();
    // Receipts arrive in any order: gather them until both are in.
    let mut cursors: BTreeMap<String, (i64, Option<i64>)> = BTreeMap::new();
    while !(cursors.get("bob").is_some_and(|c| c.1 == Some(sent.seq))
        && cursors.get("carol").is_some_and(|c| c.0 >= sent.seq))
    {
        let receipt = expect_event(
            &mut a_events,
            "receipts of bob and carol",
            |e| matches!(e, Event::Receipt { conv: c, .. } if *c == conv),
        )
        .await;
        if let Event::Receipt {
            user,
            delivered,
            read,
            ..
        } = receipt
        {
            assert_ne!(user, "dave", "dave has not accepted yet");
            let c = cursors.entry(user).or_insert((0, None));
            c.0 = c.0.max(delivered);
            c.1 = c.1.max(read);
        }
    }
    assert_eq!(cursors["carol"].1, None, "carol shares no reads");
    // Dave's receipts are withheld until he accepts; then they come.
    expect_no_event(
        &mut a_events,
        "dave's receipt",
        is_receipt("dave", |_, _| true),
    )
    .await;
    d.accept(conv).await.unwrap();
    expect_event(
        &mut a_events,
        "dave has it",
        is_receipt("dave", |d, _| d >= sent.seq),
    )
    .await;

    // Bob is not the author: he gets no receipts of the others for it.
    expect_no_event(
        &mut b_events,
        "receipts for alice's message",
        |e| matches!(e, Event::Receipt { user, .. } if user != "bob"),
    )
    .await;

    let info = a.info(conv, sent.seq).await.unwrap();
    let by_user: BTreeMap<_, _> = info.iter().map(|i| (i.user.as_str(), i)).collect();
    assert_eq!(
        by_user.keys().copied().collect::<Vec<_>>(),
        ["bob", "carol", "dave"]
    );
    let bob_info = by_user["bob"];
    assert!(bob_info.delivered && bob_info.read, "{bob_info:?}");
    let (delivered_at, read_at) = (bob_info.delivered_at.unwrap(), bob_info.read_at.unwrap());
    assert!(
        delivered_at <= read_at && delivered_at >= sent.ts,
        "{bob_info:?}"
    );
    // Carol shares no reads: she has it, and whether she read it stays hers.
    let carol_info = by_user["carol"];
    assert!(carol_info.delivered && !carol_info.read && carol_info.read_at.is_none());
    assert!(by_user["dave"].delivered && !by_user["dave"].read);
    // Only the author may ask.
    assert_eq!(refusal(b.info(conv, sent.seq).await), ErrorCode::BadFrame);
}

#[tokio::test]
async fn members_leave_and_the_last_admin_hands_over() {
    let server = TestServer::start().await;
    let (alice, bob, carol) = (
        server.user("alice").await,
        server.user("bob").await,
        server.user("carol").await,
    );
    let (a, _a_events, _) = alice.connect_synced().await;
    let (b, mut b_events, _) = bob.connect_synced().await;
    let (c, _c_events, _) = carol.connect_synced().await;
    let conv = a
        .create_group("Book club", &["bob", "carol"])
        .await
        .unwrap()
        .conv;
    b.send(conv, "hello").await.unwrap();

    c.leave_group(conv).await.unwrap();
    let left = a.leave_group(conv).await.unwrap();
    let change = expect_event(
        &mut b_events,
        "alice left",
        |e| matches!(e, Event::GroupChange(m) if m.seq == left.seq),
    )
    .await;
    let Event::GroupChange(m) = change else {
        unreachable!()
    };
    // Bob, the only one left, is the admin now.
    assert_eq!(
        m.event,
        Some(ConvEvent::Left {
            admins: vec!["bob".into()]
        })
    );
    let list = b.members(conv).await.unwrap();
    assert_eq!(list.items.len(), 1);
    assert_eq!(
        (list.items[0].user.as_str(), list.items[0].role),
        ("bob", Role::Admin)
    );
    b.rename_group(conv, "Bob alone").await.unwrap();
    // Those who left can neither send nor change anything.
    assert_eq!(
        refusal(c.rename_group(conv, "Carol's").await),
        ErrorCode::NotMember
    );
    assert!(c.send(conv, "hi?").await.is_err());
}

#[tokio::test]
async fn two_admins_change_the_members_at_the_same_moment_and_both_changes_stand() {
    let server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (_carol, dave, erin) = (
        server.user("carol").await,
        server.user("dave").await,
        server.user("erin").await,
    );
    let (a, mut a_events, _) = alice.connect_synced().await;
    let (b, mut b_events, _) = bob.connect_synced().await;
    let conv = a
        .create_group("Both", &["bob", "carol"])
        .await
        .unwrap()
        .conv;
    a.make_admins(conv, &["bob"]).await.unwrap();

    let (added, removed) = tokio::join!(
        a.add_members(conv, &["dave", "erin"]),
        b.remove_members(conv, &["carol"])
    );
    let (added, removed) = (added.unwrap(), removed.unwrap());
    assert_ne!(added.seq, removed.seq);
    let last = added.seq.max(removed.seq);
    let a_view = stream_until(&mut a_events, conv, last).await;
    let b_view = stream_until(&mut b_events, conv, last).await;
    assert_eq!(a_view, b_view, "one order for everyone");
    assert_eq!(a_view[&added.seq], "[added]");
    assert_eq!(a_view[&removed.seq], "[removed]");
    let names: Vec<_> = a
        .members(conv)
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|m| m.user)
        .collect();
    assert_eq!(names, ["alice", "bob", "dave", "erin"]);
    // Dave and erin see the group from their addition on, not before.
    let (dv, _dv_events, _) = dave.connect_synced().await;
    let seen: Vec<i64> = dv
        .history(conv, None, 50)
        .await
        .unwrap()
        .iter()
        .map(|r| r.message().seq)
        .collect();
    assert_eq!(seen.first(), Some(&added.seq), "{seen:?}");
    // A resend in a group is answered with the original, as in 1:1.
    let id = confab_protocol::MessageId::new("welcome-1").unwrap();
    let first = a.send_with_id(conv, id.clone(), "welcome").await.unwrap();
    let again = a.send_with_id(conv, id, "welcome").await.unwrap();
    assert_eq!((again.seq, again.ts), (first.seq, first.ts));
    let (_e, mut e_events, _) = erin.connect_synced().await;
    let _ = e_events.try_recv();
    let history = dv.history(conv, None, 50).await.unwrap();
    assert!(history.iter().any(|r| r.text() == Some("welcome")));
}

#[tokio::test]
async fn a_member_added_during_traffic_gets_everything_from_the_addition_on() {
    let server = TestServer::start().await;
    let (alice, bob, carol) = (
        server.user("alice").await,
        server.user("bob").await,
        server.user("carol").await,
    );
    let carol_phone = carol.add_device().await;
    let (a, _a_events, _) = alice.connect_synced().await;
    let (b, mut b_events, _) = bob.connect_synced().await;
    let (_c, mut c_events, _) = carol.connect_synced().await;
    let conv = a.create_group("Growing", &["bob"]).await.unwrap().conv;

    // Bob writes while alice adds carol; the clients reseal for carol's
    // devices as soon as the server says the members changed.
    let writing = send_n(&b, conv, "bob", 30);
    let adding = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        a.add_members(conv, &["carol"]).await.unwrap()
    };
    let ((), added) = tokio::join!(writing, adding);
    let everyone = stream_until(&mut b_events, conv, 32).await;
    assert_eq!(everyone[&added.seq], "[added]");
    let expected: Vec<i64> = everyone.range(added.seq..).map(|(s, _)| *s).collect();

    // Carol's laptop live, her phone at its first sync: from the addition
    // on, each message once, decrypted; nothing from before.
    let live = stream_until(&mut c_events, conv, 32).await;
    assert_eq!(live.keys().copied().collect::<Vec<_>>(), expected);
    let (_p, mut phone_events) = carol_phone.connect().await;
    let synced = stream_until(&mut phone_events, conv, 32).await;
    assert_eq!(synced, live);
    assert_eq!(texts(&live).len(), 32 - added.seq as usize);
}

#[tokio::test]
async fn typing_in_a_group_reaches_the_other_members_once_the_typist_has_written() {
    let server = TestServer::start().await;
    let (alice, bob, carol) = (
        server.user("alice").await,
        server.user("bob").await,
        server.user("carol").await,
    );
    let (a, _a_events, _) = alice.connect_synced().await;
    let (_b, mut b_events, _) = bob.connect_synced().await;
    let (_c, mut c_events, _) = carol.connect_synced().await;
    let conv = a
        .create_group("Quiet", &["bob", "carol"])
        .await
        .unwrap()
        .conv;
    let typing = |e: &Event| matches!(e, Event::Typing { user, .. } if user == "alice");

    // Making the group is not writing in it: no typing shown yet.
    a.typing(conv).await.unwrap();
    expect_no_event(&mut b_events, "typing before alice wrote", typing).await;
    a.send(conv, "hi both").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    a.typing(conv).await.unwrap();
    expect_event(&mut b_events, "bob sees alice typing", typing).await;
    expect_event(&mut c_events, "carol sees alice typing", typing).await;
    // At most one notice a second per conversation.
    a.typing(conv).await.unwrap();
    expect_no_event(&mut c_events, "a second notice within the second", typing).await;
}
