//! End-to-end encryption: what the server can see, what clients reject, and
//! devices coming and going mid-conversation.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use confab_client::e2e::{NotOpened, Received};
use confab_client::{Client, ClientError, ConnectOptions, Event, new_message_id};
use confab_crypto::{DeviceEntry, DeviceKeys, DeviceList, MessageContext};
use confab_protocol::{ConversationId, DeviceId, ErrorCode, Message, MessageId};

use crate::harness::*;

/// Every way the secret could have been written down: the text itself, the
/// bytes it spells, and their base64 (both alphabets, at every alignment
/// inside a longer encoding) and hex.
fn needles(text: &str, bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut found = vec![text.as_bytes().to_vec(), text.to_uppercase().into_bytes()];
    for secret in [text.as_bytes(), bytes] {
        found.push(secret.to_vec());
        found.push(hex_lower(secret).into_bytes());
        found.push(hex_lower(secret).to_uppercase().into_bytes());
        for shift in 0..3 {
            // Inside a longer base64 text, the secret's encoding depends on
            // where it starts modulo 3; drop the characters that mix in
            // neighbouring bytes.
            let mut shifted = vec![0u8; shift];
            shifted.extend_from_slice(secret);
            for engine in [&STANDARD, &URL_SAFE, &STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
                let encoded = engine.encode(&shifted);
                let core = &encoded[(shift * 4).div_ceil(3) + 1..encoded.len() - 4];
                found.push(core.as_bytes().to_vec());
            }
        }
    }
    found
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Asserts that none of `needles` occurs in any file under `dir`.
fn assert_nowhere(dir: &std::path::Path, needles: &[Vec<u8>]) -> usize {
    let mut files = 0;
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            files += assert_nowhere(&path, needles);
            continue;
        }
        let content = std::fs::read(&path).expect("read file");
        files += 1;
        for needle in needles {
            assert!(
                !content
                    .windows(needle.len())
                    .any(|w| w == needle.as_slice()),
                "{} holds the secret as {:?}",
                path.display(),
                String::from_utf8_lossy(needle)
            );
        }
    }
    files
}

#[tokio::test]
async fn the_server_never_holds_the_plaintext() {
    let mut server = TestServer::start_with(&["--log", "trace"]).await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let secret: [u8; 32] = rand::random();
    let canary = hex_lower(&secret);
    let (a, _a_events, _) = alice.connect_synced().await;
    let (_b, mut b_events, _) = bob.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    a.send(conv, canary.clone()).await.unwrap();
    expect_event(&mut b_events, "bob reads the canary", is_message(&canary)).await;
    // And in a group, sealed for three members.
    let _carol = server.user("carol").await;
    let group = a
        .create_group("Canary", &["bob", "carol"])
        .await
        .unwrap()
        .conv;
    a.send(group, canary.clone()).await.unwrap();
    expect_event(
        &mut b_events,
        "bob reads it in the group",
        |e| matches!(e, confab_client::Event::Message(m) if m.conv == group && m.body == canary),
    )
    .await;

    let needles = needles(&canary, &secret);
    // The test is only worth something if the needles would be found.
    let planted = std::env::temp_dir().join(format!("canary-check-{}", std::process::id()));
    std::fs::create_dir_all(&planted).unwrap();
    for needle in &needles[..3] {
        std::fs::write(planted.join("probe"), needle).unwrap();
        let found = std::panic::catch_unwind(|| assert_nowhere(&planted, &needles));
        assert!(found.is_err(), "the search must find a planted needle");
    }
    std::fs::remove_dir_all(&planted).unwrap();

    // While running: the database, its WAL and shared memory (SQLite), or
    // every row of it (PostgreSQL), and the log.
    let data = server.data_dir();
    if on_postgres() {
        server.dump_database();
    } else {
        let wal = std::fs::read_dir(&data)
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().ends_with("-wal"));
        assert!(wal, "the WAL exists while the server runs");
        assert!(assert_nowhere(&data, &needles) >= 3);
    }
    assert!(
        server.log().len() > 10_000,
        "the log is at its most verbose level"
    );
    assert_nowhere(server.root(), &needles);
    if let Some(bucket) = server.bucket_dir() {
        assert_nowhere(&bucket, &needles);
    }

    // After a checkpoint (the server checkpoints fully when it stops), and
    // every file the server wrote, log included.
    server.stop().await;
    assert!(assert_nowhere(server.root(), &needles) >= 2);
}

