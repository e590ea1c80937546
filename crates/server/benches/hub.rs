//! Routing: handing one committed message to the connections of its members.

use std::sync::Arc;

use confab_protocol::{ConversationId, DeviceId, Message, MessageId};
use confab_server::hub::{Delivery, Event, Hub, Kick, LocalRouter, Router};
use confab_server::limits::Limits;
use confab_store::{StoredMessage, UserId};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokio::sync::mpsc;

fn routing(c: &mut Criterion) {
    let hub = Arc::new(Hub::default());
    let router = LocalRouter::new(hub.clone());
    // 10,000 connected users with one device each; drain their queues as we go.
    let mut queues = Vec::new();
    let mut registrations = Vec::new();
    let limits = Limits::new(Default::default(), 100_000, None);
    for u in 0..10_000 {
        let (tx, rx) = mpsc::channel(1024);
        registrations.push(
            hub.register(
                UserId(u),
                DeviceId(u),
                tx,
                Arc::new(Kick::default()),
                &limits,
            )
            .expect("within the limits"),
        );
        queues.push(rx);
    }
    let stored = StoredMessage {
        sender: UserId(1),
        message: Message {
            conv: ConversationId(1),
            seq: 1,
            id: MessageId::new("0192f0c4-7d2e-7c1a-9b1e-8f2d3c4b5a69").unwrap(),
            from: "user_1".into(),
            from_device: DeviceId(1),
            ts: 0,
            body: "x".repeat(300),
            event: None,
            deleted_files: Vec::new(),
        },
    };
    let mut group = c.benchmark_group("routing");
    group.throughput(Throughput::Elements(1));
    group.bench_function("serialize_and_deliver_to_two_members", |b| {
        b.iter(|| {
            let delivery = Arc::new(Delivery::new(&stored, std::time::Instant::now()));
            router.deliver(&[UserId(1), UserId(2)], Event::Message(delivery));
            queues[1].try_recv().unwrap();
            queues[2].try_recv().unwrap();
        })
    });
    let delivery = Arc::new(Delivery::new(&stored, std::time::Instant::now()));
    group.bench_function("deliver_prepared_to_two_members", |b| {
        b.iter(|| {
            router.deliver(&[UserId(1), UserId(2)], Event::Message(delivery.clone()));
            queues[1].try_recv().unwrap();
            queues[2].try_recv().unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, routing);
criterion_main!(benches);
