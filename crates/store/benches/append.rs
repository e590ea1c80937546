//! Store append with group commit: many senders appending at once, as the
//! server does under load, against one sender waiting for each commit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use confab_protocol::{ConversationId, DeviceId, MessageId, Username};
use confab_store::sqlite::{SqliteOptions, SqliteStore};
use confab_store::{CursorUpdate, NewMessage, Store, UserId};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};

const USERS: usize = 200;
const PEERS: usize = 8;

struct Setup {
    _dir: tempfile::TempDir,
    store: Arc<SqliteStore>,
    users: Vec<(UserId, DeviceId)>,
    convs: Vec<(usize, usize, ConversationId)>,
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(SqliteStore::open(dir.path(), SqliteOptions::default()).unwrap());
    let mut users = Vec::new();
    for i in 0..USERS {
        let id = store
            .create_user(&Username::new(&format!("user_{i}")).unwrap(), "x", 0)
            .await
            .unwrap();
        let device = store.create_device(id, "bench", 0).await.unwrap();
        users.push((id, device.id));
    }
    let mut convs = Vec::new();
    for i in 0..USERS {
        for k in 0..PEERS {
            let j = (i + 1 + k * 24) % USERS;
            let conv = store.open_direct(users[i].0, users[j].0, 0).await.unwrap();
            convs.push((i, j, conv));
        }
    }
    Setup {
        _dir: dir,
        store,
        users,
        convs,
    }
}

/// Appends `n` messages from `concurrency` tasks, each followed (like a
/// recipient's confirmation) by a delivered cursor every few messages.
async fn run(s: &Setup, n: usize, concurrency: usize, counter: &mut u64) -> Duration {
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let store = s.store.clone();
        let per_task = n / concurrency;
        let picks: Vec<_> = (0..per_task)
            .map(|k| s.convs[(t * 7919 + k * 31) % s.convs.len()])
            .collect();
        let users = s.users.clone();
        let base = *counter + (t * per_task) as u64;
        tasks.push(tokio::spawn(async move {
            for (k, (from, to, conv)) in picks.into_iter().enumerate() {
                let (sender, device) = users[from];
                let appended = store
                    .append(NewMessage {
                        conv,
                        sender,
                        sender_name: "x".into(),
                        sender_device: device,
                        client_id: MessageId::new(format!("m{}", base + k as u64)).unwrap(),
                        body: "b".repeat(300),
                        device_epochs: Vec::new(),
                        unanswered_limit: None,
                        daily_bytes: None,
                        blobs: Vec::new(),
                    })
                    .await
                    .unwrap();
                if k % 4 == 3 && std::env::var_os("NOCURSOR").is_none() {
                    let (user, device) = users[to];
                    let seq = appended.message().expect("stored").message.seq;
                    let update = CursorUpdate {
                        conv,
                        user,
                        device,
                        delivered: seq,
                        read: 0,
                    };
                    store.advance_cursors(update).await.unwrap();
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    *counter += n as u64;
    started.elapsed()
}

fn append(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(setup());
    let mut counter = 0u64;
    let mut group = c.benchmark_group("store_append");
    group.sample_size(10);
    for concurrency in [1usize, 64, 800] {
        let n = if concurrency == 1 { 200 } else { 8_000 };
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("{concurrency}_in_flight"), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| rt.block_on(run(&s, n, concurrency, &mut counter)))
                    .sum()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);