#[tokio::test]
async fn two_devices_and_one_each_read_the_whole_conversation_and_a_new_device_joins() {
    let server = TestServer::start().await;
    let alice1 = server.user("alice").await;
    let alice2 = alice1.add_device().await;
    let bob1 = server.user("bob").await;
    let (a1, mut a1_events, _) = alice1.connect_synced().await;
    let (a2, mut a2_events, _) = alice2.connect_synced().await;
    let (b1, mut b1_events, _) = bob1.connect_synced().await;
    let conv = a1.open("bob").await.unwrap();

    a1.send(conv, "1 from alice's laptop").await.unwrap();
    b1.send(conv, "2 from bob").await.unwrap();
    a2.send(conv, "3 from alice's phone").await.unwrap();
    let expected = [
        (1, "1 from alice's laptop"),
        (2, "2 from bob"),
        (3, "3 from alice's phone"),
    ];
    for (who, client) in [("alice1", &a1), ("alice2", &a2), ("bob1", &b1)] {
        let history = client.history(conv, None, 10).await.unwrap();
        let read: Vec<(i64, &str)> = history
            .iter()
            .map(|r| (r.message().seq, r.text().expect("readable")))
            .collect();
        assert_eq!(read, expected, "{who} reads everything, in order");
    }
    // Live, each device got the others' messages decrypted.
    expect_event(&mut b1_events, "bob: 3", is_message("3 from alice's phone")).await;
    expect_event(
        &mut a1_events,
        "alice1: 3",
        is_message("3 from alice's phone"),
    )
    .await;
    expect_event(
        &mut a2_events,
        "alice2: 1",
        is_message("1 from alice's laptop"),
    )
    .await;

    // Bob adds a device. Alice's client still has bob's old list pinned, so
    // a send sealed for it is refused, with the difference.
    let bob2 = bob1.add_device().await;
    let (_b2, mut b2_events, _) = bob2.connect_synced().await;
    let id = new_message_id();
    let members = ["alice".to_string(), "bob".to_string()];
    let stale = alice1
        .e2e
        .seal(
            conv,
            &id,
            &members,
            &confab_crypto::Content::text("4 for every device"),
            false,
        )
        .await
        .unwrap();
    let err = a1.send_raw(conv, id.clone(), stale).await.unwrap_err();
    let ClientError::Server(frame) = &err else {
        panic!("{err}")
    };
    assert_eq!(frame.code, ErrorCode::DevicesChanged);
    let diff = frame.devices.clone().expect("the difference");
    assert_eq!(diff.missing, [bob2.login.device]);
    assert!(diff.extra.is_empty());

    // The library fetches bob's list, checks its signature (bob1 signed
    // it) and resends under the same id.
    let sent = a1
        .send_with_id(conv, id, "4 for every device")
        .await
        .unwrap();
    assert_eq!(sent.seq, 4);
    let notices = alice1.e2e.take_notices();
    assert!(
        notices.iter().any(|n| n.user == "bob"
            && n.added == [bob2.login.device]
            && !n.key_change
            && n.accepted),
        "a signed addition is shown, not refused: {notices:?}"
    );
    for (who, events) in [("bob1", &mut b1_events), ("bob2", &mut b2_events)] {
        expect_event(events, who, is_message("4 for every device")).await;
    }
    expect_event(
        &mut a2_events,
        "alice2: 4",
        is_message("4 for every device"),
    )
    .await;
    server.assert_no_panics();
}

