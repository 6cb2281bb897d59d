#!/usr/bin/env bash
# The local API and its live feed, measured (docs/api.md).
#  1. What the live feed costs the pipeline: COUNT blocked UDP datagrams to
#     COUNT different ports (COUNT incidents) with 0, 1 and 8 stream clients
#     connected: egret run's CPU per incident, and whether every client got
#     every incident.
#  2. How fast the API answers with that store (COUNT incidents): REPS
#     requests per endpoint with curl, median and p95 of curl's time_total,
#     beside the CLI reading the same store (`egret events --json`,
#     process start included).
# Runs in a network namespace it creates (veth pair, 10.78.0.0/24) and
# deletes; traffic only to 10.78.0.2; bounded by COUNT.
#
#   sudo bash bench/api.sh            # COUNT=20000 REPS=50 by default
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
COUNT=${COUNT:-20000} REPS=${REPS:-50}
cargo build --release -q --bin egret
E=$PWD/${CARGO_TARGET_DIR:-target}/release/egret
NS=egret-api-$$ TMP=$(mktemp -d)
cleanup() { ip netns pids "$NS" 2>/dev/null | xargs -r kill 2>/dev/null || true; sleep 0.3; ip netns del "$NS" 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
ip netns add "$NS"
in_ns() { nsenter --net=/run/netns/"$NS" -- "$@"; }
in_ns ip link set lo up
in_ns ip link add v0 type veth peer name v1
in_ns ip addr add 10.78.0.1/24 dev v0
in_ns ip link set v0 up; in_ns ip link set v1 up
cat > "$TMP/policy.toml" <<'P'
mode = "enforce"
[api]
listen = "127.0.0.1:9465"
P
HZ=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# CPU ticks of the process's threads named $2 (the API serves on thread "api").
thread_ticks() { local t=0 d; for d in /proc/$1/task/*; do [ "$(cat "$d/comm")" = "$2" ] && t=$((t + $(awk '{print $14 + $15}' "$d/stat"))); done; echo $t; }
incidents() { in_ns curl -s 'http://127.0.0.1:9465/api/v1/status' | python3 -c 'import json,sys; m=json.load(sys.stdin)["monitor"]; print(m["loss"]["received"])'; }
settle() { local prev=-1 cur; while :; do cur=$("$@"); [ "$cur" = "$prev" ] && break; prev=$cur; sleep 1.5; done; echo "$cur"; }

start_egret() {
  rm -rf "$TMP/state"
  (in_ns "$E" run --policy "$TMP/policy.toml" --state-dir "$TMP/state" --log-level warn > /dev/null 2> "$TMP/egret.err" &)
  PID=""; for _ in $(seq 100); do PID=$(cat "$TMP/state/egret.pid" 2>/dev/null || true); [ -n "$PID" ] && in_ns curl -sf -o /dev/null http://127.0.0.1:9465/api/v1/status && break; sleep 0.1; done
}
stop_egret() { kill "$PID"; while [ -e "/proc/$PID" ]; do sleep 0.1; done; }

echo "## live feed: $COUNT incidents (one blocked datagram each to a different port)"
printf '%-8s %14s %16s %18s %22s %10s\n' clients "egret cpu ms" "µs/incident" "api thread µs/inc" "incidents per client" "RSS MiB"
for clients in 0 1 8; do
  start_egret
  for i in $(seq "$clients"); do
    (in_ns curl -sN http://127.0.0.1:9465/api/v1/stream > "$TMP/client$i" &)
  done
  sleep 0.5
  c0=$(cpu_ticks "$PID") a0=$(thread_ticks "$PID" api)
  in_ns python3 - "$COUNT" <<'PY'
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
n = int(sys.argv[1])
for i in range(n):
    try:
        s.sendto(b"x", ("10.78.0.2", 1 + i % 65535))
    except PermissionError:
        pass
    if i % 2000 == 1999:
        import time; time.sleep(0.05)  # stay within the attribution budget's pace
PY
  settle incidents > /dev/null
  c1=$(cpu_ticks "$PID") a1=$(thread_ticks "$PID" api)
  got="-"
  if [ "$clients" -gt 0 ]; then
    got=$(for i in $(seq "$clients"); do grep -c '^data: .*"update":false' "$TMP/client$i" || true; done | sort -n | head -1)
  fi
  ms=$(( (c1 - c0) * 1000 / HZ )) api_ms=$(( (a1 - a0) * 1000 / HZ ))
  rss=$(awk '/VmRSS/ {printf "%.1f", $2/1024}' "/proc/$PID/status")
  printf '%-8s %14s %16s %18s %22s %10s\n' "$clients" "$ms" "$(python3 -c "print(round($ms*1000/$COUNT, 1))")" "$(python3 -c "print(round($api_ms*1000/$COUNT, 1))")" "$got" "$rss"
  [ "$clients" = 8 ] || stop_egret
done

echo
echo "## API answers over a store of $COUNT incidents ($REPS requests each; curl time_total)"
printf '%-52s %10s %10s\n' request "median ms" "p95 ms"
stat() { sort -n | python3 -c 'import sys; v=[float(x)*1000 for x in sys.stdin]; v.sort(); print(f"{v[len(v)//2]:10.2f} {v[int(len(v)*0.95)-1]:10.2f}")'; }
for path in /api/v1/status /api/v1/rules "/api/v1/events?limit=100" "/api/v1/events?limit=100&q=10.78.0.2:4242" "/api/v1/top?by=destination" "/api/v1/timeline?since=24h"; do
  printf '%-52s %s\n' "GET $path" "$(for _ in $(seq "$REPS"); do in_ns curl -s -o /dev/null -w '%{time_total}\n' "http://127.0.0.1:9465$path"; done | stat)"
done
seconds() { local t0=$EPOCHREALTIME; "$@" > /dev/null; python3 -c "print($EPOCHREALTIME - $t0)"; }
printf '%-52s %s\n' "egret events --json --limit 100 (CLI process)" "$(for _ in $(seq "$REPS"); do seconds "$E" events --json --limit 100 --state-dir "$TMP/state"; done | stat)"
printf '%-52s %s\n' "egret top --limit 10 (CLI process)" "$(for _ in $(seq "$REPS"); do seconds "$E" top --state-dir "$TMP/state"; done | stat)"
stop_egret
