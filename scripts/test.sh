#!/usr/bin/env bash
# The test command from the README: everything the tests need, then the tests.
#
# The tests start real `confab serve` processes on ephemeral ports with
# temporary data directories. Besides Rust they need python3 with venv and
# PyPI access: crates/crypto/tests/interop.rs checks confab's envelope format
# against an independent implementation (pyhpke, cryptography) installed into
# a venv under target/. When PostgreSQL and Redis tests land, this script is
# where private instances get installed/started.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust from https://rustup.rs" >&2
    exit 1
fi

if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    # Debian splits venv and pip out of python3.
    if command -v apt-get >/dev/null 2>&1; then
        apt-get install -y -q python3-venv >/dev/null
    else
        echo "python3 with venv is needed for the interop test" >&2
        exit 1
    fi
fi

cargo test --workspace --all-targets --locked "$@"
