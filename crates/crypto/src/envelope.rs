//! A message encrypted once under a fresh content key, with that key wrapped
//! (HPKE) for every recipient device and the whole signed by the sender device.
//! Layout v1 is in `docs/encryption.md`.

use std::fmt;

use aes_gcm::aead::{Aead, Payload};
use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use zeroize::Zeroizing;

use crate::keys::{DeviceKeys, Kem, verify};
use crate::{CryptoError, CryptoRng, DeviceEntry, put_message_binding};

type WrapAead = hpke::aead::AesGcm256;
type WrapKdf = hpke::kdf::HkdfSha256;

/// The only envelope version so far.
pub const VERSION: u8 = 1;
/// Most recipient devices one envelope may address.
pub const MAX_WRAPS: usize = 1024;
/// Longest ciphertext (including the 16-byte tag) one envelope may carry.
pub const MAX_CIPHERTEXT: usize = 16 * 1024 * 1024;

const TAG_LEN: usize = 16;
const ENC_LEN: usize = 32;
const WRAPPED_KEY_LEN: usize = 32 + TAG_LEN;
const WRAP_LEN: usize = 8 + ENC_LEN + WRAPPED_KEY_LEN;
const NONCE_LEN: usize = 12;
const SIG_LEN: usize = 64;

const CONTENT_LABEL: &[u8] = b"confab-content-v1";
const WRAP_INFO: &[u8] = b"confab-wrap-v1";
const SIGNATURE_LABEL: &[u8] = b"confab-msg-v1";

/// Which message an envelope is: everything its cryptography is bound to
/// besides the recipients.
#[derive(Debug, Clone, Copy)]
pub struct MessageContext<'a> {
    /// Conversation the message belongs to.
    pub conv: i64,
    /// Client-chosen message id, 1 to 64 ASCII bytes.
    pub message_id: &'a str,
    /// The sending device.
    pub sender_device: i64,
}

/// Encrypts `plaintext` for `recipients` (in any order; duplicate device ids
/// are rejected) and signs the result with `sender`'s key.
///
/// All randomness (content key, nonce, then one HPKE ephemeral key per
/// recipient in ascending device order) comes from `rng`, so a seeded RNG
/// gives reproducible envelopes.
pub fn seal(
    ctx: &MessageContext,
    sender: &DeviceKeys,
    recipients: &[DeviceEntry],
    plaintext: &[u8],
    rng: &mut impl CryptoRng,
) -> Result<Vec<u8>, CryptoError> {
    let mut sorted: Vec<&DeviceEntry> = recipients.iter().collect();
    sorted.sort_by_key(|r| r.device);
    if sorted.is_empty() || sorted.len() > MAX_WRAPS {
        return Err(CryptoError::BadRecipients("need 1 to 1024 devices"));
    }
    if sorted.windows(2).any(|w| w[0].device == w[1].device) {
        return Err(CryptoError::BadRecipients("duplicate device"));
    }
    if plaintext.len() > MAX_CIPHERTEXT - TAG_LEN {
        return Err(CryptoError::TooLarge);
    }

    let mut key = Zeroizing::new([0u8; 32]);
    rng.fill_bytes(key.as_mut());
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill_bytes(&mut nonce);

    // The signature covers a prefix that is not sent, so the envelope is built
    // right after it and the prefix cut off once signed: one buffer, no copy.
    let mut buf = Vec::with_capacity(
        SIGNATURE_LABEL.len()
            + 73
            + 11
            + sorted.len() * WRAP_LEN
            + NONCE_LEN
            + 4
            + plaintext.len()
            + TAG_LEN
            + SIG_LEN,
    );
    buf.extend_from_slice(SIGNATURE_LABEL);
    put_message_binding(&mut buf, ctx.conv, ctx.message_id)?;
    let binding = buf[SIGNATURE_LABEL.len()..].to_vec();
    let prefix_len = buf.len();

    buf.push(VERSION);
    buf.extend_from_slice(&ctx.sender_device.to_be_bytes());
    buf.extend_from_slice(&(sorted.len() as u16).to_be_bytes());
    for r in sorted {
        let pk = <Kem as hpke::Kem>::PublicKey::from_bytes(&r.keys.kem)
            .map_err(|_| CryptoError::BadRecipients("bad device key"))?;
        let aad = wrap_aad(&binding, r.device, ctx.sender_device);
        let (enc, wrapped) = hpke::single_shot_seal_with_rng::<WrapAead, WrapKdf, Kem>(
            &OpModeS::Base,
            &pk,
            WRAP_INFO,
            key.as_ref(),
            &aad,
            rng,
        )
        .map_err(|_| CryptoError::BadRecipients("bad device key"))?;
        buf.extend_from_slice(&r.device.to_be_bytes());
        buf.extend_from_slice(&enc.to_bytes());
        buf.extend_from_slice(&wrapped);
    }
    buf.extend_from_slice(&nonce);
    buf.extend_from_slice(&((plaintext.len() + TAG_LEN) as u32).to_be_bytes());
    let start = buf.len();
    buf.extend_from_slice(plaintext);
    let tag = Aes256Gcm::new_from_slice(key.as_ref())
        .expect("32-byte key")
        .encrypt_inout_detached(
            &nonce.into(),
            &content_aad(&binding, ctx.sender_device),
            buf[start..].as_mut().into(),
        )
        .map_err(|_| CryptoError::TooLarge)?;
    buf.extend_from_slice(&tag);

    let signature = sender.sign(&buf);
    buf.extend_from_slice(&signature);
    buf.drain(..prefix_len);
    Ok(buf)
}

