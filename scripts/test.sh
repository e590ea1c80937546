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
# likewise (crates/testredis), the blob tests an S3-compatible server
# (crates/tests3) and the load-balancer tests HAProxy (crates/testhaproxy);
# they need the server binaries, installed here if missing.
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

# install PACKAGE WHAT: the Debian package, or a clear stop without apt.
install() {
    if command -v apt-get >/dev/null 2>&1; then
        apt-get update -q >/dev/null
        apt-get install -y -q "$1" >/dev/null
    else
        echo "$2 are needed" >&2
        exit 1
    fi
}

if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ -z "${CONFAB_PG_BIN:-}" ]; then
    install postgresql "PostgreSQL server binaries (or set CONFAB_PG_BIN)"
fi
if ! command -v redis-server >/dev/null 2>&1 && [ -z "${CONFAB_REDIS_BIN:-}" ]; then
    # Brings redis-tools, and with it redis-cli.
    install redis-server "redis-server and redis-cli (or set CONFAB_REDIS_BIN)"
fi
if [ ! -x /usr/sbin/haproxy ] && ! command -v haproxy >/dev/null 2>&1 && [ -z "${CONFAB_HAPROXY_BIN:-}" ]; then
    install haproxy "HAProxy's binaries (or set CONFAB_HAPROXY_BIN)"
fi

# s3s-fs, the S3-compatible server the blob tests start (crates/tests3),
# built once (about 4 minutes) into a cache outside the clone, so that a
# fresh clone does not build it again. From /, so that no project's cargo
# settings apply to it.
s3s_root="${XDG_CACHE_HOME:-$HOME/.cache}/confab/s3s-fs-0.14.1"
if [ -z "${CONFAB_S3S_BIN:-}" ] && [ ! -x "$s3s_root/bin/s3s-fs" ]; then
    (cd / && env -u CARGO_TARGET_DIR cargo install -q s3s-fs@0.14.1 \
        --features binary --locked --root "$s3s_root")
fi

cargo test --workspace --all-targets --locked "$@"
# The end-to-end scenarios again, every server on PostgreSQL and with its
# files in S3-compatible storage (a private s3s-fs).
CONFAB_TEST_STORE=postgres CONFAB_TEST_BLOBS=s3 cargo test --locked --test e2e "$@"
