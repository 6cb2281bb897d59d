#!/usr/bin/env bash
# Tamper detection (issue 15, finding 14): how fast a foreign change to
# egret's table is reported (and put back with restore_table), and what the
# watch costs at idle. Three `egret run` daemons, each in a network namespace
# this script creates (and deletes), started once and measured side by side so
# that the machine's load falls on all of them alike:
#   big     100k CIDRs (50k /24 ranges, 50k single addresses), restore_table = true
#   small   one CIDR, restore_table = true (restoring it costs next to nothing)
#   report  100k CIDRs, restore_table = false (detection alone: nothing reloaded)
#  1. idle CPU over WINDOWS windows of WINDOW s, same windows for all three.
#     The watch is nf_tables' change notifications (polled every loop turn),
#     the rules read every second and the full comparison every 10 s, which
#     reads every static set's elements: big - small is what the full
#     comparison of a 100k table costs.
#  2. ROUNDS interleaved rounds: `nft add element` into a static allow set of
#     each daemon, then `nft add rule` (big, small): time from the nft command's
#     start (and from its exit) to the tamper event on egret's stdout, and that
#     the element or rule is gone again where restore_table is on. On `report`
#     the script deletes the element itself (another foreign change, waited for).
#  3. CPU while a foreign change stands unrestored (`report` with an element
#     added and left for WINDOW s), beside big and small in the same window.
#
#   sudo bash bench/tamper.sh                 # ROUNDS=5 WINDOWS=3 WINDOW=20
#   EGRET=/path/to/egret sudo -E bash bench/tamper.sh   # another build
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
ROUNDS=${ROUNDS:-5} WINDOWS=${WINDOWS:-3} WINDOW=${WINDOW:-20}
if [ -z "${EGRET:-}" ]; then
  cargo build --release -q --bin egret
  E=$PWD/${CARGO_TARGET_DIR:-target}/release/egret
else
  E=$EGRET