/// An envelope in the v1 layout whose wraps, nonce and signature are filler
/// bytes from `fill`, around `ciphertext` as given: a load generator's
/// stand-in for a real message. The server, which only checks the layout
/// and the devices, cannot tell it apart; no device can open it.
///
/// `devices` must be ascending and unique, and `ciphertext` at least 16
/// bytes (a tag's worth), or the server refuses the result as malformed.
pub fn stand_in(
    sender_device: i64,
    devices: &[i64],
    ciphertext: &[u8],
    fill: &mut impl FnMut(&mut [u8]),
) -> Vec<u8> {
    let mut buf = Vec::with_capacity(
        15 + devices.len() * WRAP_LEN + NONCE_LEN + 4 + ciphertext.len() + SIG_LEN,
    );
    buf.push(VERSION);
    buf.extend_from_slice(&sender_device.to_be_bytes());
    buf.extend_from_slice(&(devices.len() as u16).to_be_bytes());
    let mut filler = |buf: &mut Vec<u8>, n: usize| {
        let start = buf.len();
        buf.resize(start + n, 0);
        fill(&mut buf[start..]);
    };
    for device in devices {
        buf.extend_from_slice(&device.to_be_bytes());
        filler(&mut buf, ENC_LEN + WRAPPED_KEY_LEN);
    }
    filler(&mut buf, NONCE_LEN);
    buf.extend_from_slice(&(ciphertext.len() as u32).to_be_bytes());
    buf.extend_from_slice(ciphertext);
    filler(&mut buf, SIG_LEN);
    buf
}

/// A structurally valid envelope, borrowed from its bytes. Parsing does no
/// cryptography and allocates nothing, so servers can afford it on every send.
#[derive(Clone, Copy)]
pub struct Envelope<'a> {
    bytes: &'a [u8],
    sender: i64,
    wraps: &'a [u8],
    nonce: [u8; NONCE_LEN],
    ciphertext: &'a [u8],
    signature: [u8; SIG_LEN],
}

