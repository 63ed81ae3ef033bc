#!/usr/bin/env bash
# Sets up and passes the tests on a fresh machine: installs nats-server, the
# Python NATS client and Playwright (outside tools in the tests), Debian's
# chromium (the dashboard's browser tests) and the npm packages of the
# example services and test fixtures (`npm ci`) when needed, then
# formatting, lints, and every test (unit and end-to-end, each end-to-end
# test starting its own nats-server on a random loopback port).
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-nats-server.sh
./scripts/install-python-clients.sh
./scripts/install-browser.sh
./scripts/install-npm-packages.sh
cargo fmt --all -- --check
cargo clippy --locked --all-targets -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --workspace --no-fail-fast
else
  cargo test --locked --workspace --no-fail-fast
fi
