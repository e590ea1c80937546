//! What every store promises, one writer at a time: run on SQLite and on
//! PostgreSQL alike.

use confab_protocol::{ConvEvent, DeviceId, MessageId};
use confab_store::{
    Appended, Clock, CursorUpdate, GroupChange, GroupRefusal, NewMessage, Page, Store, StoreError,
    UserId,
};

use crate::common::*;

async fn seqs_are_consecutive_and_resends_return_the_original(f: Backend) {
    let s = f.store.as_ref();
    let (alice, bob, conv) = pair(s).await;
    assert_eq!(
        s.open_direct(bob.0, alice.0, 2).await.unwrap(),
        conv,
        "stable for the pair"
    );

    let first = s.append(msg(conv, alice, "alice", "a1")).await.unwrap();
    let Appended::New {
        message,
        first_from_sender,
        ..
    } = first
    else {
        panic!("new expected")
    };
    assert_eq!((message.message.seq, first_from_sender), (1, true));
    let second = s.append(msg(conv, alice, "alice", "a2")).await.unwrap();
    assert!(matches!(
        second,
        Appended::New {
            first_from_sender: false,
            ..
        }
    ));
    assert_eq!(second.message().expect("stored").message.seq, 2);

    let mut resend = msg(conv, alice, "alice", "a1");
    resend.body = "different".into();
    let again = s.append(resend).await.unwrap();
    assert_eq!(again, Appended::Duplicate(message.clone()));

    let stored = s.messages_after(conv, 0, page(10)).await.unwrap();
    assert_eq!(
        stored.iter().map(|m| m.message.seq).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(stored[0], message);
}

async fn concurrent_appends_get_distinct_gapless_seqs(f: Backend) {
    let s = f.store.clone();
    let alice = user(s.as_ref(), "alice").await;
    let bob = user(s.as_ref(), "bob").await;
    let conv = s.open_direct(alice.0, bob.0, 1).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..400 {
        let s = s.clone();
        let who = if i % 2 == 0 {
            (alice, "alice")
        } else {
            (bob, "bob")
        };
        tasks.push(tokio::spawn(async move {
            s.append(msg(conv, who.0, who.1, &format!("m{i}")))
                .await
                .unwrap()
                .message()
                .expect("stored")
                .message
                .seq
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.unwrap());
    }
    seqs.sort();
    assert_eq!(seqs, (1..=400).collect::<Vec<_>>());
}

async fn committed_state_survives_reopen(f: Backend) {
    let (alice, bob, conv);
    {
        let s = f.store.as_ref();
        alice = user(s, "alice").await;
        bob = user(s, "bob").await;
        conv = s.open_direct(alice.0, bob.0, 1).await.unwrap();
        for i in 0..5 {
            s.append(msg(conv, alice, "alice", &format!("m{i}")))
                .await
                .unwrap();
        }
        s.close().await;
        assert_eq!(
            s.append(msg(conv, alice, "alice", "late"))
                .await
                .unwrap_err(),
            StoreError::Closed
        );
    }
    let reopened = f.reopen(Clock::system()).await;
    let reopened = reopened.store.as_ref();
    let next = reopened.append(msg(conv, bob, "bob", "b")).await.unwrap();
    assert_eq!(next.message().expect("stored").message.seq, 6);
}

async fn cursors_move_forward_only_and_aggregate_over_devices(f: Backend) {
    let s = f.store.as_ref();
    let (alice, bob, conv) = pair(s).await;
    for i in 0..5 {
        s.append(msg(conv, alice, "alice", &format!("m{i}")))
            .await
            .unwrap();
    }
    let bob2 = s.create_device(bob.0, "second", 2).await.unwrap().id;
    let update = |device, delivered, read| CursorUpdate {
        conv,
        user: bob.0,
        device,
        delivered,
        read,
    };

    let c = s
        .advance_cursors(update(bob.1, 3, 0))
        .await
        .unwrap()
        .cursors;
    assert_eq!((c.delivered, c.read, c.advanced()), (3, 0, true));
    let c = s.advance_cursors(update(bob2, 2, 0)).await.unwrap().cursors;
    assert_eq!(
        (c.delivered, c.advanced()),
        (3, false),
        "the member cursor is the max over devices"
    );
    let c = s
        .advance_cursors(update(bob.1, 1, 0))
        .await
        .unwrap()
        .cursors;
    assert_eq!((c.delivered, c.advanced()), (3, false), "never backwards");
    let c = s
        .advance_cursors(update(bob2, 0, 99))
        .await
        .unwrap()
        .cursors;
    assert_eq!(
        (c.delivered, c.read),
        (5, 5),
        "clamped to the last seq; read implies delivered"
    );

    let views = s.conversations(bob.0, bob2).await.unwrap();
    assert_eq!(views.len(), 1);
    assert_eq!(
        (
            views[0].device_delivered,
            views[0].read,
            s.unread_counts(bob.0).await.unwrap()[0].1
        ),
        (5, 5, 0)
    );
    let alice_view = &s.conversations(alice.0, alice.1).await.unwrap()[0];
    let bob_there = alice_view.peer().unwrap();
    assert_eq!((bob_there.delivered, bob_there.read), (5, 5));
    assert!(!bob_there.member.has_sent, "bob has not written here");
}

async fn a_new_device_starts_at_the_head(f: Backend) {
    let s = f.store.as_ref();
    let (alice, bob, conv) = pair(s).await;
    for i in 0..3 {
        s.append(msg(conv, alice, "alice", &format!("m{i}")))
            .await
            .unwrap();
    }
    let late = s.create_device(bob.0, "late", 5).await.unwrap();
    let view = &s.conversations(bob.0, late.id).await.unwrap()[0];
    assert_eq!(
        (
            view.device_delivered,
            view.last_seq,
            s.unread_counts(bob.0).await.unwrap()[0].1
        ),
        (3, 3, 3)
    );
    let old = &s.conversations(bob.0, bob.1).await.unwrap()[0];
    assert_eq!(old.device_delivered, 0);
    let older = s.history(conv, 3, page(2)).await.unwrap();
    assert_eq!(
        older.iter().map(|m| m.message.seq).collect::<Vec<_>>(),
        [1, 2]
    );
}

async fn pages_stop_at_their_byte_budget_but_never_return_nothing(f: Backend) {
    let s = f.store.as_ref();
    let (alice, _bob, conv) = pair(s).await;
    for i in 0..10 {
        let mut m = msg(conv, alice, "alice", &format!("m{i}"));
        m.body = "x".repeat(1000);
        s.append(m).await.unwrap();
    }
    let small = Page {
        limit: 10,
        max_bytes: 2500,
    };
    let forward = s.messages_after(conv, 0, small).await.unwrap();
    assert_eq!(
        forward.iter().map(|m| m.message.seq).collect::<Vec<_>>(),
        [1, 2]
    );
    let back = s.history(conv, i64::MAX, small).await.unwrap();
    assert_eq!(
        back.iter().map(|m| m.message.seq).collect::<Vec<_>>(),
        [9, 10],
        "the newest that fit"
    );
    let tiny = Page {
        limit: 10,
        max_bytes: 1,
    };
    assert_eq!(
        s.messages_after(conv, 0, tiny).await.unwrap().len(),
        1,
        "one even if it is larger"
    );
}

async fn a_message_checked_against_an_older_device_list_is_not_stored(f: Backend) {
    let s = f.store.as_ref();
    let (alice, bob, conv) = pair(s).await;
    s.put_device_list(alice.0, list(1), vec![], 1)
        .await
        .unwrap();
    s.put_device_list(bob.0, list(1), vec![], 1).await.unwrap();
    let checked = |id: &str, bob_epoch: i64| NewMessage {
        device_epochs: vec![(alice.0, 1), (bob.0, bob_epoch)],
        ..msg(conv, alice, "alice", id)
    };
    let first = s.append(checked("m1", 1)).await.unwrap();
    assert_eq!(first.message().expect("stored").message.seq, 1);

    // Bob's next list commits after the connection checked m2 against epoch 1.
    s.put_device_list(bob.0, list(2), vec![], 2).await.unwrap();
    assert_eq!(
        s.append(checked("m2", 1)).await.unwrap(),
        Appended::DevicesChanged
    );
    assert_eq!(
        s.heads(&[alice.0]).await.unwrap(),
        [(alice.0, conv, 1)],
        "no seq used"
    );
    // Checked again, against the list now current, it goes in as seq 2.
    let again = s.append(checked("m2", 2)).await.unwrap();
    assert_eq!(again.message().expect("stored").message.seq, 2);

    // A resend still checked against the old list is answered with its
    // original: the duplicate check comes first.
    assert!(matches!(
        s.append(checked("m1", 1)).await.unwrap(),
        Appended::Duplicate(m) if m.message.seq == 1
    ));
    // And a user without any list counts as epoch 0.
    let carol = user(s, "carol").await;
    let conv2 = s.open_direct(alice.0, carol.0, 3).await.unwrap();
    let to_carol = NewMessage {
        device_epochs: vec![(alice.0, 1), (carol.0, 0)],
        ..msg(conv2, alice, "alice", "c1")
    };
    assert!(matches!(
        s.append(to_carol).await.unwrap(),
        Appended::New { .. }
    ));
}

async fn a_sent_message_is_found_by_its_client_id_and_heads_cover_every_conversation(f: Backend) {
    let s = f.store.as_ref();
    let (alice, bob, conv) = pair(s).await;
    let carol = user(s, "carol").await;
    let empty = s.open_direct(alice.0, carol.0, 1).await.unwrap();
    let id = MessageId::new("a1").unwrap();
    assert_eq!(s.sent_message(alice.0, &id).await.unwrap(), None);
    let Appended::New { message, .. } = s.append(msg(conv, alice, "alice", "a1")).await.unwrap()
    else {
        panic!("new expected")
    };
    assert_eq!(s.sent_message(alice.0, &id).await.unwrap(), Some(message));
    assert_eq!(
        s.sent_message(bob.0, &id).await.unwrap(),
        None,
        "ids are per sender"
    );
    let mut heads = s.heads(&[alice.0, bob.0]).await.unwrap();
    heads.sort();
    assert_eq!(
        heads,
        [(alice.0, conv, 1), (alice.0, empty, 0), (bob.0, conv, 1)]
    );
    assert!(s.heads(&[]).await.unwrap().is_empty());
}

async fn a_request_takes_a_few_messages_until_it_is_answered_or_accepted(f: Backend) {
    let s = f.store.as_ref();
    // Alice opens: she has accepted, for bob it is a request.
    let (alice, bob, conv) = pair(s).await;
    let request = |user: UserId| async move {
        let convs = s.conversations(user, DeviceId(0)).await.unwrap();
        !convs.iter().find(|c| c.conv == conv).unwrap().accepted
    };
    assert!(request(bob.0).await && !request(alice.0).await);
    let limited = |id: &str| NewMessage {
        unanswered_limit: Some(2),
        blobs: Vec::new(),
        ..msg(conv, alice, "alice", id)
    };
    for id in ["m1", "m2"] {
        assert!(matches!(
            s.append(limited(id)).await.unwrap(),
            Appended::New { .. }
        ));
    }
    assert_eq!(
        s.append(limited("m3")).await.unwrap(),
        Appended::NotAccepted
    );
    assert!(
        matches!(s.append(limited("m2")).await.unwrap(), Appended::Duplicate(m) if m.message.seq == 2),
        "a resend still gets its original"
    );
    // Bob's reply accepts it.
    s.append(msg(conv, bob, "bob", "b1")).await.unwrap();
    assert!(!request(bob.0).await);
    assert!(matches!(
        s.append(limited("m3")).await.unwrap(),
        Appended::New { .. }
    ));

    // Or an explicit accept, without a reply.
    let carol = user(s, "carol").await;
    let conv2 = s.open_direct(alice.0, carol.0, 2).await.unwrap();
    assert_eq!(s.find_direct(carol.0, alice.0).await.unwrap(), Some(conv2));
    s.accept(conv2, carol.0).await.unwrap();
    let (_, _, members) = s.members(conv2).await.unwrap();
    assert!(members.iter().all(|m| m.accepted), "{members:?}");
}

async fn blob_parts_only_extend_the_upload_and_the_quota_counts_whole_lengths(f: Backend) {
    use confab_store::{BlobCreated, NewBlob};
    let store: &dyn Store = f.store.as_ref();
    let (alice, _) = user(store, "alice").await;
    let new = |id: &str, length| NewBlob {
        id: id.into(),
        owner: alice,
        length,
        now: 1,
        expires_at: 100,
        quota_bytes: 1000,
    };
    let BlobCreated::Created(blob) = store.create_blob(new("a", 600)).await.unwrap() else {
        panic!("within the quota")
    };
    assert_eq!((blob.received, blob.length), (0, 600));
    // Counted at its full length though nothing has arrived.
    assert_eq!(
        store.create_blob(new("b", 401)).await.unwrap(),
        BlobCreated::OverQuota { used: 600 }
    );

    let after = store
        .add_blob_part("a", part(0, 0, 250), 200)
        .await
        .unwrap();
    assert_eq!((after.received, after.expires_at), (250, 200));
    // A part that does not start where the bytes end, or runs past the
    // length, is not recorded.
    for bad in [part(1, 0, 10), part(1, 300, 10), part(1, 250, 351)] {
        let refused = store.add_blob_part("a", bad.clone(), 300).await;
        assert!(matches!(refused, Err(StoreError::Conflict)), "{bad:?}");
    }
    store
        .add_blob_part("a", part(1, 250, 350), 300)
        .await
        .unwrap();
    let blob = store.blob("a").await.unwrap().unwrap();
    assert!(blob.complete());
    assert_eq!(
        store.blob_parts("a").await.unwrap(),
        vec![part(0, 0, 250), part(1, 250, 350)]
    );
    assert!(store.sweep_blobs(300, None, 10).await.unwrap().is_empty());
    // Past its expiry and referenced by no message: gone entirely.
    let swept = store.sweep_blobs(301, None, 10).await.unwrap();
    assert_eq!(swept.len(), 1);
    assert_eq!((swept[0].0.as_str(), swept[0].1.len()), ("a", 2));
    assert!(store.blob("a").await.unwrap().is_none());
    assert!(store.blob_parts("a").await.unwrap().is_empty());
    assert_eq!(store.delete_blob("a", 302).await.unwrap(), None);
    assert!(matches!(
        store.create_blob(new("b", 1000)).await.unwrap(),
        BlobCreated::Created(_)
    ));
}

async fn a_blob_a_message_refers_to_is_bound_to_it_and_kept(f: Backend) {
    use confab_store::{BlobCreated, NewBlob};
    let store: &dyn Store = f.store.as_ref();
    let (alice, bob, conv) = pair(store).await;
    let carol = user(store, "carol").await;
    let blob = NewBlob {
        id: "f".into(),
        owner: alice.0,
        length: 10,
        now: 1,
        expires_at: 100,
        quota_bytes: 1000,
    };
    assert!(matches!(
        store.create_blob(blob).await.unwrap(),
        BlobCreated::Created(_)
    ));
    let with_blob = |id: &str| NewMessage {
        blobs: vec!["f".into()],
        ..msg(conv, alice, "alice", id)
    };
    // Not complete yet: refused, nothing stored.
    assert_eq!(
        store.append(with_blob("m1")).await.unwrap(),
        Appended::UnknownBlob
    );
    store.add_blob_part("f", part(0, 0, 10), 100).await.unwrap();
    // Someone else's: refused.
    let bobs = NewMessage {
        blobs: vec!["f".into()],
        ..msg(conv, bob, "bob", "b1")
    };
    assert_eq!(store.append(bobs).await.unwrap(), Appended::UnknownBlob);
    assert!(store.visible_blob("f", bob.0).await.unwrap().is_none());

    assert!(matches!(
        store.append(with_blob("m1")).await.unwrap(),
        Appended::New { .. }
    ));
    assert!(store.visible_blob("f", bob.0).await.unwrap().is_some());
    assert!(store.visible_blob("f", alice.0).await.unwrap().is_some());
    assert!(store.visible_blob("f", carol.0).await.unwrap().is_none());
    assert!(
        store
            .sweep_blobs(i64::MAX - 1, None, 10)
            .await
            .unwrap()
            .is_empty(),
        "kept"
    );
}

async fn a_deleted_file_leaves_a_tombstone_its_messages_show(f: Backend) {
    use confab_store::{BlobCreated, NewBlob};
    let store: &dyn Store = f.store.as_ref();
    let (alice, bob, conv) = pair(store).await;
    let new = |id: &str, now, length| NewBlob {
        id: id.into(),
        owner: alice.0,
        length,
        now,
        expires_at: 100,
        quota_bytes: 1300,
    };
    for (id, now) in [("f", 1), ("g", 5)] {
        assert!(matches!(
            store.create_blob(new(id, now, 600)).await.unwrap(),
            BlobCreated::Created(_)
        ));
        store.add_blob_part(id, part(0, 0, 600), 100).await.unwrap();
        let message = NewMessage {
            blobs: vec![id.into()],
            ..msg(conv, alice, "alice", &format!("m-{id}"))
        };
        assert!(matches!(
            store.append(message).await.unwrap(),
            Appended::New { .. }
        ));
    }
    store.append(msg(conv, bob, "bob", "text")).await.unwrap();

    let parts = store.delete_blob("f", 50).await.unwrap().unwrap();
    assert_eq!(parts.len(), 1);
    // Bob still sees that it existed, and that it is gone.
    let tomb = store.visible_blob("f", bob.0).await.unwrap().unwrap();
    assert_eq!(tomb.deleted_at, Some(50));
    assert!(!tomb.complete());
    assert!(store.blob_parts("f").await.unwrap().is_empty());
    // Deleting again finds nothing more to delete.
    assert_eq!(store.delete_blob("f", 60).await.unwrap(), Some(vec![]));
    assert_eq!(store.blob("f").await.unwrap().unwrap().deleted_at, Some(50));
    // It can be sent no more.
    let again = NewMessage {
        blobs: vec!["f".into()],
        ..msg(conv, alice, "alice", "again")
    };
    assert_eq!(store.append(again).await.unwrap(), Appended::UnknownBlob);
    // Its 600 bytes no longer count against the quota of 1300: 400 more
    // fit beside "g".
    assert!(matches!(
        store.create_blob(new("h", 6, 400)).await.unwrap(),
        BlobCreated::Created(_)
    ));

    let deleted = |page: Vec<confab_store::StoredMessage>| -> Vec<(i64, Vec<String>)> {
        page.into_iter()
            .map(|m| (m.message.seq, m.message.deleted_files))
            .collect()
    };
    let history = store.history(conv, i64::MAX, page(10)).await.unwrap();
    assert_eq!(
        deleted(history),
        vec![(1, vec!["f".into()]), (2, vec![]), (3, vec![])]
    );
    // The retention retires "g" (created at 5) but not "h" (created at 6).
    let swept = store.sweep_blobs(70, Some(6), 10).await.unwrap();
    assert_eq!(
        swept.iter().map(|s| s.0.as_str()).collect::<Vec<_>>(),
        ["g"]
    );
    let after = store.messages_after(conv, 1, page(10)).await.unwrap();
    assert_eq!(deleted(after), vec![(2, vec!["g".into()]), (3, vec![])]);
}

async fn group_changes_take_a_seq_and_every_append_is_checked_against_the_members_of_its_commit(
    f: Backend,
) {
    let s = &*f.store;
    let (alice, bob, carol, dave) = (
        user(s, "alice").await,
        user(s, "bob").await,
        user(s, "carol").await,
        user(s, "dave").await,
    );
    let named = |u: (UserId, DeviceId), n: &str| (u.0, n.to_string());
    let create = GroupChange::Create {
        name: "G".into(),
        members: vec![named(bob, "bob"), named(carol, "carol")],
    };
    let Appended::New {
        message, members, ..
    } = s
        .change_group(change(None, alice, "alice", "g1", create.clone()))
        .await
        .unwrap()
    else {
        panic!("created")
    };
    let conv = message.message.conv;
    assert_eq!(message.message.seq, 1);
    assert!(matches!(
        message.message.event,
        Some(ConvEvent::Created { .. })
    ));
    assert_eq!(&members[..], &[alice.0, bob.0, carol.0]);
    // A resend gets the original; a fourth member is over the limit of 3.
    assert!(matches!(
        s.change_group(change(None, alice, "alice", "g1", create))
            .await
            .unwrap(),
        Appended::Duplicate(_)
    ));
    let add_dave = GroupChange::Add(vec![named(dave, "dave")]);
    assert_eq!(
        s.change_group(change(Some(conv), alice, "alice", "g2", add_dave.clone()))
            .await
            .unwrap(),
        Appended::Group(GroupRefusal::TooManyMembers)
    );
    // Bob is no admin.
    assert_eq!(
        s.change_group(change(
            Some(conv),
            bob,
            "bob",
            "g3",
            GroupChange::Rename("B".into())
        ))
        .await
        .unwrap(),
        Appended::Group(GroupRefusal::NotAdmin)
    );

    assert!(matches!(
        s.append(msg(conv, bob, "bob", "b1")).await.unwrap(),
        Appended::New { .. }
    ));
    let removed = s
        .change_group(change(
            Some(conv),
            alice,
            "alice",
            "g4",
            GroupChange::Remove(vec![named(bob, "bob")]),
        ))
        .await
        .unwrap();
    let Appended::New {
        message, members, ..
    } = removed
    else {
        panic!("removed")
    };
    let left_at = message.message.seq;
    assert_eq!(left_at, 3);
    assert_eq!(
        &members[..],
        &[alice.0, bob.0, carol.0],
        "bob sees his removal"
    );
    // Bob's next send is refused in the commit; carol's checked against the
    // old members is stale; one against the current ones goes in.
    assert_eq!(
        s.append(msg(conv, bob, "bob", "b2")).await.unwrap(),
        Appended::NotMember
    );
    let stale = NewMessage {
        device_epochs: vec![(alice.0, 0), (bob.0, 0), (carol.0, 0)],
        ..msg(conv, carol, "carol", "c1")
    };
    assert_eq!(s.append(stale).await.unwrap(), Appended::DevicesChanged);
    let current = NewMessage {
        device_epochs: vec![(alice.0, 0), (carol.0, 0)],
        ..msg(conv, carol, "carol", "c1")
    };
    let Appended::New {
        members, message, ..
    } = s.append(current).await.unwrap()
    else {
        panic!("stored")
    };
    assert_eq!(
        (&members[..], message.message.seq),
        (&[alice.0, carol.0][..], 4)
    );

    // Bob's view ends at his removal: heads, the listing, his cursors.
    let heads = s.heads(&[bob.0]).await.unwrap();
    assert_eq!(heads, [(bob.0, conv, left_at)]);
    let views = s.conversations(bob.0, bob.1).await.unwrap();
    assert!(views[0].left && views[0].others.is_empty());
    assert_eq!(views[0].last_seq, left_at);
    let update = CursorUpdate {
        conv,
        user: bob.0,
        device: bob.1,
        delivered: 99,
        read: 99,
    };
    assert_eq!(
        s.advance_cursors(update).await.unwrap().cursors.read,
        left_at
    );

    // Dave joins now: he sees from his `added` event on, and carol, who
    // wrote seq 4, is the author a receipt of his concerns.
    let Appended::New { message, .. } = s
        .change_group(change(Some(conv), alice, "alice", "g5", add_dave))
        .await
        .unwrap()
    else {
        panic!("added")
    };
    let added_at = message.message.seq;
    let views = s.conversations(dave.0, dave.1).await.unwrap();
    assert_eq!(views[0].device_delivered, added_at - 1);
    let (_, _, all) = s.members(conv).await.unwrap();
    let spans: Vec<_> = all
        .iter()
        .map(|m| (m.username.as_str(), m.joined_seq, m.left_seq))
        .collect();
    assert_eq!(
        spans,
        [
            ("alice", 0, None),
            ("bob", 0, Some(left_at)),
            ("carol", 0, None),
            ("dave", added_at - 1, None)
        ]
    );
    let moved = s
        .advance_cursors(CursorUpdate {
            conv,
            user: alice.0,
            device: alice.1,
            delivered: added_at,
            read: 4,
        })
        .await
        .unwrap();
    assert_eq!(
        moved.authors,
        [carol.0],
        "bob wrote b1 but is gone; alice's own do not count"
    );
    let info = s.receipt_times(conv, 4).await.unwrap();
    let who: Vec<_> = info.iter().map(|m| (m.username.as_str(), m.read)).collect();
    assert_eq!(
        who,
        [("alice", true), ("carol", false)],
        "bob left before 4; dave came after"
    );
    // Alice's moves are kept with their times.
    assert!(
        info[0].read_at.is_some() && info[0].delivered_at.is_some(),
        "{info:?}"
    );
}

async fn info_knows_when_each_of_the_newest_cursor_moves_happened(f: Backend) {
    let s = &*f.store;
    let (alice, bob, direct) = pair(s).await;
    let create = GroupChange::Create {
        name: "G".into(),
        members: vec![(bob.0, "bob".into())],
    };
    let Appended::New { message, .. } = s
        .change_group(change(None, alice, "alice", "g", create))
        .await
        .unwrap()
    else {
        panic!("created")
    };
    let conv = message.message.conv;
    for k in 0..40 {
        s.append(msg(conv, alice, "alice", &format!("a{k}")))
            .await
            .unwrap();
    }
    // Bob reads one seq at a time, 1..=40: 40 moves, of which 16 are kept.
    for seq in 1..=40 {
        let update = CursorUpdate {
            conv,
            user: bob.0,
            device: bob.1,
            delivered: seq,
            read: seq,
        };
        s.advance_cursors(update).await.unwrap();
    }
    let at = |seq| async move {
        let info = s.receipt_times(conv, seq).await.unwrap();
        let bob = info.into_iter().find(|m| m.user == bob.0).unwrap();
        (bob.read, bob.read_at.is_some())
    };
    assert_eq!(at(40).await, (true, true));
    assert_eq!(at(26).await, (true, true), "the 16 newest moves: 25..=40");
    assert_eq!(
        at(25).await,
        (true, false),
        "the oldest kept may not be the first"
    );
    assert_eq!(at(3).await, (true, false), "read, the time no longer kept");

    // A direct conversation keeps no times (docs/storage.md: why).
    s.append(msg(direct, alice, "alice", "d1")).await.unwrap();
    let update = CursorUpdate {
        conv: direct,
        user: bob.0,
        device: bob.1,
        delivered: 1,
        read: 1,
    };
    s.advance_cursors(update).await.unwrap();
    let info = s.receipt_times(direct, 1).await.unwrap();
    let bob_info = info.into_iter().find(|m| m.user == bob.0).unwrap();
    assert!(bob_info.read && bob_info.read_at.is_none());
}

/// A clock a scenario moves, starting at `at` (ms since the epoch).
fn set_clock(at: i64) -> (Clock, std::sync::Arc<std::sync::atomic::AtomicI64>) {
    let now = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(at));
    let read = now.clone();
    let clock = Clock::from_fn(move || read.load(std::sync::atomic::Ordering::SeqCst));
    (clock, now)
}

const DAY: i64 = 86_400_000;
const HOUR: i64 = 3_600_000;

async fn a_senders_bytes_of_the_day_hold_across_a_restart_and_renew_at_midnight(f: Backend) {
    // 23:00 UTC on some day.
    let (clock, now) = set_clock(20_000 * DAY + 23 * HOUR);
    let f = f.reopen(clock.clone()).await;
    let (alice, bob, conv) = pair(f.store.as_ref()).await;
    // Every body here is 10 bytes ("body of mN"): two fit in 25.
    let counted = |id: &str| NewMessage {
        daily_bytes: Some(25),
        ..msg(conv, alice, "alice", id)
    };
    for id in ["m1", "m2"] {
        let stored = f.store.append(counted(id)).await.unwrap();
        assert!(matches!(stored, Appended::New { .. }), "{stored:?}");
    }
    let over = Appended::OverQuota(confab_store::OverQuota {
        retry_after_ms: HOUR,
    });
    assert_eq!(f.store.append(counted("m3")).await.unwrap(), over);
    assert!(
        matches!(f.store.append(counted("m2")).await.unwrap(), Appended::Duplicate(m) if m.message.seq == 2),
        "a resend still gets its original"
    );
    // Bob's allowance is his own; the refused message took no seq.
    let bobs = NewMessage {
        daily_bytes: Some(25),
        ..msg(conv, bob, "bob", "b1")
    };
    assert!(matches!(
        f.store.append(bobs).await.unwrap(),
        Appended::New { message, .. } if message.message.seq == 3
    ));
    // A restart forgets nothing: the count is in the store.
    let f = f.reopen(clock.clone()).await;
    assert_eq!(f.store.append(counted("m3")).await.unwrap(), over);
    // At midnight the allowance renews; past days are forgotten.
    now.store(20_001 * DAY, std::sync::atomic::Ordering::SeqCst);
    f.store.forget_old_usage().await.unwrap();
    for (id, seq) in [("m3", 4), ("m4", 5)] {
        assert!(matches!(
            f.store.append(counted(id)).await.unwrap(),
            Appended::New { message, .. } if message.message.seq == seq
        ));
    }
    assert!(matches!(
        f.store.append(counted("m5")).await.unwrap(),
        Appended::OverQuota(_)
    ));
    let stored = f.store.messages_after(conv, 0, page(100)).await.unwrap();
    let seqs: Vec<i64> = stored.iter().map(|m| m.message.seq).collect();
    assert_eq!(seqs, [1, 2, 3, 4, 5]);
}

async fn conversations_started_per_day_are_counted_by_the_store(f: Backend) {
    let (clock, now) = set_clock(20_000 * DAY + 22 * HOUR);
    let f = f.reopen(clock.clone()).await;
    let (alice, _) = user(f.store.as_ref(), "alice").await;
    let (bob, _) = user(f.store.as_ref(), "bob").await;
    for _ in 0..2 {
        assert_eq!(
            f.store.count_new_conversation(alice, 2).await.unwrap(),
            Ok(())
        );
    }
    let over = Err(confab_store::OverQuota {
        retry_after_ms: 2 * HOUR,
    });
    assert_eq!(
        f.store.count_new_conversation(alice, 2).await.unwrap(),
        over
    );
    assert_eq!(
        f.store.count_new_conversation(bob, 2).await.unwrap(),
        Ok(())
    );
    let f = f.reopen(clock.clone()).await;
    assert_eq!(
        f.store.count_new_conversation(alice, 2).await.unwrap(),
        over
    );
    now.store(20_001 * DAY, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(
        f.store.count_new_conversation(alice, 2).await.unwrap(),
        Ok(())
    );
}

crate::on_both!(
    seqs_are_consecutive_and_resends_return_the_original,
    concurrent_appends_get_distinct_gapless_seqs,
    committed_state_survives_reopen,
    cursors_move_forward_only_and_aggregate_over_devices,
    a_new_device_starts_at_the_head,
    pages_stop_at_their_byte_budget_but_never_return_nothing,
    a_message_checked_against_an_older_device_list_is_not_stored,
    a_sent_message_is_found_by_its_client_id_and_heads_cover_every_conversation,
    a_request_takes_a_few_messages_until_it_is_answered_or_accepted,
    blob_parts_only_extend_the_upload_and_the_quota_counts_whole_lengths,
    a_blob_a_message_refers_to_is_bound_to_it_and_kept,
    a_deleted_file_leaves_a_tombstone_its_messages_show,
    group_changes_take_a_seq_and_every_append_is_checked_against_the_members_of_its_commit,
    info_knows_when_each_of_the_newest_cursor_moves_happened,
    a_senders_bytes_of_the_day_hold_across_a_restart_and_renew_at_midnight,
    conversations_started_per_day_are_counted_by_the_store,
);
