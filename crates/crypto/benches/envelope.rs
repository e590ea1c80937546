//! What encryption costs: the server's check of every `send` (decode the
//! base64url body, parse the envelope, compare its devices), and the
//! client's sealing and opening, for a 1:1 message of 300 bytes of text.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use confab_crypto::{Content, DeviceKeys, Envelope, MessageContext, os_rng, seal};
use criterion::{Criterion, criterion_group, criterion_main};

fn envelope(c: &mut Criterion) {
    let mut rng = os_rng();
    let (alice, bob) = (
        DeviceKeys::generate(&mut rng),
        DeviceKeys::generate(&mut rng),
    );
    let recipients = [alice.entry(1), bob.entry(2)];
    let ctx = MessageContext {
        conv: 7,
        message_id: "0192f0c4-7d2e-7c1a-9b1e-8f2d3c4b5a69",
        sender_device: 1,
    };
    let content = Content::text("x".repeat(300)).to_bytes();
    let bytes = seal(&ctx, &alice, &recipients, &content, &mut rng).unwrap();
    let body = URL_SAFE_NO_PAD.encode(&bytes);

    c.bench_function(
        "server check of a send (decode, parse, compare 2 devices)",
        |b| {
            b.iter(|| {
                let bytes = URL_SAFE_NO_PAD.decode(std::hint::black_box(&body)).unwrap();
                let env = Envelope::parse(&bytes).unwrap();
                assert!(env.sender_device() == 1 && env.devices().eq([1, 2]));
            })
        },
    );
    c.bench_function("seal for 2 devices (client)", |b| {
        b.iter(|| seal(&ctx, &alice, &recipients, &content, &mut rng).unwrap())
    });
    let sign = alice.public().sign;
    c.bench_function("verify and open (client)", |b| {
        b.iter(|| {
            Envelope::parse(&bytes)
                .unwrap()
                .open(7, ctx.message_id, 2, &bob, &sign)
                .unwrap()
        })
    });
}

criterion_group!(benches, envelope);
criterion_main!(benches);
