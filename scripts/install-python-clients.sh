#!/usr/bin/env bash
# Installs the Python NATS client (nats-py with its nkeys extra, from PyPI) that the test suite
# uses as an outside tool would, into .provis/python (the tests put it on
# PYTHONPATH). Idempotent: a second run changes nothing.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target="$root/.provis/python"
version="${PROVIS_NATS_PY_VERSION:-2.16.0}"

if PYTHONPATH="$target" python3 -c "import importlib.metadata as m, sys, nkeys; sys.exit(0 if m.version('nats-py') == '$version' else 1)" 2>/dev/null; then
  echo "nats-py: $version in $target"; exit 0
fi
rm -rf "$target"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-warn-script-location \
  --target "$target" "nats-py[nkeys]==$version"
echo "nats-py: installed $version into $target"
