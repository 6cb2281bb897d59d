#!/usr/bin/env bash
# What [novelty] (first-seen allowed flows, issue 20) costs. bench/conn_rate.sh's
# setup: namespaces A (10.1.0.1) and B (10.1.0.2:5201) joined by a veth pair,
# the firewall in A's output path, 100,000 allowed entries (the server last).
#   1. new TCP connections per second with novelty off and on: two such labs
#      side by side, one loaded with each ruleset, measured in turn in short
#      interleaved slices (ROUNDS pairs of DURATION seconds, the order
#      alternating), so drift in the machine's speed falls on both alike;
#      halfway the labs swap rulesets, so neither lab's own speed favours a
#      side: goal on/off >= 0.97, by the median of the pairs' ratios (and of
#      each side's rates). A=A (both off) measures the method's own bias;
#   2. messages from the kernel while those connections run (all to one
#      destination, so after the first the kernel's set filters them): the
#      first-seen log rules' counters before and after, per second: goal ~0;
#   3. daemon CPU per 1,000 first-seen flows: `egret run` in A, NEW distinct
#      (port) flows as one UDP client, the daemon's utime+stime before and
#      after (from /proc), per 1,000.
# Runs in namespaces it creates and deletes; traffic only between them.
#
#   sudo bash bench/novelty.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
command -v conntrack >/dev/null || apt-get install -y -qq conntrack >/dev/null
ROUNDS=${ROUNDS:-40} SECONDS_PER_RUN=${DURATION:-2} THREADS=${THREADS:-2} NEW=${NEW:-10000}
# EGRET and CONN_RATE name prebuilt binaries (a debug egret only changes (3)).
T=${CARGO_TARGET_DIR:-target}/release
E=${EGRET:-$PWD/$T/egret} LOAD=${CONN_RATE:-$PWD/$T/examples/conn_rate}
[ -n "${EGRET:-}" ] && [ -n "${CONN_RATE:-}" ] || cargo build --release -q --bin egret --example conn_rate
. "$(dirname "$0")/lib/conn_lab.sh"
conn_lab nv-1
LAB_1=$A
conn_lab nv-2 # A and B stay this lab's: (3) runs in it
LAB_2=$A
in_lab() { local ns=$1; shift; nsenter --net=/run/netns/"$ns" -- "$@"; }

python3 - "$TMP" <<'PY'
import random, sys
random.seed(7)
nets = set()
while len(nets) < 100000 - 1:
    a, b, c = random.randrange(11, 223), random.randrange(256), random.randrange(256)
    if a == 127:
        continue
    nets.add(f"{a}.{b}.{c}.0/24" if len(nets) % 2 else f"{a}.{b}.{c}.{random.randrange(1, 255)}")
nets = sorted(nets)
cidrs = 'cidrs = [\n' + ",\n".join(f'"{x}"' for x in nets + ["10.1.0.2"]) + "\n]\n"
rule = '[[allow]]\nname = "bulk"\nprotocol = "tcp"\nports = [5201]\n' + cidrs
udp = '[[allow]]\nname = "udp"\nprotocol = "udp"\nports = ["20000-60000"]\ncidrs = ["10.1.0.2"]\n'
for name, novelty in (("off", "[novelty]\nenabled = false\n"), ("on", "[novelty]\n")):
    with open(f"{sys.argv[1]}/{name}.toml", "w") as f:
        f.write('mode = "enforce"\n' + novelty + rule + udp)
PY

# Packets the first-seen log rules of lab $1 counted (the messages its kernel sent).
logged() { in_lab "$1" nft list ruleset | { grep 'egret:allowed-new' || true; } | sed -n 's/.*counter packets \([0-9]*\).*/\1/p' | awk '{s+=$1} END{print s+0}'; }
measure() { in_lab "$1" "$LOAD" client 10.1.0.2:5201 "$SECONDS_PER_RUN" "$THREADS" | awk '{print $1}'; }

