#!/usr/bin/env bash
# What the local servers' per-connection checks cost (docs/api.md, Limits):
# every new connection to the API or metrics is looked up with sock_diag
# (the peer socket's uid, for the access check and the per-client caps).
# N sequential fresh connections, each `GET /metrics` (or /api/v1/status as
# root), from one Python client: connections per second and the server
# thread's CPU per connection.
# Runs in a network namespace it creates and deletes; loopback traffic only.
#
#   sudo bash bench/servers.sh           # N=3000, release build
#   sudo PROFILE=debug bash bench/servers.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
N=${N:-3000} PROFILE=${PROFILE:-release}
if [ "$PROFILE" = release ]; then cargo build --release -q --bin egret; else cargo build -q --bin egret; fi
E=$PWD/${CARGO_TARGET_DIR:-target}/$PROFILE/egret
NS=egret-srv-$$ TMP=$(mktemp -d)
cleanup() { ip netns pids "$NS" 2>/dev/null | xargs -r kill 2>/dev/null || true; sleep 0.3; ip netns del "$NS" 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
ip netns add "$NS"
in_ns() { nsenter --net=/run/netns/"$NS" -- "$@"; }
in_ns ip link set lo up
cat > "$TMP/policy.toml" <<'P'
mode = "enforce"
[api]
listen = "127.0.0.1:9465"
[metrics]
listen = "127.0.0.1:9464"
P
HZ=$(getconf CLK_TCK)
thread_ticks() { local t=0 d; for d in /proc/$1/task/*; do [ "$(cat "$d/comm")" = "$2" ] && t=$((t + $(awk '{print $14 + $15}' "$d/stat"))); done; echo $t; }
(in_ns "$E" run --policy "$TMP/policy.toml" --state-dir "$TMP/state" --log-level warn > /dev/null 2> "$TMP/egret.err" &)
PID=""; for _ in $(seq 100); do PID=$(cat "$TMP/state/egret.pid" 2>/dev/null || true); [ -n "$PID" ] && in_ns curl -sf -o /dev/null http://127.0.0.1:9464/metrics && break; sleep 0.1; done
printf '%-10s %-16s %8s %14s %22s\n' server path conns "conns/s" "server CPU µs/conn"
for target in "metrics 9464 /metrics" "api 9465 /api/v1/rules"; do
  set -- $target
  t0=$(thread_ticks "$PID" "$1")
  rate=$(in_ns python3 - "$2" "$3" "$N" <<'PY'
import socket, sys, time
port, path, n = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
req = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
start = time.time()
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(req)
    head = s.recv(64)
    assert head.startswith(b"HTTP/1.1 200"), head
    while s.recv(65536):
        pass
    s.close()
print(round(n / (time.time() - start)))
PY
)
  t1=$(thread_ticks "$PID" "$1")
  printf '%-10s %-16s %8s %14s %22s\n' "$1" "$3" "$N" "$rate" "$(python3 -c "print(round(($t1-$t0)*1e6/$HZ/$N, 1))")"
done
