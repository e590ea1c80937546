#!/usr/bin/env bash
# The test command from the README: everything the tests need, then the tests.
#
# The tests start real `confab serve` processes on ephemeral ports with
# temporary data directories. Besides Rust they need python3 with venv and
# PyPI access: crates/crypto/tests/interop.rs checks confab's envelope format
# against an independent implementation (pyhpke, cryptography) installed into
# a venv under target/. The PostgreSQL store's tests and the end-to-end
# scenarios on PostgreSQL start private servers of their own (initdb in a
# temp dir, a random loopback port: crates/testpg), and tests needing Redis
# likewise (crates/testredis); they need the server binaries, installed here
# if missing.
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

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ -z "${CONFAB_PG_BIN:-}" ]; then
    if command -v apt-get >/dev/null 2>&1; then
        apt-get update -q >/dev/null
        apt-get install -y -q postgresql >/dev/null
    else
        echo "PostgreSQL server binaries are needed (or set CONFAB_PG_BIN)" >&2
        exit 1
    fi
fi

if ! command -v redis-server >/dev/null 2>&1 && [ -z "${CONFAB_REDIS_BIN:-}" ]; then
    if command -v apt-get >/dev/null 2>&1; then
        apt-get update -q >/dev/null
        # Brings redis-tools, and with it redis-cli.
        apt-get install -y -q redis-server >/dev/null
    else
        echo "redis-server and redis-cli are needed (or set CONFAB_REDIS_BIN)" >&2
        exit 1
    fi
fi

cargo test --workspace --all-targets --locked "$@"
# The end-to-end scenarios again, every server on PostgreSQL.
CONFAB_TEST_STORE=postgres cargo test --locked --test e2e "$@"
