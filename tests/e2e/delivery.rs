//! The delivery promise under the ways it breaks: an application that stops
//! reading, lost confirmations, lost live publishes, lists that change under
//! a send, pipelined resends.

use std::sync::Arc;
use std::time::Duration;

use confab_client::{ConnectOptions, Event, SyncState};

use crate::harness::*;

/// Options for a device that keeps its dedup state across connections.
fn keeping(state: &Arc<SyncState>) -> ConnectOptions {
    ConnectOptions {
        state: state.clone(),
        ..ConnectOptions::default()
    }
}

#[tokio::test]
async fn messages_left_in_the_buffer_are_taken_after_the_next_connect() {
    let server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();

    // Bob's client reads from the socket, but his application takes nothing.
    let state = Arc::new(SyncState::default());
    let (b, b_events) = bob.connect_with(keeping(&state)).await;
    for i in 1..=10 {
        a.send(conv, format!("m{i}")).await.unwrap();
    }
    // Time for all ten to reach bob's buffer.
    tokio::time::sleep(QUIET).await;
    drop(b);
    drop(b_events);

    let (_b, mut b_events) = bob.connect_with(keeping(&state)).await;
    let backlog = until(&mut b_events, |e| matches!(e, Event::Synced)).await;
    let got: Vec<String> = messages(&backlog).into_iter().map(|(_, _, t)| t).collect();
    let want: Vec<String> = (1..=10).map(|i| format!("m{i}")).collect();
    assert_eq!(
        got, want,
        "what the application never took comes again, once"
    );
    assert_eq!(state.watermark(conv), 10);
    assert_eq!(state.gaps(), 0);
}

#[tokio::test]
async fn a_message_taken_but_not_yet_confirmed_is_confirmed_after_reconnect() {
    let server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, mut a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();

    // Bob takes the message, and his connection drops before the
    // confirmation goes out.
    let state = Arc::new(SyncState::default());
    let slow_confirm = ConnectOptions {
        confirm_batch: Duration::from_secs(3600),
        ..keeping(&state)
    };
    let (b, mut b_events) = bob.connect_with(slow_confirm).await;
    a.send(conv, "only one").await.unwrap();
    expect_event(&mut b_events, "bob takes it", is_message("only one")).await;
    drop(b);
    drop(b_events);
    expect_no_event(&mut a_events, "delivered", is_receipt("bob", |d, _| d > 0)).await;

    // Sent again at connect, it is no news to bob's application, but it is
    // to the server: alice sees delivered without another message.
    let (_b, mut b_events) = bob.connect_with(keeping(&state)).await;
    let backlog = until(&mut b_events, |e| matches!(e, Event::Synced)).await;
    assert!(messages(&backlog).is_empty(), "shown once: {backlog:?}");
    expect_event(&mut a_events, "delivered", is_receipt("bob", |d, _| d == 1)).await;
    assert_eq!(state.duplicates(), 1);
}

#[tokio::test]
async fn two_event_streams_of_one_device_give_each_message_once() {
    let server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();

    // The first connection's events stay around untaken while a second
    // connection brings the same messages again.
    let state = Arc::new(SyncState::default());
    let (b1, mut old_events) = bob.connect_with(keeping(&state)).await;
    for i in 1..=5 {
        a.send(conv, format!("m{i}")).await.unwrap();
    }
    tokio::time::sleep(QUIET).await;
    drop(b1);
    let (_b2, mut new_events) = bob.connect_with(keeping(&state)).await;
    let mut got = messages(&until(&mut new_events, |e| matches!(e, Event::Synced)).await);
    got.extend(messages(&collect_for(&mut old_events, QUIET).await));
    let seqs: Vec<i64> = got.iter().map(|(_, s, _)| *s).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
}
