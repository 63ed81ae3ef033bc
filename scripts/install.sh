#!/usr/bin/env bash
# Installs provis under a prefix: provis and provis-minion, shell completions
# (bash, zsh, fish) and a man page for every command.
#
#   scripts/install.sh [--prefix DIR] [--from DIR]
#
# --prefix  where to install [default: /usr/local]: DIR/bin, DIR/share/man/man1,
#           DIR/share/bash-completion/completions, DIR/share/zsh/site-functions,
#           DIR/share/fish/vendor_completions.d
# --from    take the binaries from DIR instead of building them (cargo build --release)
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=/usr/local
from=
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix="$2"; shift 2 ;;
    --from) from="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

if [ -z "$from" ]; then
  cargo build --locked --release --bin provis --bin provis-minion
  from="${CARGO_TARGET_DIR:-$PWD/target}/release"
fi

install -d "$prefix/bin" "$prefix/share/man/man1" \
  "$prefix/share/bash-completion/completions" \
  "$prefix/share/zsh/site-functions" \
  "$prefix/share/fish/vendor_completions.d"
install -m 0755 "$from/provis" "$from/provis-minion" "$prefix/bin/"
provis="$prefix/bin/provis"
"$provis" completions bash >"$prefix/share/bash-completion/completions/provis"
"$provis" completions zsh >"$prefix/share/zsh/site-functions/_provis"
"$provis" completions fish >"$prefix/share/fish/vendor_completions.d/provis.fish"
"$provis" man --dir "$prefix/share/man/man1"

echo "installed provis $("$provis" --version | cut -d' ' -f2) under $prefix"
case ":${MANPATH:-}:$(manpath 2>/dev/null || true):" in
  *":$prefix/share/man:"*) ;;
  *) echo "man pages: add $prefix/share/man to MANPATH if \`man provis-call\` does not find them" ;;
esac
