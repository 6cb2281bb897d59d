#!/usr/bin/env bash
# Floods (issue 15, finding 7), in a network namespace this script creates
# and deletes (loopback and 10.77.0.0/24 only), every flood bounded by count:
#  1. NAMES unique refused DNS names from one process as nobody through the
#     guard (at most 256 unanswered), while uid 65533 asks PROBES names of its
#     own (one process each): refusals/s, CPU per refusal, what reached the
#     store, what was counted as dropped, whether the books balance, and the
#     share of the other identity's first attempts that went out as incidents.
#  2. CPU per new incident on an empty table and with OPEN incidents open:
#     blocked UDP from many uids (100 destinations each, within the
#     per-identity rate, so each is an incident of its own).
#  3. SIGTERM during a refused-name flood with OPEN incidents open: how long
#     egret takes to stop, and the books after.
#
#   sudo bash bench/flood.sh          # NAMES=80000 OPEN=50000 PROBES=50
#   EGRET=/path/to/egret sudo -E bash bench/flood.sh   # another build (before/after)
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
NAMES=${NAMES:-80000} OPEN=${OPEN:-50000} PROBES=${PROBES:-50}
if [ -z "${EGRET:-}" ]; then
  cargo build --release -q --bin egret
  E=$PWD/${CARGO_TARGET_DIR:-target}/release/egret
else
  E=$EGRET
