#!/usr/bin/env bash
# Sets up and runs the demo on a fresh machine: builds provis, installs
# nats-server when needed, starts a local fleet with `provis up` (nats-server,
# a master, three minions with roles from examples/), and fans calls out to it
# (one of them to `release`, a TypeScript service using an npm package).
# The fleet keeps running for you to try more calls from another shell; Ctrl-C
# stops it. With --once the demo stops the fleet after the calls.
set -euo pipefail
cd "$(dirname "$0")/.."

once=false
[ "${1:-}" = "--once" ] && once=true

./scripts/install-nats-server.sh
# The example services' npm packages (the TypeScript `release` uses semver).
./scripts/install-npm-packages.sh
# provis-minion too: `provis up` runs minions as the lighter executable beside it.
cargo build --locked --bin provis --bin provis-minion
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
export PATH="$target_dir/debug:$PATH"

log=$(mktemp -t provis-up.XXXXXX)
provis up --minions 3 >"$log" 2>&1 &
up=$!
trap 'kill -TERM $up 2>/dev/null; wait $up 2>/dev/null || true' EXIT

# `provis up` prints "fleet is up" once every minion is in the registry.
for _ in $(seq 1 300); do
  grep -q "fleet is up" "$log" && break
  kill -0 $up 2>/dev/null || { cat "$log"; echo "provis up failed" >&2; exit 1; }
  sleep 0.1
done
cat "$log"

run() { echo; echo "\$ $*"; "$@"; }
run provis minions
run provis keys pending --all
run provis call --subject role.web sys.ping
run provis call --all sys.facts
run provis service list
run provis call --subject role.web site.enable '{"by": "demo"}'
# examples/reactions.toml: each site.enabled event makes the leading master
# check that minion's health (jobs by reaction:health-after-enable, below).
run provis call --subject role.web.eu greet.hello '{"name": "operators"}'
run provis call --all health.check
run provis call --minion m2 site.status
run provis call --subject role.web release.satisfies '{"range": ">=0.1"}'
run provis call --all --batch 1 --batch-wait 1s sys.ping
# Schedules and reactions come from examples/schedules.toml and reactions.toml.
run provis schedule list
run provis schedule run-now web-health

# Changing the fleet is a commit to the repository the master follows.
config="$PWD/.provis/up/config"
# A secret for web.eu only: sealed to each member minion's key (nothing else
# can open it), granted to greet, committed with the greeting's change.
echo; echo "\$ echo -n TOKEN | provis secret seal --role web.eu greeting_token --repository $config"
printf 'demo-token-%s' "$(date +%s%N)" |
  provis secret seal --role web.eu greeting_token --repository "$config"
grep -q greeting_token "$config/services/greet/service.toml" ||
  printf '\n[capabilities]\nsecrets = ["greeting_token"]\n' >>"$config/services/greet/service.toml"
echo; echo "\$ (in $config) change web.eu's greeting, grant greet the secret, and commit"
sed -i "s/^greeting = .*/greeting = \"servus um $(date +%H:%M:%S)\"/" "$config/roles/web.eu.toml"
git -C "$config" add --all
git -C "$config" -c user.name="provis demo" -c user.email=demo@provis.invalid \
  commit -qm "web.eu: greet as in Vienna, with a sealed token"
echo; echo "\$ provis plan"
provis plan || [ $? -eq 2 ]   # 2: the revision would change something
run provis master sync
for _ in $(seq 1 120); do
  provis rollout status | grep -q ": done" && break
  sleep 0.5
done
run provis rollout status
run provis status
run provis call --subject role.web.eu greet.hello '{"name": "operators"}'
run provis call --subject role.web.eu greet.token   # its length; the value itself is redacted
run provis jobs --since 10m   # schedule:web-health and reaction:health-after-enable among them

if $once; then
  echo; echo "demo done; stopping the fleet"
  exit 0
fi
echo
echo "the fleet keeps running: try 'provis call --subject role.web.eu sys.ping' from another shell"
echo "(with $target_dir/debug on PATH); Ctrl-C stops it"
trap - EXIT
wait $up