#[tokio::test]
async fn the_server_checks_envelopes_and_devices_and_stays_up() {
    let server = TestServer::start().await;
    let (alice, _bob) = (server.user("alice").await, server.user("bob").await);
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    let refused = |body: String| {
        let a = &a;
        async move {
            a.send_raw(conv, new_message_id(), body)
                .await
                .unwrap_err()
                .code()
        }
    };
    assert_eq!(
        refused("plain text, not an envelope".into()).await,
        Some(ErrorCode::BadEnvelope)
    );
    assert_eq!(
        refused(URL_SAFE_NO_PAD.encode([1u8, 2, 3])).await,
        Some(ErrorCode::BadEnvelope)
    );
    // Claiming another device as the sender.
    let keys = DeviceKeys::generate(&mut confab_crypto::os_rng());
    let forged = seal_raw(
        conv,
        &new_message_id(),
        alice.login.device.0 + 100,
        &keys,
        &[keys.entry(alice.login.device.0)],
        "hi",
    );
    assert_eq!(refused(forged).await, Some(ErrorCode::BadEnvelope));
    // Encrypted for alice's devices only: bob's is missing.
    let only_me = seal_raw(
        conv,
        &new_message_id(),
        alice.login.device.0,
        &keys,
        &[keys.entry(alice.login.device.0)],
        "hi",
    );
    assert_eq!(refused(only_me).await, Some(ErrorCode::DevicesChanged));

    // A device nobody approved can read but not send.
    let pending = alice.new_device().await;
    let (p, _p_events, _) = pending.connect_synced().await;
    let err = p.send(conv, "let me in").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::DeviceNotListed), "{err}");

    // Nothing of it was stored; the connection and the server are fine.
    assert!(a.history(conv, None, 10).await.unwrap().is_empty());
    assert_eq!(a.send(conv, "still here").await.unwrap().seq, 1);
    assert!(server.healthy().await);
    server.assert_no_panics();
}

fn seal_raw(
    conv: ConversationId,
    id: &MessageId,
    sender_device: i64,
    keys: &DeviceKeys,
    recipients: &[DeviceEntry],
    text: &str,
) -> String {
    let ctx = MessageContext {
        conv: conv.0,
        message_id: id.as_str(),
        sender_device,
    };
    let content = confab_crypto::Content::text(text);
    let bytes = confab_crypto::seal(
        &ctx,
        keys,
        recipients,
        &content.to_bytes(),
        &mut confab_crypto::os_rng(),
    )
    .unwrap();
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The `msg` a device of the conversation would be given for `body`.
fn message(
    conv: ConversationId,
    from: &str,
    from_device: DeviceId,
    id: &MessageId,
    body: String,
) -> Message {
    Message {
        conv,
        seq: 1,
        id: id.clone(),
        from: from.into(),
        from_device,
        ts: 0,
        body,
        event: None,
        deleted_files: Vec::new(),
    }
}

#[tokio::test]
async fn receivers_reject_tampering_wrong_wraps_replays_and_unknown_senders() {
    let server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, mut a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    bob.accepts("alice").await;
    let members = ["alice".to_string(), "bob".to_string()];
    let me = alice.login.device;
    let keys = &alice.e2e.identity().keys;
    // Refused for good, never "try again later".
    let reason = |result: Result<confab_crypto::Content, NotOpened>| match result {
        Err(NotOpened::Refused(reason)) => reason,
        other => panic!("must be refused: {other:?}"),
    };
    a.send(conv, "an honest one").await.unwrap();

    // Tampered ciphertext, sent through the server: stored (the server
    // cannot tell), shown to bob as unreadable, with the reason.
    let id = new_message_id();
    let good = alice
        .e2e
        .seal(
            conv,
            &id,
            &members,
            &confab_crypto::Content::text("pay 10"),
            false,
        )
        .await
        .unwrap();
    let mut bytes = URL_SAFE_NO_PAD.decode(&good).unwrap();
    let last_content_byte = bytes.len() - 65;
    bytes[last_content_byte] ^= 1;
    a.send_raw(conv, id, URL_SAFE_NO_PAD.encode(&bytes))
        .await
        .unwrap();
    // A wrap for bob's device id, sealed to some other device's key.
    let stranger = DeviceKeys::generate(&mut confab_crypto::os_rng());
    let wrong_wrap_id = new_message_id();
    let wrong_wrap = seal_raw(
        conv,
        &wrong_wrap_id,
        me.0,
        keys,
        &[keys.entry(me.0), stranger.entry(bob.login.device.0)],
        "for someone else",
    );
    a.send_raw(conv, wrong_wrap_id, wrong_wrap).await.unwrap();

    let (_b, _b_events, backlog) = bob.connect_synced().await;
    let got: Vec<_> = backlog
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some((m.seq, Ok(m.body.clone()))),
            Event::Undecryptable(u) => Some((u.message.seq, Err(u.reason.clone()))),
            _ => None,
        })
        .collect();
    assert_eq!(got.len(), 3, "nothing vanishes: {got:?}");
    assert_eq!(got[0], (1, Ok("an honest one".to_string())));
    assert!(
        matches!(&got[1], (2, Err(r)) if r.contains("signature")),
        "{got:?}"
    );
    assert!(
        matches!(&got[2], (3, Err(r)) if r.contains("wrap")),
        "{got:?}"
    );
    // Receipts work for unreadable messages too: bob's client confirmed
    // what it showed, the last of which was unreadable.
    expect_event(
        &mut a_events,
        "delivered 3",
        is_receipt("bob", |d, _| d == 3),
    )
    .await;

    // A replay: the same envelope shown again under another seq.
    let id = new_message_id();
    let envelope = alice
        .e2e
        .seal(
            conv,
            &id,
            &members,
            &confab_crypto::Content::text("once"),
            false,
        )
        .await
        .unwrap();
    let mut m = message(conv, "alice", me, &id, envelope);
    assert_eq!(bob.e2e.open(&m).await.unwrap().text, "once");
    assert_eq!(
        bob.e2e.open(&m).await.unwrap().text,
        "once",
        "the same seq again is fine"
    );
    m.seq += 7;
    assert!(reason(bob.e2e.open(&m).await).contains("replayed"));
    // Moved to another conversation: the signature binds the conversation.
    let id = new_message_id();
    let envelope = alice
        .e2e
        .seal(
            conv,
            &id,
            &members,
            &confab_crypto::Content::text("here"),
            false,
        )
        .await
        .unwrap();
    let other = ConversationId(conv.0 + 1);
    let moved = message(other, "alice", me, &id, envelope);
    assert!(reason(bob.e2e.open(&moved).await).contains("signature"));

    // A sender device that is not on alice's signed list (her unapproved
    // new device, whose sends the server refuses anyway).
    let pending = alice.new_device().await;
    let id = new_message_id();
    let from_pending = seal_raw(
        conv,
        &id,
        pending.login.device.0,
        &pending.e2e.identity().keys,
        &[
            keys.entry(me.0),
            bob.e2e.identity().keys.entry(bob.login.device.0),
        ],
        "it's me, really",
    );
    let mut m = message(conv, "alice", pending.login.device, &id, from_pending);
    assert!(reason(bob.e2e.open(&m).await).contains("not on alice's signed device list"));
    // The same envelope said to come from alice's real device.
    m.from_device = me;
    assert!(reason(bob.e2e.open(&m).await).contains("signed by device"));
    server.assert_no_panics();
}

