//! The repair check's store read (`Store::heads`): once per interval per
//! node, for every user connected there. Figures for 200 users in 16
//! conversations each (the idle bench's accounts), and for one user in
//! 1,000 conversations.

use std::sync::Arc;

use confab_protocol::{DeviceId, MessageId, Username};
use confab_store::sqlite::{SqliteOptions, SqliteStore};
use confab_store::{NewMessage, Store, UserId};
use criterion::{Criterion, criterion_group, criterion_main};

async fn user(store: &SqliteStore, name: &str) -> (UserId, DeviceId) {
    let id = store
        .create_user(&Username::new(name).unwrap(), "x", 0)
        .await
        .unwrap();
    (id, store.create_device(id, "bench", 0).await.unwrap().id)
}

/// Opens the conversation of `a` and `b` and puts 10 messages in it, all
/// in flight at once so that they share commits (the setup is otherwise
/// one fsync per message).
async fn talk(store: Arc<SqliteStore>, a: (UserId, DeviceId), b: UserId, tag: String) {
    let conv = store.open_direct(a.0, b, 0).await.unwrap();
    let appends: Vec<_> = (0..10)
        .map(|k| {
            let store = store.clone();
            let message = NewMessage {
                conv,
                sender: a.0,
                sender_name: "x".into(),
                sender_device: a.1,
                client_id: MessageId::new(format!("{tag}-{k}")).unwrap(),
                body: "b".repeat(300),
                device_epochs: Vec::new(),
                unanswered_limit: None,
                daily_bytes: None,
                blobs: Vec::new(),
            };
            tokio::spawn(async move { store.append(message).await.unwrap() })
        })
        .collect();
    for append in appends {
        append.await.unwrap();
    }
}

/// Runs the setup's conversations side by side.
async fn all(talks: Vec<tokio::task::JoinHandle<()>>) {
    for talk in talks {
        talk.await.unwrap();
    }
}

fn heads(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
    let (users, busy) = rt.block_on(async {
        let mut users = Vec::new();
        for i in 0..200 {
            users.push(user(&store, &format!("user_{i}")).await);
        }
        // Each writes to 8 others: 16 conversations each.
        let mut talks = Vec::new();
        for i in 0..200 {
            for k in 0..8 {
                let j = (i + 1 + k * 24) % 200;
                let tag = format!("{i}-{k}");
                talks.push(tokio::spawn(talk(store.clone(), users[i], users[j].0, tag)));
            }
        }
        all(talks).await;
        let busy = user(&store, "busy").await;
        let mut talks = Vec::new();
        for i in 0..1000 {
            let peer = user(&store, &format!("peer_{i}")).await;
            talks.push(tokio::spawn(talk(
                store.clone(),
                busy,
                peer.0,
                format!("busy-{i}"),
            )));
        }
        all(talks).await;
        (users, busy)
    });
    let ids: Vec<UserId> = users.iter().map(|u| u.0).collect();
    let mut group = c.benchmark_group("heads");
    group.bench_function("200 users, 16 conversations each", |b| {
        b.iter(|| rt.block_on(store.heads(&ids)).unwrap())
    });
    group.bench_function("1 user, 1000 conversations", |b| {
        b.iter(|| rt.block_on(store.heads(&[busy.0])).unwrap())
    });
    group.finish();
}

criterion_group!(benches, heads);
criterion_main!(benches);
