//! Several writers at once on the same data: the contract for concurrent
//! writers in `confab_store`'s docs. On PostgreSQL each writer is a store
//! of its own (another node on the same database); SQLite has one writer
//! by design, so there the writers share it and the scenarios check that
//! concurrent callers of one store get the same promises.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use confab_protocol::{ConvEvent, Username};
use confab_store::{
    Appended, Clock, CursorUpdate, GroupChange, Page, Store, StoreError, StoredMessage, now_ms,
};
use tokio::task::JoinSet;

use crate::common::*;

const ALL: Page = Page {
    limit: 100_000,
    max_bytes: usize::MAX,
};

async fn all(store: &dyn Store, conv: confab_protocol::ConversationId) -> Vec<StoredMessage> {
    store.messages_after(conv, 0, ALL).await.unwrap()
}

/// Alice and Bob send 150 messages each, every one of them sent twice at
/// once through different writers (a client resending on another node
/// while its first try is still in flight). Every message is stored once,
/// both tries get the same seq, and the seqs are 1..=300 with no gap.
async fn writers_appending_to_one_conversation_keep_seqs_gap_free(f: Backend) {
    let s = f.store.as_ref();
    let (alice, bob, conv) = pair(s).await;
    let writers = [
        f.store.clone(),
        f.other_writer(Clock::system()).await,
        f.other_writer(Clock::system()).await,
    ];
    let mut tasks = JoinSet::new();
    for i in 0..300usize {
        let (who, name) = if i % 2 == 0 {
            (alice, "alice")
        } else {
            (bob, "bob")
        };
        let id = format!("m{i}");
        for w in [i % 3, (i + 1) % 3] {
            let (store, id) = (writers[w].clone(), id.clone());
            tasks.spawn(async move {
                let appended = store.append(msg(conv, who, name, &id)).await.unwrap();
                let seq = appended.message().expect("stored").message.seq;
                (id, seq, matches!(appended, Appended::New { .. }))
            });
        }
    }
    let mut acked: HashMap<String, Vec<(i64, bool)>> = HashMap::new();
    while let Some(done) = tasks.join_next().await {
        let (id, seq, new) = done.unwrap();
        acked.entry(id).or_default().push((seq, new));
    }
    for (id, tries) in &acked {
        assert_eq!(tries.len(), 2);
        assert_eq!(tries[0].0, tries[1].0, "{id}: both tries get one seq");
        assert_eq!(
            tries.iter().filter(|(_, new)| *new).count(),
            1,
            "{id}: stored once"
        );
    }
    let stored = all(s, conv).await;
    let seqs: Vec<i64> = stored.iter().map(|m| m.message.seq).collect();
    assert_eq!(seqs, (1..=300).collect::<Vec<_>>(), "gap-free, one each");
    for m in &stored {
        assert_eq!(acked[m.message.id.as_str()][0].0, m.message.seq);
    }
}

/// One writer's clock is an hour behind the other's. Within a
/// conversation, time never runs backwards: a message's ts is at least
/// that of every message before it. The same holds across a restart with
/// a clock that went back.
async fn skewed_clocks_never_make_time_run_backwards(f: Backend) {
    let (alice, bob, conv) = pair(f.store.as_ref()).await;
    let hour = 3_600_000;
    let behind = f
        .other_writer(Clock::from_fn(move || now_ms() - hour))
        .await;
    let mut tasks = JoinSet::new();
    for i in 0..100usize {
        let store = if i % 2 == 0 {
            f.store.clone()
        } else {
            behind.clone()
        };
        let (who, name) = if i % 3 == 0 {
            (alice, "alice")
        } else {
            (bob, "bob")
        };
        tasks.spawn(async move { store.append(msg(conv, who, name, &format!("m{i}"))).await });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap().unwrap();
    }
    let last = all(f.store.as_ref(), conv).await.last().unwrap().message.ts;
    let f = f.reopen(Clock::from_fn(move || now_ms() - 2 * hour)).await;
    let after = f
        .store
        .append(msg(conv, alice, "alice", "later"))
        .await
        .unwrap();
    assert!(after.message().unwrap().message.ts >= last);
    let stored = all(f.store.as_ref(), conv).await;
    assert_eq!(stored.len(), 101);
    for pair in stored.windows(2) {
        assert!(
            pair[1].message.ts >= pair[0].message.ts,
            "seq {} at {} after seq {} at {}",
            pair[1].message.seq,
            pair[1].message.ts,
            pair[0].message.seq,
            pair[0].message.ts
        );
    }
}