/// Whoever runs the server adds a device of their own to bob's list (which
/// no device of bob's would sign), straight into the database.
async fn forge_bobs_list(server: &mut TestServer, bob: &TestUser, forgery: Forgery) {
    server.stop().await;
    let eve = DeviceKeys::generate(&mut confab_crypto::os_rng());
    let eve_device = 999_999;
    let mut forged = DeviceList {
        user: "bob".into(),
        epoch: 2,
        devices: vec![
            bob.e2e.identity().keys.entry(bob.login.device.0),
            eve.entry(eve_device),
        ],
    }
    .sign(eve_device, &eve)
    .unwrap();
    if forgery == Forgery::Unsigned {
        forged.signer = bob.login.device.0;
        forged.signature = [0; 64];
    }
    let forged = serde_json::to_string(&forged).unwrap();
    if on_postgres() {
        server.psql(&format!(
            "INSERT INTO device_lists (user_id, epoch, signed, created_at)
             SELECT id, 2, $json${forged}$json$, 0 FROM users WHERE username = 'bob'"
        ));
    } else {
        let db = rusqlite::Connection::open(server.data_dir().join("confab.db")).unwrap();
        db.execute(
            "INSERT INTO device_lists (user_id, epoch, signed, created_at)
             SELECT id, 2, ?1, 0 FROM users WHERE username = 'bob'",
            [forged],
        )
        .unwrap();
    }
    server.restart().await;
}

#[derive(PartialEq, Eq, Clone, Copy)]
enum Forgery {
    /// Signed by the intruding device itself, like a reset.
    SelfSigned,
    /// Said to be signed by bob's device, with a signature of zeros.
    Unsigned,
}

