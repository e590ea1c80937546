#!/usr/bin/env bash
# The test command from the README: everything the tests need, then the tests.
#
# Today the tests need only Rust: they start real `confab serve` processes on
# ephemeral ports with temporary data directories. When PostgreSQL and Redis
# tests land, this script is where private instances get installed/started.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust from https://rustup.rs" >&2
    exit 1
fi

cargo test --workspace --all-targets --locked "$@"
