//! RFC 9180 known answers for the one HPKE suite confab uses: Base mode,
//! DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-256-GCM. Checks that the
//! `hpke` crate, as configured here, is that suite.

use std::convert::Infallible;

use hpke::aead::AesGcm256;
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::rand_core::{TryCryptoRng, TryRng};
use hpke::{Deserializable, Kem, OpModeR, OpModeS, Serializable};
use serde_json::Value;

/// An "RNG" that replays fixed bytes, so the sender's ephemeral key is the
/// vector's: hpke draws exactly Nsk = 32 bytes and runs DeriveKeyPair on them.
struct Replay(Vec<u8>);

impl TryRng for Replay {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        unimplemented!("hpke only fills bytes")
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        unimplemented!("hpke only fills bytes")
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        assert!(
            dst.len() <= self.0.len(),
            "asked for more than the vector gives"
        );
        dst.copy_from_slice(&self.0[..dst.len()]);
        self.0.drain(..dst.len());
        Ok(())
    }
}
impl TryCryptoRng for Replay {}

fn clamp(mut sk: Vec<u8>) -> Vec<u8> {
    sk[0] &= 248;
    sk[31] = (sk[31] & 127) | 64;
    sk
}

fn hex(v: &Value) -> Vec<u8> {
    hex::decode(v.as_str().expect("hex string")).expect("valid hex")
}

#[test]
fn rfc9180_base_x25519_sha256_aes256gcm() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/vectors/rfc9180-base-x25519-sha256-aes256gcm.json"
    );
    let file: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let vectors = file["vectors"].as_array().unwrap();
    assert_eq!(vectors.len(), 1);
    let v = &vectors[0];
    assert_eq!(
        (&v["mode"], &v["kem_id"], &v["kdf_id"], &v["aead_id"]),
        (&0.into(), &0x20.into(), &1.into(), &2.into())
    );
    assert_eq!(X25519HkdfSha256::KEM_ID, 0x0020);

    // DeriveKeyPair for both sides. RFC 9180's vectors list X25519 private keys
    // unclamped; hpke serializes them clamped (RFC 7748 §5), the same scalar.
    let (sk_r, pk_r) = X25519HkdfSha256::derive_keypair(&hex(&v["ikmR"]));
    assert_eq!(sk_r.to_bytes().to_vec(), clamp(hex(&v["skRm"])));
    assert_eq!(pk_r.to_bytes().to_vec(), hex(&v["pkRm"]));
    let (sk_e, pk_e) = X25519HkdfSha256::derive_keypair(&hex(&v["ikmE"]));
    assert_eq!(sk_e.to_bytes().to_vec(), clamp(hex(&v["skEm"])));
    assert_eq!(pk_e.to_bytes().to_vec(), hex(&v["pkEm"]));

    // Receiver, from the serialized keys and enc alone.
    let info = hex(&v["info"]);
    let sk_r = <X25519HkdfSha256 as Kem>::PrivateKey::from_bytes(&hex(&v["skRm"])).unwrap();
    let enc = <X25519HkdfSha256 as Kem>::EncappedKey::from_bytes(&hex(&v["enc"])).unwrap();
    let mut receiver = hpke::setup_receiver::<AesGcm256, HkdfSha256, X25519HkdfSha256>(
        &OpModeR::Base,
        &sk_r,
        &enc,
        &info,
    )
    .unwrap();

    // Sender, with the vector's ephemeral key.
    let mut rng = Replay(hex(&v["ikmE"]));
    let (enc_s, mut sender) =
        hpke::setup_sender_with_rng::<AesGcm256, HkdfSha256, X25519HkdfSha256>(
            &OpModeS::Base,
            &pk_r,
            &info,
            &mut rng,
        )
        .unwrap();
    assert_eq!(enc_s.to_bytes().to_vec(), hex(&v["enc"]));

    let encryptions = v["encryptions"].as_array().unwrap();
    assert_eq!(encryptions.len(), 257);
    for (seq, e) in encryptions.iter().enumerate() {
        let (aad, ct, pt) = (hex(&e["aad"]), hex(&e["ct"]), hex(&e["pt"]));
        assert_eq!(
            receiver.open(&ct, &aad).unwrap(),
            pt,
            "open, sequence {seq}"
        );
        assert_eq!(sender.seal(&pt, &aad).unwrap(), ct, "seal, sequence {seq}");
    }

    let exports = v["exports"].as_array().unwrap();
    assert!(!exports.is_empty());
    for x in exports {
        let want = hex(&x["exported_value"]);
        assert_eq!(x["L"].as_u64(), Some(want.len() as u64));
        let ctx = hex(&x["exporter_context"]);
        let mut got = vec![0; want.len()];
        receiver.export(&ctx, &mut got).unwrap();
        assert_eq!(got, want);
        sender.export(&ctx, &mut got).unwrap();
        assert_eq!(got, want);
    }
}