/// Alice has written to bob; then bob's list is forged, and alice's next
/// send must stop with a key change that she is told about.
async fn alice_meets_a_forged_list(
    forgery: Forgery,
) -> (TestServer, TestUser, TestUser, ConversationId, Client) {
    let mut server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    a.send(conv, "before").await.unwrap();
    drop(a);
    forge_bobs_list(&mut server, &bob, forgery).await;

    // The server refuses alice's send (her envelope lacks the intruder's
    // device); her client fetches bob's lists, finds the new one not signed
    // by any of bob's devices, and stops.
    let (a, _a_events) = alice.connect().await;
    let err = a.send(conv, "after").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::KeyChanged(u) if u == "bob"),
        "{err}"
    );
    let notices = alice.e2e.take_notices();
    assert!(
        notices
            .iter()
            .any(|n| n.user == "bob" && n.key_change && !n.accepted),
        "{notices:?}"
    );
    (server, alice, bob, conv, a)
}

#[tokio::test]
async fn an_unsigned_device_list_is_refused_like_a_key_change() {
    let (server, alice, ..) = alice_meets_a_forged_list(Forgery::Unsigned).await;
    assert!(
        !alice.e2e.accept_key_change("bob"),
        "a list no device signed cannot be accepted"
    );
    assert!(server.healthy().await);
    server.assert_no_panics();
}

#[tokio::test]
async fn a_device_list_the_server_made_up_is_a_key_change() {
    let (server, _alice, bob, conv, a) = alice_meets_a_forged_list(Forgery::SelfSigned).await;
    // Nothing went out, and it stays refused until the user accepts.
    let err = a.send(conv, "after, again").await.unwrap_err();
    assert!(matches!(&err, ClientError::KeyChanged(_)), "{err}");
    let (b, _b_events, backlog) = bob.connect_synced().await;
    let texts: Vec<_> = messages(&backlog).into_iter().map(|(_, _, t)| t).collect();
    assert_eq!(texts, ["before"]);
    assert_eq!(b.history(conv, None, 10).await.unwrap().len(), 1);
    // Bob's own client sees the list it did not sign, and refuses too.
    let err = b.send(conv, "who is eve?").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::KeyChanged(u) if u == "bob"),
        "{err}"
    );
    assert!(server.healthy().await);
    server.assert_no_panics();
}

#[tokio::test]
async fn a_reset_is_a_key_change_that_the_user_can_accept() {
    let server = TestServer::start().await;
    let (alice, bob) = (server.user("alice").await, server.user("bob").await);
    let (a, _a_events, _) = alice.connect_synced().await;
    let conv = a.open("bob").await.unwrap();
    a.send(conv, "hello").await.unwrap();

    // Bob lost his phone; on a new one he starts over.
    let bob_new = bob.new_device().await;
    bob_new.e2e.reset(PASSWORD).await.unwrap();
    let devices = confab_client::account::devices(&server.url, bob_new.token())
        .await
        .unwrap();
    assert_eq!(
        devices
            .iter()
            .map(|d| (d.device, d.listed))
            .collect::<Vec<_>>(),
        [(bob_new.login.device, true)],
        "the old device is gone"
    );

    let err = a.send(conv, "still there?").await.unwrap_err();
    assert!(
        matches!(&err, ClientError::KeyChanged(u) if u == "bob"),
        "{err}"
    );
    assert!(alice.e2e.accept_key_change("bob"));
    a.send(conv, "still there?").await.unwrap();
    let (_b, _b_events, backlog) = bob_new.connect_synced().await;
    let texts: Vec<_> = messages(&backlog).into_iter().map(|(_, _, t)| t).collect();
    assert_eq!(
        texts,
        ["still there?"],
        "the new device reads from its reset on"
    );

    // Someone who first meets bob after the reset just trusts his list as
    // it is now (trust on first use).
    let carol = server.user("carol").await;
    let (c, _c_events) = carol.connect_with(ConnectOptions::default()).await;
    let conv_cb = c.open("bob").await.unwrap();
    c.send(conv_cb, "hi bob").await.unwrap();
    assert!(carol.e2e.take_notices().is_empty());
    let (b, _b_events, _) = bob_new.connect_synced().await;
    let got = b.history(conv_cb, None, 5).await.unwrap();
    assert!(
        matches!(&got[0], Received::Text(m) if m.body == "hi bob"),
        "{got:?}"
    );
    server.assert_no_panics();
}
