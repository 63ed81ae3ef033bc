#!/usr/bin/env bash
# Installs the Python clients the test suite uses as outside tools would:
# the NATS client (nats-py with its nkeys extra) and Playwright (which drives
# Debian's chromium for the dashboard's tests), from PyPI, into
# .provis/python (the tests put it on PYTHONPATH). Idempotent: a second run
# changes nothing.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
target="$root/.provis/python"
version="${PROVIS_NATS_PY_VERSION:-2.16.0}"
playwright="${PROVIS_PLAYWRIGHT_VERSION:-1.65.2}"

if PYTHONPATH="$target" python3 -c "import importlib.metadata as m, sys, nkeys; sys.exit(0 if (m.version('nats-py'), m.version('playwright')) == ('$version', '$playwright') else 1)" 2>/dev/null; then
  echo "nats-py $version, playwright $playwright: in $target"; exit 0
fi
rm -rf "$target"
python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-warn-script-location \
  --target "$target" "nats-py[nkeys]==$version" "playwright==$playwright"
echo "nats-py $version, playwright $playwright: installed into $target"
