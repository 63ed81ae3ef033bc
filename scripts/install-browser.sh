#!/usr/bin/env bash
# Installs the browser the dashboard's tests drive: Debian's chromium (the
# tests launch it through Playwright for Python, with its executable path,
# since Playwright's own browser download is not used). Idempotent.
set -euo pipefail

if command -v chromium >/dev/null 2>&1; then
  echo "chromium: $(chromium --version 2>/dev/null | head -1)"; exit 0
fi
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends chromium >/dev/null
echo "chromium: installed $(chromium --version 2>/dev/null | head -1)"
