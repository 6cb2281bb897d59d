#!/usr/bin/env bash
# New TCP connections per second through egret with many allow rules
# (issue 22.4), from namespace A to a server in namespace B (veth pair,
# 10.1.0.1 -> 10.1.0.2:5201), the same namespaces and connect/close client
# as bench/conn_rate.sh. Every setup's matching rule is
#   cidrs = ["10.1.0.0/24"], ports = [5201], users = [0]   (the client runs as root)
# and comes last; the other rules are each a random /24, a port and a user:
#   none        no ruleset at all
#   one         the matching rule alone
#   rules-300   299 other rules + the matching rule (dispatched by destination)
#   rules-1000  999 other rules + the matching rule (dispatched by destination)
#   linear-300  rules-300 with an any-destination rule (another user) after
#               every 7th, so no run of CIDR rules reaches the dispatch
#               threshold: the linear walk egret did before (343 rules)
#   same-300    300 rules all for 10.1.0.0/24, each another user: the map
#               cannot tell them apart (dispatch's worst case)
#   same-linear-300  the same, walked linearly (as linear-300 is built)
# Interleaved rounds; median of ROUNDS (default 3) runs of DURATION seconds (default 5).
# Runs in namespaces it creates and deletes; traffic only between them.
#
#   sudo bash bench/rules.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
ROUNDS=${ROUNDS:-3} SECONDS_PER_RUN=${DURATION:-5} THREADS=${THREADS:-2}
SETUPS=${SETUPS:-"none one rules-300 rules-1000 linear-300 same-300 same-linear-300"}
command -v nft >/dev/null || apt-get install -y -qq nftables >/dev/null
# EGRET and CONN_RATE name prebuilt binaries (egret only loads the rules:
# the kernel does the work measured here).
T=${CARGO_TARGET_DIR:-target}/release
E=${EGRET:-$PWD/$T/egret} LOAD=${CONN_RATE:-$PWD/$T/examples/conn_rate}
[ -n "${EGRET:-}" ] && [ -n "${CONN_RATE:-}" ] || cargo build --release -q --bin egret --example conn_rate
. "$(dirname "$0")/lib/conn_lab.sh"
conn_lab rl

python3 - "$TMP" <<'PY'
import random, sys
random.seed(22)
nets = set()
while len(nets) < 1000:
    a, b, c = random.randrange(11, 223), random.randrange(256), random.randrange(256)
    if a != 127:
        nets.add(f"{a}.{b}.{c}.0/24")
nets = sorted(nets)
def rule(name, cidr, port, user):
    return f'[[allow]]\nname = "{name}"\ncidrs = ["{cidr}"]\nprotocol = "tcp"\nports = [{port}]\nusers = [{user}]\n\n'
match = rule("match", "10.1.0.0/24", 5201, 0)
def others(n):
    return [rule(f"r{i}", nets[i], 1024 + i, 1000 + i) for i in range(n)]
def write(name, rules):
    with open(f"{sys.argv[1]}/{name}.toml", "w") as f:
        f.write('mode = "enforce"\n\n' + "".join(rules))
write("one", [match])
write("rules-300", others(299) + [match])
write("rules-1000", others(999) + [match])
linear = []
for i, r in enumerate(others(299)):
    linear.append(r)
    if i % 7 == 6:
        linear.append(f'[[allow]]\nname = "any{i}"\nprotocol = "tcp"\nports = [{1024 + i}]\nusers = [{5000 + i}]\n\n')
write("linear-300", linear + [match])
same = [rule(f"s{i}", "10.1.0.0/24", 5201, 1000 + i) for i in range(299)]
write("same-300", same + [match])
same_linear = []
for i, r in enumerate(same):
    same_linear.append(r)
    if i % 7 == 6:
        same_linear.append(f'[[allow]]\nname = "any{i}"\nprotocol = "tcp"\nports = [{1024 + i}]\nusers = [{5000 + i}]\n\n')
write("same-linear-300", same_linear + [match])
PY

load() {
  case $1 in
    none) ;;
    *) in_a "$E" apply "$TMP/$1.toml" --state-dir "$TMP/state" >/dev/null ;;
  esac
}
unload() { in_a nft flush ruleset; }
measure() { in_a "$LOAD" client 10.1.0.2:5201 "$SECONDS_PER_RUN" "$THREADS" | tee -a "$TMP/client.log" | awk '{print $1}'; }

for r in $(seq "$ROUNDS"); do
  for s in $SETUPS; do
    load "$s"; rate=$(measure); unload
    echo "$s $rate" | tee -a "$TMP/results"
  done
done
median() { grep "^$1 " "$TMP/results" | awk '{print $2}' | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
one=$(median one) none=$(median none)
printf '\n%-15s %10s %8s %16s\n' setup conn/s vs_one "added µs/conn"
for s in $SETUPS; do
  m=$(median "$s")
  printf '%-15s %10s %8s %16s\n' "$s" "$m" \
    "$(awk -v a="$m" -v b="$one" 'BEGIN{printf "%.2f", a/b}')" \
    "$(awk -v a="$m" -v n="$none" 'BEGIN{printf "%.1f", 1e6/a - 1e6/n}')"
done
awk -v a="$(median rules-300)" -v b="$(median rules-1000)" -v o="$one" \
  'BEGIN{printf "\nrules-300 / one = %.2f (goal >= 0.9)\nrules-1000 / one = %.2f (goal >= 0.8)\n", a/o, b/o}'
