//! confab's own known-answer vector, `tests/vectors/envelope-v1.json`: an
//! envelope, two signed device lists and their safety number. The Python
//! verifier (`scripts/interop/verify_envelope.py`) checks the same file.
//!
//! To rewrite the file after a deliberate format change:
//! `CONFAB_WRITE_VECTORS=1 cargo test -p confab-crypto --test envelope_vector`.

use confab_crypto::{
    Content, DeviceEntry, DeviceKeys, DeviceList, Envelope, MessageContext, PublicKeys,
    SignedDeviceList, fingerprint, safety_number, seal,
};
use rand_chacha::ChaCha20Rng;
use rand_chacha::rand_core::SeedableRng;
use serde_json::{Value, json};

const PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/vectors/envelope-v1.json"
);

fn device_json(user: &str, device: i64, keys: &DeviceKeys) -> Value {
    let public = serde_json::to_value(keys.public()).unwrap();
    json!({
        "user": user,
        "device": device,
        "secret": hex::encode(*keys.to_secret_bytes()),
        "sign": public["sign"],
        "kem": public["kem"],
        "fingerprint": fingerprint(&keys.public()),
    })
}

/// Builds the vector from fixed inputs; only run to (re)write the file.
fn generate() -> Value {
    let key_for = |device: i64| DeviceKeys::generate(&mut rng([device as u8; 32]));
    let (alice8, bob1, bob2) = (key_for(8), key_for(1), key_for(2));
    let seed = *b"confab envelope v1 test vector!!";
    let plaintext = Content::text("Hello, Bob! 👋 Ünïcödé").to_bytes();
    let recipients = [("bob", 1, &bob1), ("bob", 2, &bob2), ("alice", 8, &alice8)];
    let ctx = MessageContext {
        conv: 1_234_567_890_123,
        message_id: "01JD8Q4ZK3V6W0TQ0M5Y7N2R9C",
        sender_device: 8,
    };
    let entries: Vec<DeviceEntry> = recipients.iter().map(|(_, d, k)| k.entry(*d)).collect();
    let envelope = seal(&ctx, &alice8, &entries, &plaintext, &mut rng(seed)).unwrap();

    let alice_list = DeviceList {
        user: "alice".into(),
        epoch: 1,
        devices: vec![alice8.entry(8)],
    };
    let bob_list = DeviceList {
        user: "bob".into(),
        epoch: 3,
        devices: vec![bob1.entry(1), bob2.entry(2)],
    };
    json!({
        "description": "confab envelope v1 test vector; formats in docs/encryption.md",
        "rng": "rand_chacha 0.10 ChaCha20Rng::from_seed(seed); seal draws the content key (32 bytes), \
                the nonce (12), then 32 bytes of HPKE DeriveKeyPair input per recipient, ascending by device",
        "seed": hex::encode(seed),
        "conv": ctx.conv,
        "message_id": ctx.message_id,
        "plaintext": String::from_utf8(plaintext).unwrap(),
        "sender": device_json("alice", 8, &alice8),
        "recipients": recipients.map(|(u, d, k)| device_json(u, d, k)),
        "envelope": hex::encode(envelope),
        "device_lists": [alice_list.clone().sign(8, &alice8).unwrap(), bob_list.clone().sign(2, &bob2).unwrap()],
        "safety_number": safety_number(&alice_list, &bob_list),
    })
}

fn rng(seed: [u8; 32]) -> ChaCha20Rng {
    ChaCha20Rng::from_seed(seed)
}

fn keys_of(device: &Value) -> (i64, DeviceKeys) {
    let secret: [u8; 64] = hex::decode(device["secret"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let keys = DeviceKeys::from_secret_bytes(&secret);
    let public: PublicKeys = serde_json::from_value(device.clone()).unwrap();
    assert_eq!(keys.public(), public, "secret and public keys of {device}");
    assert_eq!(
        fingerprint(&public),
        device["fingerprint"].as_str().unwrap()
    );
    (device["device"].as_i64().unwrap(), keys)
}

#[test]
fn envelope_vector() {
    if std::env::var_os("CONFAB_WRITE_VECTORS").is_some() {
        let text = serde_json::to_string_pretty(&generate()).unwrap() + "\n";
        std::fs::write(PATH, text).unwrap();
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(PATH).unwrap()).unwrap();
    let (sender_device, sender) = keys_of(&v["sender"]);
    let recipients: Vec<(i64, DeviceKeys)> = v["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(keys_of)
        .collect();
    let plaintext = v["plaintext"].as_str().unwrap().as_bytes();
    let (conv, message_id) = (
        v["conv"].as_i64().unwrap(),
        v["message_id"].as_str().unwrap(),
    );

    // Sealing again from the seed gives the same bytes.
    let seed: [u8; 32] = hex::decode(v["seed"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let entries: Vec<DeviceEntry> = recipients
        .iter()
        .map(|(device, k)| k.entry(*device))
        .collect();
    let ctx = MessageContext {
        conv,
        message_id,
        sender_device,
    };
    let sealed = seal(&ctx, &sender, &entries, plaintext, &mut rng(seed)).unwrap();
    assert_eq!(hex::encode(&sealed), v["envelope"].as_str().unwrap());

    let envelope = Envelope::parse(&sealed).unwrap();
    assert_eq!(envelope.devices().collect::<Vec<_>>(), [1, 2, 8]);
    for (device, keys) in &recipients {
        let opened = envelope
            .open(conv, message_id, *device, keys, &sender.public().sign)
            .unwrap();
        assert_eq!(opened, plaintext);
        assert_eq!(
            Content::from_bytes(&opened).unwrap().text,
            "Hello, Bob! 👋 Ünïcödé"
        );
    }

    let lists: Vec<SignedDeviceList> = serde_json::from_value(v["device_lists"].clone()).unwrap();
    assert_eq!(
        serde_json::to_value(&lists).unwrap(),
        v["device_lists"],
        "JSON round trip"
    );
    for signed in &lists {
        signed.verify_self_signed().unwrap();
        let (_, keys) = [(sender_device, &sender)]
            .into_iter()
            .chain(recipients.iter().map(|(d, k)| (*d, k)))
            .find(|(d, _)| *d == signed.signer)
            .unwrap();
        // Ed25519 is deterministic, so signing again reproduces the vector.
        assert_eq!(
            signed.list.clone().sign(signed.signer, keys).unwrap(),
            *signed
        );
    }
    assert_eq!(
        safety_number(&lists[0].list, &lists[1].list),
        v["safety_number"].as_str().unwrap()
    );
}