impl<'a> Envelope<'a> {
    /// Checks the layout: version, counts, strictly ascending devices,
    /// lengths, nothing after the signature.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, CryptoError> {
        let mut r = Reader(bytes);
        let [version] = r.array("empty")?;
        if version != VERSION {
            return Err(CryptoError::UnsupportedVersion(version));
        }
        let sender = i64::from_be_bytes(r.array("truncated header")?);
        let n = u16::from_be_bytes(r.array("truncated header")?) as usize;
        if n == 0 || n > MAX_WRAPS {
            return Err(CryptoError::Malformed("wrap count out of range"));
        }
        let wraps = r.take(n * WRAP_LEN, "truncated wraps")?;
        let mut devices = wrap_devices(wraps);
        let mut prev = devices.next();
        for device in devices {
            if prev >= Some(device) {
                return Err(CryptoError::Malformed("devices not strictly ascending"));
            }
            prev = Some(device);
        }
        let nonce = r.array("truncated nonce")?;
        let len = u32::from_be_bytes(r.array("truncated length")?) as usize;
        if !(TAG_LEN..=MAX_CIPHERTEXT).contains(&len) {
            return Err(CryptoError::Malformed("ciphertext length out of range"));
        }
        let ciphertext = r.take(len, "truncated ciphertext")?;
        let signature = r.array("truncated signature")?;
        if !r.0.is_empty() {
            return Err(CryptoError::Malformed("trailing bytes"));
        }
        Ok(Self {
            bytes,
            sender,
            wraps,
            nonce,
            ciphertext,
            signature,
        })
    }

    /// The device that claims to have sent this (proved only by [`Envelope::open`]).
    pub fn sender_device(&self) -> i64 {
        self.sender
    }

    /// The encrypted content (with its tag), opaque until opened.
    pub fn ciphertext(&self) -> &'a [u8] {
        self.ciphertext
    }

    /// Recipient devices, ascending.
    pub fn devices(&self) -> impl Iterator<Item = i64> + 'a {
        wrap_devices(self.wraps)
    }

    /// Verifies the sender's signature, unwraps this device's content key and
    /// decrypts. `conv` and `message_id` must be what the envelope was sealed
    /// for: a replay into another conversation or under another id fails.
    pub fn open(
        &self,
        conv: i64,
        message_id: &str,
        me: i64,
        my_keys: &DeviceKeys,
        sender_sign_key: &[u8; 32],
    ) -> Result<Vec<u8>, CryptoError> {
        // Signature first: nothing below runs on bytes the sender did not sign.
        let signed_len = self.bytes.len() - SIG_LEN;
        let mut signed = Vec::with_capacity(SIGNATURE_LABEL.len() + 73 + signed_len);
        signed.extend_from_slice(SIGNATURE_LABEL);
        put_message_binding(&mut signed, conv, message_id)?;
        let binding_end = signed.len();
        signed.extend_from_slice(&self.bytes[..signed_len]);
        if !verify(sender_sign_key, &signed, &self.signature) {
            return Err(CryptoError::BadSignature);
        }
        let binding = &signed[SIGNATURE_LABEL.len()..binding_end];

        let wrap = self
            .wraps
            .chunks_exact(WRAP_LEN)
            .find(|w| device_of(w) == me)
            .ok_or(CryptoError::NotForThisDevice)?;
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&wrap[8..8 + ENC_LEN])
            .map_err(|_| CryptoError::WrapFailed)?;
        let key = Zeroizing::new(
            hpke::single_shot_open::<WrapAead, WrapKdf, Kem>(
                &OpModeR::Base,
                my_keys.kem_secret(),
                &enc,
                WRAP_INFO,
                &wrap[8 + ENC_LEN..],
                &wrap_aad(binding, me, self.sender),
            )
            .map_err(|_| CryptoError::WrapFailed)?,
        );
        let cipher = Aes256Gcm::new_from_slice(&key).map_err(|_| CryptoError::WrapFailed)?;
        let aad = content_aad(binding, self.sender);
        cipher
            .decrypt(
                &self.nonce.into(),
                Payload {
                    msg: self.ciphertext,
                    aad: &aad,
                },
            )
            .map_err(|_| CryptoError::ContentFailed)
    }
}

impl fmt::Debug for Envelope<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Summary only: an envelope can be 16 MiB.
        f.debug_struct("Envelope")
            .field("sender", &self.sender)
            .field("devices", &self.devices().collect::<Vec<_>>())
            .field("len_ciphertext", &self.ciphertext.len())
            .finish_non_exhaustive()
    }
}

/// `"confab-content-v1" || i64 conv || u8 len(id) || id || i64 sender`
fn content_aad(binding: &[u8], sender: i64) -> Vec<u8> {
    [CONTENT_LABEL, binding, &sender.to_be_bytes()].concat()
}

/// `i64 conv || u8 len(id) || id || i64 recipient || i64 sender`
fn wrap_aad(binding: &[u8], recipient: i64, sender: i64) -> Vec<u8> {
    [binding, &recipient.to_be_bytes(), &sender.to_be_bytes()].concat()
}