fi
CASES="big small report"
TMP=$(mktemp -d)
declare -A PID NS
cleanup() {
  for c in $CASES; do
    [ -n "${PID[$c]:-}" ] && kill "${PID[$c]}" 2>/dev/null || true
  done
  sleep 0.3
  for c in $CASES; do [ -n "${NS[$c]:-}" ] && ip netns del "${NS[$c]}" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT
chmod 700 "$TMP"
python3 - "$TMP" <<'PY'
import random, sys
random.seed(7)
nets = set()
while len(nets) < 100000:
    a, b, c = random.randrange(1, 223), random.randrange(256), random.randrange(256)
    if a in (10, 127):
        continue
    nets.add(f"{a}.{b}.{c}.0/24" if len(nets) % 2 else f"{a}.{b}.{c}.{random.randrange(1, 255)}")
body = '[[allow]]\nname = "bulk"\nports = [443]\ncidrs = [\n' + ",\n".join(f'"{x}"' for x in sorted(nets)) + "\n]\n"
d = sys.argv[1]
open(f"{d}/big.toml", "w").write('mode = "enforce"\nrestore_table = true\n' + body)
open(f"{d}/report.toml", "w").write('mode = "enforce"\nrestore_table = false\n' + body)
open(f"{d}/small.toml", "w").write('mode = "enforce"\nrestore_table = true\n[[allow]]\nname = "bulk"\nports = [443]\ncidrs = ["192.0.2.0/24"]\n')
PY
# Runs the command while watching OUT for the first new tamper event; prints
# "ms_from_start ms_from_exit restored" (from_exit < 0: the event came while
# the command was still running, e.g. nft cleaning up after its commit).
cat > "$TMP/lat.py" <<'PY'
import json, subprocess, sys, time
out, timeout, cmd = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
f = open(out, "rb")
f.seek(0, 2)
t0 = time.monotonic()
p = subprocess.Popen(cmd)
t1 = None
buf = b""
found = None
while time.monotonic() - t0 < timeout and (found is None or t1 is None):
    if t1 is None and p.poll() is not None:
        t1 = time.monotonic()
        if p.returncode != 0:
            sys.exit(f"{cmd} failed")
    if found is None:
        buf += f.read()
        *lines, buf = buf.split(b"\n")
        for line in lines:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if doc.get("event", {}).get("action") == "tamper":
                found = (time.monotonic(), str(doc["egret"].get("restored")).lower())
                break
    time.sleep(0.0005)
if found is None or t1 is None:
    print("timeout")
    sys.exit(1)
print(f"{(found[0] - t0) * 1000:.1f} {(found[0] - t1) * 1000:.1f} {found[1]}")
PY
HZ=$(getconf CLK_TCK)
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
in_ns() { local c=$1; shift; ip netns exec "${NS[$c]}" "$@"; }
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
for c in $CASES; do
  NS[$c]=egret-bench-tamper-$c-$$
  ip netns add "${NS[$c]}"
  in_ns "$c" ip link set lo up
  # ip netns exec execs egret: $! is egret's pid.
  ip netns exec "${NS[$c]}" "$E" run --policy "$TMP/$c.toml" --state-dir "$TMP/state-$c" >"$TMP/$c.out" 2>"$TMP/$c.err" &
  PID[$c]=$!
done
for c in $CASES; do
  for _ in $(seq 600); do
    grep -q "watching blocked egress" "$TMP/$c.err" && break
    kill -0 "${PID[$c]}" 2>/dev/null || { echo "egret ($c) exited:" >&2; cat "$TMP/$c.err" >&2; exit 1; }
    sleep 0.2
  done
  grep -q "watching blocked egress" "$TMP/$c.err" || { echo "egret ($c) did not start in 120 s" >&2; exit 1; }
done
sleep 11 # past the first full comparison
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
for c in $CASES; do
  echo "$c: RSS $(awk '/VmRSS/ {print $2}' "/proc/${PID[$c]}/status") KiB, $(in_ns "$c" nft list table inet egret | wc -l) lines in \`nft list table\`"
done

# CPU ms of each case over one WINDOW: "big small report"
window() {
  local c t0=() t1=() i=0
  for c in $CASES; do t0+=("$(ticks "${PID[$c]}")"); done
  sleep "$WINDOW"
  for c in $CASES; do t1+=("$(ticks "${PID[$c]}")"); done
  for c in $CASES; do printf '%s ' $(( (t1[i] - t0[i]) * 1000 / HZ )); i=$((i + 1)); done
  echo
}
pct() { awk -v ms="$1" -v w="$WINDOW" 'BEGIN { printf "%.2f", ms / 10 / w }'; }

echo "== 1. idle CPU, $WINDOWS windows of $WINDOW s (ms per window: big small report)"
declare -A IDLE
for w in $(seq "$WINDOWS"); do
  read -r b s r <<<"$(window)"
  echo "window $w: $b $s $r"
  IDLE[big]+="$b " IDLE[small]+="$s " IDLE[report]+="$r "
done
for c in $CASES; do
  m=$(echo "${IDLE[$c]}" | median)
  echo "idle $c: median $m ms per $WINDOW s ($(pct "$m")% of one core)"
done

echo "== 2. nft change → tamper event, $ROUNDS interleaved rounds (ms from the nft command's start / from its exit)"
declare -A LAT EXIT
run_lat() {  # case key command...: appends to LAT[key], EXIT[key]
  local c=$1 key=$2 res; shift 2
  # A miss is a result, not the end of the run (a stalled loop was one).
  res=$(python3 "$TMP/lat.py" "$TMP/$c.out" 60 ip netns exec "${NS[$c]}" "$@") || { echo "  $key: NO tamper event within 60 s"; LAT[$key]+="60000 " EXIT[$key]+="60000 "; return 0; }
  read -r from_start from_exit restored <<<"$res"
  LAT[$key]+="$from_start " EXIT[$key]+="$from_exit "
  echo "  $key: $from_start / $from_exit ms, restored=$restored"
}
gone() {  # case command...: fails if the foreign change is still there
  local c=$1; shift
  if in_ns "$c" "$@" >/dev/null 2>&1; then echo "$c: the foreign change was not undone" >&2; exit 1; fi
}
# Elements go into the interval set a_bulk_v4 (the ranges): the single
# addresses' hash set is created with its exact size, so the kernel refuses
# any addition to it (ENFILE). nft first reads all 50k ranges of the interval
# set (its overlap check: seconds here), so each add is timed from the nft
# command's exit (the commit) as well as from its start.
for i in $(seq "$ROUNDS"); do
  echo "round $i"
  for c in big small report; do
    run_lat "$c" "$c-element" nft add element inet egret a_bulk_v4 "{ 10.9.9.$i }"
  done
  gone big nft get element inet egret a_bulk_v4 "{ 10.9.9.$i }"
  gone small nft get element inet egret a_bulk_v4 "{ 10.9.9.$i }"
  run_lat report report-undo nft delete element inet egret a_bulk_v4 "{ 10.9.9.$i }"
  for c in big small; do
    run_lat "$c" "$c-rule" nft add rule inet egret output ip daddr "192.0.2.$((100 + i))" accept
    if in_ns "$c" nft list chain inet egret output | grep -q "192.0.2.$((100 + i))"; then
      echo "$c: the foreign rule was not removed" >&2; exit 1
    fi
  done
  sleep 1 # let the 100k restores' old tables go before the next round
done
for k in big-element small-element report-element big-rule small-rule report-undo; do
  echo "$k: median $(echo "${LAT[$k]}" | median) ms from the command's start, $(echo "${EXIT[$k]}" | median) ms from its exit (all: ${LAT[$k]})"
done

echo "== 3. CPU while a foreign element stands unrestored in report (ms per $WINDOW s: big small report)"
run_lat report report-standing nft add element inet egret a_bulk_v4 "{ 10.9.8.1 }"
read -r b s r <<<"$(window)"
echo "standing: $b $s $r  (report at $(pct "$r")% of one core)"
run_lat report report-undo nft delete element inet egret a_bulk_v4 "{ 10.9.8.1 }"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
for c in $CASES; do
  echo "$c: $(grep -c '"tamper"' "$TMP/$c.out" || true) tamper events; RSS $(awk '/VmRSS/ {print $2}' "/proc/${PID[$c]}/status") KiB; warnings: $(grep -c WARN "$TMP/$c.err" || true)"
done
grep '"tamper"' "$TMP/big.out" | head -1
