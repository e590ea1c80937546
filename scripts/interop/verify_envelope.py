#!/usr/bin/env python3
"""Independent check of confab's end-to-end encryption formats.

Reads confab's test vector (crates/crypto/tests/vectors/envelope-v1.json) and,
working only from the byte layouts in docs/encryption.md ("Format (v1)"), with
pyhpke and cryptography and no code from the Rust crate:

  * derives every device's public keys and fingerprint from its secret;
  * parses the envelope, verifies the sender's Ed25519 signature, opens every
    recipient's HPKE key wrap and decrypts the content;
  * checks that tampering or a wrong conversation or message id is caught;
  * verifies the signed device lists and recomputes the safety number;
  * seals a fresh envelope of its own and prints it as one JSON line on stdout
    ({"conv", "message_id", "plaintext", "envelope"}) for the Rust side to open.

Usage: verify_envelope.py VECTOR.json    (exit status 0 only if all checks pass)
"""

import base64
import hashlib
import json
import os
import struct
import sys

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pyhpke import AEADId, CipherSuite, KDFId, KEMId

# HPKE Base mode, DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 / AES-256-GCM.
SUITE = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES256_GCM)
WRAP_INFO = b"confab-wrap-v1"
CONTENT_LABEL = b"confab-content-v1"
SIGNATURE_LABEL = b"confab-msg-v1"
MAX_CIPHERTEXT = 16 * 1024 * 1024


def check(ok, what):
    if not ok:
        sys.exit(f"FAIL: {what}")
    print(f"ok: {what}", file=sys.stderr)