# $3 pairs of slices with novelty off in lab $1 and on in lab $2.
msgs=0
pairs() {
  local LAB_off=$1 LAB_on=$2 s lab before
  for s in off on; do
    lab=LAB_$s
    in_lab "${!lab}" nft flush ruleset
    in_lab "${!lab}" "$E" apply "$TMP/${AA:-$s}.toml" >/dev/null
    # Warm-up: the one flow (uid 0 -> 10.1.0.2:5201/tcp) is first seen here.
    in_lab "${!lab}" "$LOAD" client 10.1.0.2:5201 1 1 >/dev/null
  done
  before=$(logged "$LAB_on")
  for r in $(seq "$3"); do
    order="off on"; [ $((r % 2)) = 0 ] && order="on off"
    for s in $order; do
      # Each slice starts with empty conntrack tables in both labs: otherwise
      # it inherits the entries of the slices before it (a closed connection's
      # stays 10 s), which cost it more than novelty does.
      in_lab "$LAB_off" conntrack -F >/dev/null 2>&1 || true
      in_lab "$LAB_on" conntrack -F >/dev/null 2>&1 || true
      lab=LAB_$s
      echo "$s $(measure "${!lab}")" | tee -a "$TMP/results"
    done
  done
  msgs=$((msgs + $(logged "$LAB_on") - before))
}

echo "== 1, 2: new TCP connections/s, 100k entries, novelty ${AA:+(A=A: both }off${AA:+)} vs on ($ROUNDS interleaved pairs of ${SECONDS_PER_RUN}s slices, $THREADS threads)"
pairs "$LAB_1" "$LAB_2" $((ROUNDS / 2))
pairs "$LAB_2" "$LAB_1" $((ROUNDS - ROUNDS / 2))
median() { grep "^$1 " "$TMP/results" | awk '{print $2}' | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
off=$(median off) on=$(median on)
awk -v a="$on" -v b="$off" -v m="$msgs" -v t="$((ROUNDS * SECONDS_PER_RUN))" 'BEGIN{
  printf "\noff %s conn/s, on %s conn/s (medians): on / off = %.3f\n", b, a, a/b
  printf "kernel messages after warm-up: %d in %d s = %.2f/s (goal ~0)\n", m, t, m/t }'
awk '$1=="on"{on[++i]=$2} $1=="off"{off[++j]=$2} END{for(k=1;k<=i;k++) print on[k]/off[k]}' "$TMP/results" \
  | sort -n | awk '{a[NR]=$1} END{printf "median of the %d pairs'"'"' on/off = %.3f (goal >= 0.97); quartiles %.3f, %.3f\n", NR, a[int((NR+1)/2)], a[int((NR+3)/4)], a[int((3*NR+1)/4)]}'
echo
echo "== 3: daemon CPU per 1,000 first-seen flows ($NEW distinct UDP ports, one client)"
in_a nft flush ruleset
in_a "$E" apply "$TMP/on.toml" >/dev/null
(in_a "$E" run --policy "$TMP/on.toml" --state-dir "$TMP/state" > /dev/null 2> "$TMP/run.err" &)
for _ in $(seq 100); do
  [ -n "$(in_a "$E" status --json --state-dir "$TMP/state" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin).get("monitor") or "")' 2>/dev/null)" ] && break
  sleep 0.1
done
pid=$(pgrep -f -n -- "--state-dir $TMP/state") || { cat "$TMP/run.err"; exit 1; }
cpu() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
received() { in_a "$E" status --json --state-dir "$TMP/state" | python3 -c 'import json,sys; print(json.load(sys.stdin)["monitor"]["loss"]["received"])'; }
c0=$(cpu) r0=$(received)
in_a python3 - "$NEW" <<'PY'
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in range(20000, 20000 + int(sys.argv[1])):
    s.sendto(b"x", ("10.1.0.2", port))
PY
for _ in $(seq 300); do
  [ "$(received)" -ge $((r0 + NEW)) ] && break
  sleep 0.2
done
sleep 2 # the loop's last batch and the store's flush
c1=$(cpu) r1=$(received)
hz=$(getconf CLK_TCK)
awk -v c=$((c1 - c0)) -v n=$((r1 - r0)) -v hz="$hz" 'BEGIN{printf "%d first-seen messages received, daemon CPU %.2f s: %.1f ms per 1,000\n", n, c/hz, 1e6*c/hz/n}'
kill "$pid"
