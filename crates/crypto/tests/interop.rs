//! Runs the independent Python verifier (`scripts/interop/verify_envelope.py`)
//! on confab's vector, then opens the envelope the script sealed. Needs
//! `python3` with `venv` and access to PyPI on first run; fails, never skips,
//! without them.

use std::path::Path;
use std::process::Command;

use confab_crypto::{Content, DeviceKeys, Envelope};
use serde_json::Value;

#[path = "../../../scripts/interop/venv.rs"]
mod venv;

use venv::venv_python;

#[test]
fn python_verifier_agrees_both_ways() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = crate_dir.parent().unwrap().parent().unwrap();
    let vector_path = crate_dir.join("tests/vectors/envelope-v1.json");
    let python = venv_python(root);

    let out = Command::new(&python)
        .arg(root.join("scripts/interop/verify_envelope.py"))
        .arg(&vector_path)
        .output()
        .expect("run verify_envelope.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "verify_envelope.py failed ({}):\n{}{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );

    // Open what Python sealed, as every recipient in the vector.
    let sealed: Value = serde_json::from_str(stdout.trim()).expect("one JSON line on stdout");
    let vector: Value =
        serde_json::from_str(&std::fs::read_to_string(&vector_path).unwrap()).unwrap();
    let keys = |d: &Value| {
        let secret: [u8; 64] = hex::decode(d["secret"].as_str().unwrap())
            .unwrap()
            .try_into()
            .unwrap();
        (
            d["device"].as_i64().unwrap(),
            DeviceKeys::from_secret_bytes(&secret),
        )
    };
    let (sender_device, sender) = keys(&vector["sender"]);
    let bytes = hex::decode(sealed["envelope"].as_str().unwrap()).unwrap();
    let envelope = Envelope::parse(&bytes).unwrap();
    assert_eq!(envelope.sender_device(), sender_device);
    let (conv, message_id) = (
        sealed["conv"].as_i64().unwrap(),
        sealed["message_id"].as_str().unwrap(),
    );
    let recipients = vector["recipients"].as_array().unwrap();
    assert_eq!(envelope.devices().count(), recipients.len());
    for (device, my_keys) in recipients.iter().map(keys) {
        let plain = envelope
            .open(conv, message_id, device, &my_keys, &sender.public().sign)
            .unwrap_or_else(|e| panic!("device {device}: {e}"));
        assert_eq!(plain, sealed["plaintext"].as_str().unwrap().as_bytes());
        assert_eq!(
            Content::from_bytes(&plain).unwrap().text,
            "Hello from Python"
        );
    }
}