fi
F=$PWD/tests/support/flood.py
NS=egret-flood-$$ TMP=$(mktemp -d)
chmod 755 "$TMP"
cleanup() { ip netns pids "$NS" 2>/dev/null | xargs -r kill 2>/dev/null || true; sleep 0.3; ip netns del "$NS" 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
ip netns add "$NS"
in_ns() { nsenter --net=/run/netns/"$NS" -- "$@"; }
as_uid() { local u=$1; shift; in_ns setpriv --reuid="$u" --regid="$u" --clear-groups "$@"; }
in_ns ip link set lo up
in_ns ip link add v0 type veth peer name v1
in_ns ip addr add 10.77.0.1/24 dev v0
in_ns ip link set v0 up; in_ns ip link set v1 up
cat > "$TMP/policy.toml" <<'P'
mode = "enforce"
[dns]
listen = "127.0.0.1:53"
upstream = ["192.0.2.53"]
[[allow]]
name = "web"
hosts = ["allowed.test"]
ports = [443]
P
HZ=$(getconf CLK_TCK)
now() { date +%s.%N; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
books() { in_ns "$E" status --json --state-dir "$TMP/state" | python3 -c "import json,sys; m=json.load(sys.stdin)['monitor']; print($1)"; }
# Waits until the books' value of EXPR stops moving for 1.5 s (books are written every second).
settle() { local prev=-1 cur; while :; do cur=$(books "$1"); [ "$cur" = "$prev" ] && break; prev=$cur; sleep 1.5; done; echo "$cur"; }
new_incidents() { grep -c '"update":false' "$TMP/egret.jsonl" || true; }
PID=""
start_egret() {
  rm -rf "$TMP/state"; : > "$TMP/egret.jsonl"
  (in_ns "$E" run --policy "$TMP/policy.toml" --state-dir "$TMP/state" --log-level warn > "$TMP/egret.jsonl" 2> "$TMP/egret.err" &)
  PID=""; for _ in $(seq 200); do PID=$(cat "$TMP/state/egret.pid" 2>/dev/null || true); [ -n "$PID" ] && [ -e "$TMP/state/events.db" ] && break; sleep 0.1; done
  for _ in $(seq 100); do [ -n "$(books 'm["updated_at"]' 2>/dev/null)" ] && break; sleep 0.1; done
}
stop_egret() {  # prints the seconds from SIGTERM to exit
  local t0; t0=$(now); kill -TERM "$PID"
  while [ -e "/proc/$PID" ]; do sleep 0.01; done
  awk -v a="$t0" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'
}
stored() {  # action|uid|sum of counts|incidents
  sqlite3 "$TMP/state/events.db" "SELECT action, json_extract(doc, '\$.user.id'), sum(count), count(*) FROM events GROUP BY 1, 2"
}
# CPU per new incident for UIDS uids x 100 destinations from FIRST uid: "incidents cpu_ms us_per_incident incidents_per_s"
measure_uids() {
  local first=$1 uids=$2 c0 n0 t0 c1 n1 t1
  c0=$(cpu_ticks "$PID"); n0=$(new_incidents); t0=$(now)
  in_ns /usr/bin/python3 "$F" udp-uids 10.77.0.2 "$first" "$uids" 100 >/dev/null
  settle 'm["loss"]["received"]' >/dev/null
  c1=$(cpu_ticks "$PID"); n1=$(new_incidents); t1=$(now)
  awk -v n=$((n1 - n0)) -v c=$((c1 - c0)) -v hz="$HZ" -v s="$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')" \
    'BEGIN { printf "%d %.0f %.1f %.0f", n, c * 1000 / hz, c * 1e6 / hz / n, n / s }'
}

echo "== 1. $NAMES refused names from nobody, $PROBES first attempts of uid 65533 meanwhile"
start_egret
c0=$(cpu_ticks "$PID"); t0=$(now)
as_uid 65534 /usr/bin/python3 "$F" dns 127.0.0.1 53 "$NAMES" 256 > "$TMP/flood.out" &
FLOOD=$!
probes=0
while kill -0 "$FLOOD" 2>/dev/null && [ "$probes" -lt "$PROBES" ]; do
  as_uid 65533 /usr/bin/python3 "$F" dns 127.0.0.1 53 1 1 "probe$probes-" >/dev/null
  probes=$((probes + 1))
done
wait "$FLOOD"; t1=$(now)
refused=$(settle 'm["dns_guard"]["refused"]')
c1=$(cpu_ticks "$PID")
secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { print b - a }')
stop_s=$(stop_egret)
dropped=$(books 'm["loss"]["dns_dropped"]')
stored > "$TMP/stored"
nobody=$(awk -F'|' '$2 == "65534" && ($1 == "dns-refused" || $1 == "flood") { s += $3 } END { print s + 0 }' "$TMP/stored")
heard=$(awk -F'|' '$2 == "65533" && $1 == "dns-refused" { s += $4 } END { print s + 0 }' "$TMP/stored")
probe_refused=$(awk -F'|' '$2 == "65533" { s += $3 } END { print s + 0 }' "$TMP/stored")
echo "client: $(cat "$TMP/flood.out") in ${secs} s"
awk -v r="$refused" -v s="$secs" -v c=$((c1 - c0)) -v hz="$HZ" 'BEGIN { printf "guard refusals handled: %d (%.0f/s), egret CPU %.0f ms (%.1f us per refusal)\n", r, r / s, c * 1000 / hz, c * 1e6 / hz / r }'
echo "stored for nobody: $nobody attempts in $(awk -F'|' '$2 == "65534" { printf "%s %s incidents; ", $1, $4 }' "$TMP/stored")dropped (counted): $dropped; books balance (refusals = nobody's stored + uid 65533's stored + dropped): $([ $((nobody + probe_refused + dropped)) = "$refused" ] && echo yes || echo NO)"
echo "other identity: $probes first attempts sent during the flood, $heard went out as incidents of their own ($probe_refused refusals stored)"
echo "stop after the flood: ${stop_s} s"

echo "== 2. CPU per new incident (blocked UDP, 100 destinations per uid)"
start_egret
read -r n ms us rate <<<"$(measure_uids 20000 50)"
echo "empty table: $n incidents, ${ms} ms CPU, ${us} us per incident, ${rate} incidents/s"
read -r n ms us rate <<<"$(measure_uids 30000 $((OPEN / 100)))"
echo "filling to $(books 'm["open_incidents"]') open: $n incidents, ${us} us per incident, ${rate} incidents/s"
read -r n ms us rate <<<"$(measure_uids 40000 50)"
echo "with $(books 'm["open_incidents"]') open: $n incidents, ${ms} ms CPU, ${us} us per incident, ${rate} incidents/s"

echo "== 3. SIGTERM during a refused-name flood (after $((NAMES / 4)) refusals) with $(books 'm["open_incidents"]') incidents open"
as_uid 65534 /usr/bin/python3 "$F" dns 127.0.0.1 53 "$NAMES" 512 flood3- > /dev/null &
FLOOD=$!
while [ "$(books 'm["dns_guard"]["refused"] if m["dns_guard"] else 0')" -lt $((NAMES / 4)) ]; do sleep 0.1; done
stop_s=$(stop_egret)
wait "$FLOOD" || true
refused=$(books 'm["dns_guard"]["refused"]')
dropped=$(books 'm["loss"]["dns_dropped"]')
nobody=$(stored | awk -F'|' '$2 == "65534" && ($1 == "dns-refused" || $1 == "flood") { s += $3 } END { print s + 0 }')
echo "stop under load: ${stop_s} s; refused $refused = stored $nobody + dropped $dropped: $([ $((nobody + dropped)) = "$refused" ] && echo balanced || echo NOT balanced)"
