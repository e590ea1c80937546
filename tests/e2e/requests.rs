//! Message requests: a conversation a stranger starts holds back the
//! recipient's receipts and presence and takes only a few messages until
//! the recipient answers or accepts it.

use confab_client::Event;
use confab_protocol::ErrorCode;

use crate::harness::*;

#[tokio::test]
async fn a_strangers_fourth_message_is_refused_and_nothing_reaches_them_until_accepted() {
    let server = TestServer::start_with(&["--request-messages", "3"]).await;
    let (stranger, bob) = (server.user("stranger").await, server.user("bob").await);
    let (b, mut b_events, _) = bob.connect_synced().await;
    let (s, mut s_events, _) = stranger.connect_synced().await;

    let conv = s.open("bob").await.unwrap();
    for i in 1..=3 {
        s.send(conv, format!("hello {i}")).await.unwrap();
    }
    let refused = s
        .send_with_id(
            conv,
            confab_protocol::MessageId::new("fourth").unwrap(),
            "hello 4",
        )
        .await;
    assert_eq!(
        refused.unwrap_err().code(),
        Some(ErrorCode::NotAccepted),
        "three messages into an unanswered request"
    );

    // Bob's device gets them and confirms them, as any client does; the
    // stranger learns nothing from that: no delivered tick, no presence.
    for i in 1..=3 {
        expect_event(
            &mut b_events,
            "a request message",
            is_message(&format!("hello {i}")),
        )
        .await;
    }
    b.read(conv, 3).await.unwrap();
    expect_no_event(&mut s_events, "a receipt or presence from bob", |e| {
        matches!(e, Event::Receipt { .. } | Event::Presence { .. })
    })
    .await;
    let listed = b.conversations().await.unwrap();
    assert!(
        listed.iter().any(|c| c.conv == conv && c.request),
        "{listed:?}"
    );
    // Nor at the stranger's next connect.
    drop((s, s_events));
    let (s, mut s_events, backlog) = stranger.connect_synced().await;
    assert!(
        !backlog
            .iter()
            .any(|e| matches!(e, Event::Receipt { user, .. } if user == "bob")),
        "{backlog:?}"
    );

    // Bob accepts: the stranger sees at once what bob has read, and may
    // send again (the refused message goes in under its id).
    b.accept(conv).await.unwrap();
    expect_event(
        &mut s_events,
        "bob's receipts once he accepted",
        is_receipt("bob", |delivered, read| delivered == 3 && read == Some(3)),
    )
    .await;
    let sent = s
        .send_with_id(
            conv,
            confab_protocol::MessageId::new("fourth").unwrap(),
            "hello 4",
        )
        .await
        .unwrap();
    assert_eq!(sent.seq, 4);
    assert!(!b.conversations().await.unwrap().iter().any(|c| c.request));
    server.assert_no_panics();
}

#[tokio::test]
async fn a_reply_accepts_and_blocking_stops_a_request() {
    let server = TestServer::start_with(&["--request-messages", "1"]).await;
    let (alice, bob, spammer) = (
        server.user("alice").await,
        server.user("bob").await,
        server.user("spammer").await,
    );
    let (a, mut a_events, _) = alice.connect_synced().await;
    let (b, mut b_events, _) = bob.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    a.send(conv, "hi bob").await.unwrap();
    expect_event(&mut b_events, "alice's request", is_message("hi bob")).await;
    // Bob's device confirms it; alice sees nothing of that yet.
    expect_no_event(&mut a_events, "a receipt from bob", |e| {
        matches!(e, Event::Receipt { .. })
    })
    .await;
    assert_eq!(
        a.send(conv, "are you there?").await.unwrap_err().code(),
        Some(ErrorCode::NotAccepted)
    );
    // Bob answers: a normal chat from then on, receipts and presence included.
    b.send(conv, "hi alice").await.unwrap();
    expect_event(
        &mut a_events,
        "bob's receipt after his reply",
        is_receipt("bob", |d, _| d >= 1),
    )
    .await;
    expect_event(&mut a_events, "bob online", is_presence("bob", true)).await;
    a.send(conv, "are you there?").await.unwrap();

    // A spammer's request can be blocked like anyone.
    let (sp, _sp_events, _) = spammer.connect_synced().await;
    let spam = sp.open("bob").await.unwrap();
    sp.send(spam, "buy now").await.unwrap();
    b.block("spammer").await.unwrap();
    let blocked = sp.send(spam, "buy now!!").await.unwrap_err();
    assert!(
        matches!(
            blocked.code(),
            Some(ErrorCode::Blocked | ErrorCode::NotAccepted)
        ),
        "{blocked}"
    );
    server.assert_no_panics();
}

#[tokio::test]
async fn new_conversations_per_day_are_capped() {
    let server = TestServer::start_with(&["--new-conversations-per-day", "2"]).await;
    let alice = server.user("alice").await;
    for name in ["bob", "carol", "dan"] {
        server.user(name).await;
    }
    let (a, _a_events, _) = alice.connect_synced().await;
    let bob = a.open("bob").await.unwrap();
    a.open("carol").await.unwrap();
    let refused = a.open("dan").await.unwrap_err();
    assert_eq!(refused.code(), Some(ErrorCode::RateLimited), "{refused}");
    assert_eq!(
        a.open("bob").await.unwrap(),
        bob,
        "an existing one opens as before"
    );
    server.assert_no_panics();
}