fn device_of(wrap: &[u8]) -> i64 {
    i64::from_be_bytes(wrap[..8].try_into().expect("wrap holds a device id"))
}

fn wrap_devices(wraps: &[u8]) -> impl Iterator<Item = i64> + '_ {
    wraps.chunks_exact(WRAP_LEN).map(device_of)
}

/// Cursor over the envelope bytes; each read names what was cut short.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], CryptoError> {
        let (head, rest) = self
            .0
            .split_at_checked(n)
            .ok_or(CryptoError::Malformed(what))?;
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], CryptoError> {
        Ok(self.take(N, what)?.try_into().expect("took N bytes"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::test_keys;
    use hpke::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    const CONV: i64 = -5;
    const ID: &str = "msg-1";
    const SENDER: i64 = 10;

    struct Fixture {
        sender: DeviceKeys,
        devices: Vec<(i64, DeviceKeys)>,
        bytes: Vec<u8>,
    }

    fn fixture() -> Fixture {
        let sender = test_keys(0);
        let devices: Vec<(i64, DeviceKeys)> = [(10, 1), (20, 2), (30, 3)]
            .map(|(d, s)| (d, test_keys(s)))
            .into();
        // Handed to seal out of order on purpose.
        let entries: Vec<DeviceEntry> = devices.iter().rev().map(|(d, k)| k.entry(*d)).collect();
        let ctx = MessageContext {
            conv: CONV,
            message_id: ID,
            sender_device: SENDER,
        };
        let mut rng = ChaCha20Rng::from_seed([9; 32]);
        let bytes = seal(&ctx, &sender, &entries, b"hello", &mut rng).unwrap();
        Fixture {
            sender,
            devices,
            bytes,
        }
    }

    #[test]
    fn a_stand_in_parses_but_opens_for_nobody() {
        let f = fixture();
        let mut counter = 0u8;
        let bytes = stand_in(
            SENDER,
            &[10, 20, 30],
            b"sixteen bytes or more",
            &mut |b: &mut [u8]| {
                for x in b {
                    counter = counter.wrapping_add(1);
                    *x = counter;
                }
            },
        );
        let env = Envelope::parse(&bytes).unwrap();
        assert_eq!(env.sender_device(), SENDER);
        assert_eq!(env.devices().collect::<Vec<_>>(), [10, 20, 30]);
        assert_eq!(env.ciphertext().len(), 21);
        assert_eq!(f.open_as(&bytes, 0), Err(CryptoError::BadSignature));
    }

    impl Fixture {
        fn open_as(&self, bytes: &[u8], i: usize) -> Result<Vec<u8>, CryptoError> {
            let (device, keys) = &self.devices[i];
            Envelope::parse(bytes)?.open(CONV, ID, *device, keys, &self.sender.public().sign)
        }
    }

    #[test]
    fn seal_open_round_trip() {
        let f = fixture();
        let env = Envelope::parse(&f.bytes).unwrap();
        assert_eq!(env.sender_device(), SENDER);
        assert_eq!(env.devices().collect::<Vec<_>>(), [10, 20, 30]);
        assert_eq!(env.ciphertext().len(), 5 + 16);
        let debug = format!("{env:?}");
        assert!(
            debug.contains("devices: [10, 20, 30]") && debug.len() < 200,
            "{debug}"
        );
        for i in 0..3 {
            assert_eq!(f.open_as(&f.bytes, i).unwrap(), b"hello");
        }
        // The seal is reproducible from the RNG alone.
        assert_eq!(fixture().bytes, f.bytes);
    }

    #[test]
    fn tampering_is_caught() {
        let f = fixture();
        let sig_start = f.bytes.len() - SIG_LEN;
        // Last ciphertext byte, a byte of the first wrap, a signature byte.
        for at in [sig_start - 1, 11 + 8 + 40, sig_start + 3] {
            let mut bad = f.bytes.clone();
            bad[at] ^= 1;
            assert_eq!(
                f.open_as(&bad, 0),
                Err(CryptoError::BadSignature),
                "byte {at}"
            );
        }
        // A sender that signs damaged parts gets past the signature, not further.
        for (at, err) in [
            (11 + 8, CryptoError::WrapFailed),
            (sig_start - 1, CryptoError::ContentFailed),
        ] {
            let mut bad = f.bytes.clone();
            bad[at] ^= 1;
            let mut signed = SIGNATURE_LABEL.to_vec();
            put_message_binding(&mut signed, CONV, ID).unwrap();
            signed.extend_from_slice(&bad[..sig_start]);
            bad[sig_start..].copy_from_slice(&f.sender.sign(&signed));
            assert_eq!(f.open_as(&bad, 0), Err(err));
        }
    }

    #[test]
    fn wrong_key_context_or_device_is_rejected() {
        let f = fixture();
        let env = Envelope::parse(&f.bytes).unwrap();
        let (device, keys) = &f.devices[1];
        let sign = f.sender.public().sign;
        let stranger = test_keys(7);
        let cases = [
            (
                CONV,
                ID,
                *device,
                keys,
                &stranger.public().sign,
                CryptoError::BadSignature,
            ),
            (
                CONV + 1,
                ID,
                *device,
                keys,
                &sign,
                CryptoError::BadSignature,
            ),
            (
                CONV,
                "msg-2",
                *device,
                keys,
                &sign,
                CryptoError::BadSignature,
            ),
            (CONV, "", *device, keys, &sign, CryptoError::BadMessageId),
            (
                CONV,
                ID,
                11,
                &stranger,
                &sign,
                CryptoError::NotForThisDevice,
            ),
            // Device 10's wrap opened with device 20's keys.
            (CONV, ID, 10, keys, &sign, CryptoError::WrapFailed),
        ];
        for (conv, id, me, my_keys, sender_key, want) in cases {
            assert_eq!(env.open(conv, id, me, my_keys, sender_key), Err(want));
        }
        assert_eq!(env.open(CONV, ID, *device, keys, &sign).unwrap(), b"hello");
    }

    #[test]
    fn parse_rejects_bad_structure() {
        let f = fixture();
        for len in 0..f.bytes.len() {
            assert!(
                matches!(
                    Envelope::parse(&f.bytes[..len]),
                    Err(CryptoError::Malformed(_))
                ),
                "prefix of {len} bytes parsed"
            );
        }
        let mut long = f.bytes.clone();
        long.push(0);
        assert_eq!(
            Envelope::parse(&long).unwrap_err(),
            CryptoError::Malformed("trailing bytes")
        );

        let mut v2 = f.bytes.clone();
        v2[0] = 2;
        assert_eq!(
            Envelope::parse(&v2).unwrap_err(),
            CryptoError::UnsupportedVersion(2)
        );

        let first = 11;
        let second = first + WRAP_LEN;
        let mut dup = f.bytes.clone();
        dup.copy_within(first..first + 8, second);
        let mut unsorted = f.bytes.clone();
        unsorted[second..second + 8].copy_from_slice(&5i64.to_be_bytes());
        let mut zero = f.bytes.clone();
        zero[9..11].copy_from_slice(&[0, 0]);
        for bad in [dup, unsorted, zero] {
            assert!(matches!(
                Envelope::parse(&bad),
                Err(CryptoError::Malformed(_))
            ));
        }
    }

    #[test]
    fn seal_rejects_bad_input() {
        let keys = test_keys(1);
        let me = keys.entry(1);
        let mut rng = ChaCha20Rng::from_seed([0; 32]);
        let mut try_seal = |id: &str, recipients: &[DeviceEntry]| {
            let ctx = MessageContext {
                conv: 1,
                message_id: id,
                sender_device: 1,
            };
            seal(&ctx, &keys, recipients, b"x", &mut rng).unwrap_err()
        };
        let one = std::slice::from_ref(&me);
        assert_eq!(try_seal("", one), CryptoError::BadMessageId);
        assert_eq!(try_seal(&"a".repeat(65), one), CryptoError::BadMessageId);
        assert_eq!(try_seal("é", one), CryptoError::BadMessageId);
        assert!(matches!(try_seal("a", &[]), CryptoError::BadRecipients(_)));
        assert!(matches!(
            try_seal("a", &[me.clone(), me]),
            CryptoError::BadRecipients(_)
        ));
    }
}
