#!/usr/bin/env bash
# Installs the npm packages of the example services and test fixtures, as
# their authors would (`npm ci`: exactly what package-lock.json pins, no
# install scripts). provis bundles from node_modules at pack time; minions
# never run npm. Installs Debian's nodejs and npm first when npm is missing.
# Idempotent: a folder whose node_modules is newer than its lockfile is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v npm >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

for lock in examples/services/*/package-lock.json tests/fixtures/*/package-lock.json; do
  [ -f "$lock" ] || continue
  dir=$(dirname "$lock")
  if [ -d "$dir/node_modules" ] && [ "$dir/node_modules" -nt "$lock" ]; then
    continue
  fi
  echo "npm ci in $dir"
  (cd "$dir" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
done
