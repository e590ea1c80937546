//! Frame decode and encode: the JSON work done for every message.

use confab_protocol::{
    ConversationId, DeviceId, Message, MessageId, ServerFrame, parse_client_frame,
};
use criterion::{Criterion, Throughput, black_box, criterion_group, criterion_main};

fn frames(c: &mut Criterion) {
    let body = "x".repeat(300);
    let send = format!(
        r#"{{"type":"send","id":"0192f0c4-7d2e-7c1a-9b1e-8f2d3c4b5a69","conv":42,"body":"{body}"}}"#
    );
    let msg = ServerFrame::Msg(Message {
        conv: ConversationId(42),
        seq: 1234,
        id: MessageId::new("0192f0c4-7d2e-7c1a-9b1e-8f2d3c4b5a69").unwrap(),
        from: "alice".into(),
        from_device: DeviceId(7),
        ts: 1_795_000_000_000,
        body,
        event: None,
        deleted_files: Vec::new(),
    });
    let mut group = c.benchmark_group("frames");
    group.throughput(Throughput::Elements(1));
    group.bench_function("decode_send", |b| {
        b.iter(|| parse_client_frame(black_box(&send)).unwrap())
    });
    group.bench_function("decode_delivered", |b| {
        b.iter(|| {
            parse_client_frame(black_box(r#"{"type":"delivered","conv":42,"seq":1234}"#)).unwrap()
        })
    });
    group.bench_function("encode_msg", |b| b.iter(|| black_box(&msg).to_json()));
    let text = msg.to_json();
    group.bench_function("decode_msg_client_side", |b| {
        b.iter(|| serde_json::from_str::<ServerFrame>(black_box(&text)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, frames);
criterion_main!(benches);
