//! The repair check's store read (`Store::heads`): what each connection
//! asks every repair interval, for a typical user and for one in 1,000
//! conversations.

use std::sync::Arc;

use confab_protocol::{MessageId, Username};
use confab_store::sqlite::{SqliteOptions, SqliteStore};
use confab_store::{NewMessage, Store, UserId};
use criterion::{Criterion, criterion_group, criterion_main};

/// A user with `convs` conversations of 10 messages each.
async fn user_in(store: &SqliteStore, name: &str, convs: usize) -> UserId {
    let me = store
        .create_user(&Username::new(name).unwrap(), "x", 0)
        .await
        .unwrap();
    let device = store.create_device(me, "bench", 0).await.unwrap();
    for i in 0..convs {
        let peer = store
            .create_user(&Username::new(&format!("{name}_peer_{i}")).unwrap(), "x", 0)
            .await
            .unwrap();
        let conv = store.open_direct(me, peer, 0).await.unwrap();
        for k in 0..10 {
            store
                .append(NewMessage {
                    conv,
                    sender: me,
                    sender_name: name.into(),
                    sender_device: device.id,
                    client_id: MessageId::new(format!("{name}-{i}-{k}")).unwrap(),
                    body: "b".repeat(300),
                    device_epochs: Vec::new(),
                })
                .await
                .unwrap();
        }
    }
    me
}

fn heads(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
    let typical = rt.block_on(user_in(&store, "typical", 8));
    let busy = rt.block_on(user_in(&store, "busy", 1000));
    let mut group = c.benchmark_group("heads");
    group.bench_function("8 conversations", |b| {
        b.iter(|| rt.block_on(store.heads(typical)).unwrap())
    });
    group.bench_function("1000 conversations", |b| {
        b.iter(|| rt.block_on(store.heads(busy)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, heads);
criterion_main!(benches);