/// Bob's two devices confirm through different writers at once, each in
/// its own order (a device's frames can reach two nodes). Whatever order
/// the commits land in, a cursor ends at the highest value anyone sent,
/// and no answer shows a cursor below what that caller asked for.
async fn cursors_from_several_writers_never_move_backwards(f: Backend) {
    let s = f.store.as_ref();
    let (alice, bob, conv) = pair(s).await;
    let phone = s.create_device(bob.0, "phone", 1).await.unwrap().id;
    for i in 0..60 {
        s.append(msg(conv, alice, "alice", &format!("m{i}")))
            .await
            .unwrap();
    }
    let other = f.other_writer(Clock::system()).await;
    let mut tasks = JoinSet::new();
    for i in 0..120i64 {
        let store = if i % 2 == 0 {
            f.store.clone()
        } else {
            other.clone()
        };
        // Up and down: 7, 53, 14, 46, ... then the highest in the middle.
        let seq = if i % 2 == 0 { i / 2 } else { 60 - i / 2 };
        let device = if i % 3 == 0 { phone } else { bob.1 };
        let read = if i % 4 == 0 { seq / 2 } else { 0 };
        tasks.spawn(async move {
            let moved = store
                .advance_cursors(CursorUpdate {
                    conv,
                    user: bob.0,
                    device,
                    delivered: seq,
                    read,
                })
                .await
                .unwrap();
            assert!(moved.cursors.delivered >= seq, "{moved:?} for {seq}");
            assert!(moved.cursors.read >= read, "{moved:?} for {read}");
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
    let state = &s.conversations(bob.0, bob.1).await.unwrap()[0];
    assert_eq!((state.delivered, state.read), (60, 29));
    let seen_by_alice = &s.conversations(alice.0, alice.1).await.unwrap()[0];
    let peer = seen_by_alice.peer().unwrap();
    assert_eq!((peer.delivered, peer.read), (60, 29));
}

/// Two devices of Alice publish the next device list at once, through
/// different writers: one wins, the other hears `Conflict` (reread and
/// retry), never an internal error. The same for two people taking one
/// username, and two opening the same conversation: one conversation.
async fn unique_key_races_have_one_winner_and_clear_losers(f: Backend) {
    let s = f.store.as_ref();
    let (alice, bob, _) = pair(s).await;
    let writers: Vec<Arc<dyn Store>> = vec![
        f.store.clone(),
        f.other_writer(Clock::system()).await,
        f.other_writer(Clock::system()).await,
        f.other_writer(Clock::system()).await,
    ];

    let mut lists = JoinSet::new();
    for (i, w) in writers.iter().enumerate() {
        let w = w.clone();
        lists.spawn(async move {
            let mut list = list(1);
            list.signed = format!("{{\"epoch\":1,\"by\":{i}}}");
            w.put_device_list(alice.0, list, vec![], 1).await
        });
    }
    let mut won = 0;
    while let Some(done) = lists.join_next().await {
        match done.unwrap() {
            Ok(()) => won += 1,
            Err(StoreError::Conflict) => {}
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!(won, 1);
    assert_eq!(s.device_lists(alice.0, 0).await.unwrap().len(), 1);

    let mut names = JoinSet::new();
    for w in &writers {
        let w = w.clone();
        names.spawn(async move {
            w.create_user(&Username::new("carol").unwrap(), "hash", 1)
                .await
        });
    }
    let mut created = 0;
    while let Some(done) = names.join_next().await {
        match done.unwrap() {
            Ok(_) => created += 1,
            Err(StoreError::UsernameTaken) => {}
            Err(other) => panic!("{other}"),
        }
    }
    assert_eq!(created, 1);
    let carol = s.user_by_name("carol").await.unwrap().unwrap().id;

    let mut opens = JoinSet::new();
    for (i, w) in writers.iter().enumerate() {
        let w = w.clone();
        let (a, b) = if i % 2 == 0 {
            (bob.0, carol)
        } else {
            (carol, bob.0)
        };
        opens.spawn(async move { w.open_direct(a, b, 1).await.unwrap() });
    }
    let mut ids = HashSet::new();
    while let Some(done) = opens.join_next().await {
        ids.insert(done.unwrap());
    }
    assert_eq!(ids.len(), 1, "one conversation for the pair: {ids:?}");
}

/// Bob and Carol keep sending in a group while Alice, through another
/// writer, removes Carol and adds Dave. Each append is checked against the
/// members of its own commit: no message of Carol's lands after her
/// removal, none of Dave's before he was added, and the log stays
/// gap-free with every accepted message in it.
async fn group_changes_and_sends_at_once_agree_on_who_was_a_member(f: Backend) {
    let s = f.store.as_ref();
    let (alice, bob, carol, dave) = (
        user(s, "alice").await,
        user(s, "bob").await,
        user(s, "carol").await,
        user(s, "dave").await,
    );
    let named = |u: (confab_store::UserId, _), n: &str| (u.0, n.to_string());
    let create = GroupChange::Create {
        name: "G".into(),
        members: vec![named(bob, "bob"), named(carol, "carol")],
    };
    let created = s
        .change_group(change(None, alice, "alice", "g1", create))
        .await
        .unwrap();
    let conv = created.message().unwrap().message.conv;
    let admin = f.other_writer(Clock::system()).await;
    let others = [f.store.clone(), f.other_writer(Clock::system()).await];

    let accepted = Arc::new(AtomicI64::new(0));
    let mut sends = JoinSet::new();
    for i in 0..60usize {
        for (who, name) in [(bob, "bob"), (carol, "carol"), (dave, "dave")] {
            let store = others[i % 2].clone();
            let accepted = accepted.clone();
            sends.spawn(async move {
                let id = format!("{name}{i}");
                match store.append(msg(conv, who, name, &id)).await.unwrap() {
                    Appended::New { .. } => {
                        accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Appended::NotMember => {}
                    other => panic!("{id}: {other:?}"),
                }
                tokio::task::yield_now().await;
            });
        }
    }
    let changes = tokio::spawn(async move {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        for (i, change_) in [
            GroupChange::Remove(vec![named(carol, "carol")]),
            GroupChange::Add(vec![named(dave, "dave")]),
        ]
        .into_iter()
        .enumerate()
        {
            let id = format!("c{i}");
            let done = admin
                .change_group(change(Some(conv), alice, "alice", &id, change_))
                .await
                .unwrap();
            assert!(matches!(done, Appended::New { .. }), "{done:?}");
        }
    });
    while let Some(done) = sends.join_next().await {
        done.unwrap();
    }
    changes.await.unwrap();

    let stored = all(s, conv).await;
    let seqs: Vec<i64> = stored.iter().map(|m| m.message.seq).collect();
    assert_eq!(seqs, (1..=stored.len() as i64).collect::<Vec<_>>());
    // Created, the two changes, and each accepted message.
    assert_eq!(
        stored.len() as i64,
        3 + accepted.load(Ordering::Relaxed),
        "every accepted message is in the log"
    );
    let at = |event: fn(&ConvEvent) -> bool| {
        stored
            .iter()
            .find(|m| m.message.event.as_ref().is_some_and(event))
            .unwrap()
            .message
            .seq
    };
    let removed = at(|e| matches!(e, ConvEvent::Removed { .. }));
    let added = at(|e| matches!(e, ConvEvent::Added { .. }));
    for m in stored.iter().filter(|m| m.message.event.is_none()) {
        match m.message.from.as_str() {
            "carol" => assert!(
                m.message.seq < removed,
                "carol's {} after removal",
                m.message.id
            ),
            "dave" => assert!(
                m.message.seq > added,
                "dave's {} before joining",
                m.message.id
            ),
            _ => {}
        }
    }
    // A resend of one of Carol's early messages still gets its original.
    if let Some(early) = stored.iter().find(|m| m.message.from == "carol") {
        let again = others[1]
            .append(msg(conv, carol, "carol", early.message.id.as_str()))
            .await
            .unwrap();
        assert_eq!(again.message().unwrap().message.seq, early.message.seq);
    }
}

/// Alice forwards one picture to two conversations many times at once,
/// through two writers, while she deletes another file: each message binds
/// the picture in its own commit, none waits on another forever, and the
/// picture is kept (bound) while the other file is gone.
async fn one_file_sent_to_two_conversations_at_once(f: Backend) {
    use confab_store::{BlobCreated, NewBlob};
    let f = f.without_deadlock_detection().await;
    let s = f.store.as_ref();
    let (alice, _bob, with_bob) = pair(s).await;
    let carol = user(s, "carol").await;
    let with_carol = s.open_direct(alice.0, carol.0, 1).await.unwrap();
    for id in ["pic", "other"] {
        let blob = NewBlob {
            id: id.into(),
            owner: alice.0,
            length: 10,
            now: 1,
            expires_at: 100,
            quota_bytes: 1000,
        };
        assert!(matches!(
            s.create_blob(blob).await.unwrap(),
            BlobCreated::Created(_)
        ));
        s.add_blob_part(id, part(0, 0, 10), 100).await.unwrap();
    }
    let other = f.other_writer(Clock::system()).await;
    let mut tasks = JoinSet::new();
    for i in 0..40usize {
        let store = if i % 2 == 0 {
            f.store.clone()
        } else {
            other.clone()
        };
        let conv = if i % 4 < 2 { with_bob } else { with_carol };
        tasks.spawn(async move {
            let m = confab_store::NewMessage {
                blobs: vec!["pic".into()],
                ..msg(conv, alice, "alice", &format!("m{i}"))
            };
            store.append(m).await.unwrap()
        });
    }
    let deleting = {
        let other = other.clone();
        tokio::spawn(async move { other.delete_blob("other", 2).await.unwrap() })
    };
    while let Some(done) = tasks.join_next().await {
        assert!(matches!(done.unwrap(), Appended::New { .. }));
    }
    assert!(deleting.await.unwrap().is_some());
    assert_eq!(
        all(s, with_bob).await.len() + all(s, with_carol).await.len(),
        40
    );
    let pic = s.blob("pic").await.unwrap().unwrap();
    assert!(pic.expires_at > 100, "bound: kept past its upload expiry");
    assert!(
        s.blob("other")
            .await
            .unwrap()
            .is_none_or(|b| b.deleted_at.is_some())
    );
}

/// A sender's bytes of the day hold for every writer together: with
/// sends racing through two writers, exactly as many are stored as fit,
/// the rest are refused, and the refused take no seq.
async fn a_senders_daily_bytes_hold_across_writers(f: Backend) {
    let (alice, _, conv) = pair(f.store.as_ref()).await;
    let other = f.other_writer(Clock::system()).await;
    // Bodies of 12 bytes ("body of m-NN"); 15 of them fit in 185.
    let mut tasks = JoinSet::new();
    for i in 0..40usize {
        let store = if i % 2 == 0 {
            f.store.clone()
        } else {
            other.clone()
        };
        let m = confab_store::NewMessage {
            daily_bytes: Some(185),
            ..msg(conv, alice, "alice", &format!("m-{i:02}"))
        };
        tasks.spawn(async move { store.append(m).await });
    }
    let (mut stored, mut refused) = (0, 0);
    while let Some(done) = tasks.join_next().await {
        match done.unwrap().unwrap() {
            Appended::New { .. } => stored += 1,
            Appended::OverQuota(_) => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((stored, refused), (15, 25));
    let seqs: Vec<i64> = all(f.store.as_ref(), conv)
        .await
        .iter()
        .map(|m| m.message.seq)
        .collect();
    assert_eq!(seqs, (1..=15).collect::<Vec<i64>>());
}

/// Conversations started through two writers at once: the day's number
/// holds for both together.
async fn new_conversations_per_day_hold_across_writers(f: Backend) {
    let (alice, _) = user(f.store.as_ref(), "alice").await;
    let other = f.other_writer(Clock::system()).await;
    let mut tasks = JoinSet::new();
    for i in 0..30 {
        let store = if i % 2 == 0 {
            f.store.clone()
        } else {
            other.clone()
        };
        tasks.spawn(async move { store.count_new_conversation(alice, 7).await });
    }
    let mut counted = 0;
    while let Some(done) = tasks.join_next().await {
        if done.unwrap().unwrap().is_ok() {
            counted += 1;
        }
    }
    assert_eq!(counted, 7);
}

crate::on_both!(
    one_file_sent_to_two_conversations_at_once,
    writers_appending_to_one_conversation_keep_seqs_gap_free,
    skewed_clocks_never_make_time_run_backwards,
    cursors_from_several_writers_never_move_backwards,
    unique_key_races_have_one_winner_and_clear_losers,
    group_changes_and_sends_at_once_agree_on_who_was_a_member,
    a_senders_daily_bytes_hold_across_writers,
    new_conversations_per_day_hold_across_writers,
);