def unb64(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def i64(n):
    return struct.pack(">q", n)


def binding(conv, message_id):
    raw = message_id.encode("ascii")
    assert 1 <= len(raw) <= 64
    return i64(conv) + bytes([len(raw)]) + raw


def parse(env):
    """Splits an envelope per the v1 layout; raises ValueError if malformed."""
    pos = 0

    def take(n):
        nonlocal pos
        if pos + n > len(env):
            raise ValueError("truncated")
        pos += n
        return env[pos - n : pos]

    if take(1) != b"\x01":
        raise ValueError("version")
    (sender,) = struct.unpack(">q", take(8))
    (n,) = struct.unpack(">H", take(2))
    if not 1 <= n <= 1024:
        raise ValueError("wrap count")
    wraps = {}
    last = None
    for _ in range(n):
        (device,) = struct.unpack(">q", take(8))
        if last is not None and device <= last:
            raise ValueError("devices not ascending")
        last = device
        wraps[device] = (take(32), take(48))
    nonce = take(12)
    (length,) = struct.unpack(">I", take(4))
    if not 16 <= length <= MAX_CIPHERTEXT:
        raise ValueError("ciphertext length")
    ciphertext = take(length)
    signed = env[:pos]
    signature = take(64)
    if pos != len(env):
        raise ValueError("trailing bytes")
    return {"sender": sender, "wraps": wraps, "nonce": nonce, "ciphertext": ciphertext,
            "signed": signed, "signature": signature}


def open_envelope(env, conv, message_id, me, kem_secret, sender_sign):
    e = parse(env)
    b = binding(conv, message_id)
    Ed25519PublicKey.from_public_bytes(sender_sign).verify(e["signature"], SIGNATURE_LABEL + b + e["signed"])
    enc, wrapped = e["wraps"][me]
    ctx = SUITE.create_recipient_context(enc, SUITE.kem.deserialize_private_key(kem_secret), info=WRAP_INFO)
    key = ctx.open(wrapped, aad=b + i64(me) + i64(e["sender"]))
    return AESGCM(key).decrypt(e["nonce"], e["ciphertext"], CONTENT_LABEL + b + i64(e["sender"]))


def seal_envelope(conv, message_id, sender_device, sign_seed, recipients, plaintext):
    """recipients: {device id: X25519 public key}."""
    b = binding(conv, message_id)
    key, nonce = os.urandom(32), os.urandom(12)
    out = bytes([1]) + i64(sender_device) + struct.pack(">H", len(recipients))
    for device in sorted(recipients):
        enc, ctx = SUITE.create_sender_context(SUITE.kem.deserialize_public_key(recipients[device]), info=WRAP_INFO)
        out += i64(device) + enc + ctx.seal(key, aad=b + i64(device) + i64(sender_device))
    ciphertext = AESGCM(key).encrypt(nonce, plaintext, CONTENT_LABEL + b + i64(sender_device))
    out += nonce + struct.pack(">I", len(ciphertext)) + ciphertext
    return out + Ed25519PrivateKey.from_private_bytes(sign_seed).sign(SIGNATURE_LABEL + b + out)


def fingerprint(sign, kem):
    h = hashlib.sha256(b"confab-device-v1" + sign + kem).hexdigest()[:20]
    return " ".join(h[i : i + 4] for i in range(0, 20, 4))


def device_list_bytes(lst):
    user = lst["user"].encode()
    out = b"confab-devices-v1" + bytes([len(user)]) + user
    out += struct.pack(">QI", lst["epoch"], len(lst["devices"]))
    for d in lst["devices"]:
        out += i64(d["device"]) + unb64(d["sign"]) + unb64(d["kem"])
    return out


def safety_digits(lst):
    user = lst["user"].encode()
    data = b"confab-safety-v1" + bytes([len(user)]) + user
    for d in lst["devices"]:
        data += i64(d["device"]) + unb64(d["sign"]) + unb64(d["kem"])
    fp = hashlib.sha512(data).digest()
    return "".join("%05d" % (int.from_bytes(fp[i : i + 5], "big") % 100000) for i in range(0, 30, 5))


def safety_number(a, b):
    halves = sorted([(a["user"].encode(), safety_digits(a)), (b["user"].encode(), safety_digits(b))])
    digits = halves[0][1] + halves[1][1]
    return " ".join(digits[i : i + 5] for i in range(0, 60, 5))


def rejects(fn):
    try:
        fn()
    except (InvalidSignature, InvalidTag, ValueError, KeyError):
        return True
    return False


def main(path):
    with open(path, encoding="utf-8") as f:
        v = json.load(f)

    devices = {}
    for d in [v["sender"]] + v["recipients"]:
        secret = bytes.fromhex(d["secret"])
        sign = Ed25519PrivateKey.from_private_bytes(secret[:32]).public_key().public_bytes_raw()
        kem = X25519PrivateKey.from_private_bytes(secret[32:]).public_key().public_bytes_raw()
        check(sign == unb64(d["sign"]) and kem == unb64(d["kem"]), f"device {d['device']}: public keys from secret")
        check(fingerprint(sign, kem) == d["fingerprint"], f"device {d['device']}: fingerprint")
        devices[d["device"]] = {"seed": secret[:32], "kem_secret": secret[32:], "sign": sign, "kem": kem}

    env = bytes.fromhex(v["envelope"])
    conv, mid, sender = v["conv"], v["message_id"], v["sender"]["device"]
    plaintext = v["plaintext"].encode("utf-8")
    parsed = parse(env)
    check(parsed["sender"] == sender, "envelope sender device")
    check(list(parsed["wraps"]) == sorted(d["device"] for d in v["recipients"]), "envelope recipient devices")
    for d in v["recipients"]:
        me = d["device"]
        got = open_envelope(env, conv, mid, me, devices[me]["kem_secret"], devices[sender]["sign"])
        check(got == plaintext and "text" in json.loads(got), f"open as device {me}")

    me, sk, sign = v["recipients"][0]["device"], devices[v["recipients"][0]["device"]]["kem_secret"], devices[sender]["sign"]
    flipped = bytearray(env)
    flipped[len(env) - 65] ^= 1
    check(rejects(lambda: open_envelope(bytes(flipped), conv, mid, me, sk, sign)), "tampered ciphertext rejected")
    check(rejects(lambda: open_envelope(env, conv + 1, mid, me, sk, sign)), "other conversation rejected")
    check(rejects(lambda: open_envelope(env, conv, mid + "x", me, sk, sign)), "other message id rejected")
    check(rejects(lambda: parse(env + b"\x00")), "trailing byte rejected")
    check(rejects(lambda: parse(env[:-1])), "truncation rejected")

    lists = v["device_lists"]
    for lst in lists:
        ids = [d["device"] for d in lst["devices"]]
        check(ids == sorted(set(ids)), f"{lst['user']}: devices strictly ascending")
        signer = next(d for d in lst["devices"] if d["device"] == lst["signer"])
        key = Ed25519PublicKey.from_public_bytes(unb64(signer["sign"]))
        signature, signed = unb64(lst["signature"]), device_list_bytes(lst)
        check(not rejects(lambda: key.verify(signature, signed)), f"{lst['user']}: device list signature")
        check(rejects(lambda: key.verify(signature, signed[:-1] + bytes([signed[-1] ^ 1]))), f"{lst['user']}: altered list rejected")
    check(safety_number(lists[0], lists[1]) == v["safety_number"], "safety number")
    check(safety_number(lists[1], lists[0]) == v["safety_number"], "safety number is symmetric")

    # Two-way: an envelope sealed here, with an extra content field that v1
    # readers must ignore.
    py_mid = "sealed-by-python"
    py_plain = json.dumps({"text": "Hello from Python", "later": {"files": []}}).encode()
    recipients = {d["device"]: devices[d["device"]]["kem"] for d in v["recipients"]}
    py_env = seal_envelope(conv, py_mid, sender, devices[sender]["seed"], recipients, py_plain)
    for me in recipients:
        got = open_envelope(py_env, conv, py_mid, me, devices[me]["kem_secret"], devices[sender]["sign"])
        check(got == py_plain, f"own envelope opens as device {me}")
    print(json.dumps({"conv": conv, "message_id": py_mid, "plaintext": py_plain.decode(), "envelope": py_env.hex()}))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
