"""Decrypts an age file with pyrage (bindings to rage, an age implementation
independent of the `age` crate confab uses) and writes the plaintext.
Run by tests/e2e/files.rs.

usage: age_decrypt.py IDENTITY ENCRYPTED_FILE OUTPUT_FILE
"""
import sys

import pyrage


def main():
    identity = pyrage.x25519.Identity.from_str(sys.argv[1])
    with open(sys.argv[2], "rb") as f:
        encrypted = f.read()
    with open(sys.argv[3], "wb") as f:
        f.write(pyrage.decrypt(encrypted, [identity]))


if __name__ == "__main__":
    main()
