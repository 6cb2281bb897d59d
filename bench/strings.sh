#!/usr/bin/env bash
# Hostile process strings (issue 15, finding 2): N blocked connects (default
# 100, to N different ports, so N incidents), each from a python3 run as
# nobody with ~1 MB of arguments (8 x 128,000 bytes, the kernel's per-argument
# maximum). Reports the daemon's RSS (now and peak) before and after, the
# longest event line on stdout and the store's growth.
# egret runs in a network namespace this script creates (a veth pair;
# SYNs to 10.99.0.2 are dropped by egret's output chain) and deletes.
#
#   sudo bash bench/strings.sh                       # the worktree's build
#   sudo EGRET=/path/to/other/egret bash bench/strings.sh   # another build
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
N=${N:-100}
if [ -z "${EGRET:-}" ]; then
    cargo build -q --bin egret
    EGRET=${CARGO_TARGET_DIR:-target}/debug/egret
fi
NS=egret-strings-$$
TMP=$(mktemp -d)
chmod 755 "$TMP"
cleanup() {
    set +e
    ip netns pids "$NS" 2>/dev/null | xargs -r kill 2>/dev/null
    [ -n "${DAEMON:-}" ] && wait "$DAEMON" 2>/dev/null
    ip netns del "$NS" 2>/dev/null
    rm -rf "$TMP"
}
trap cleanup EXIT
ip netns add "$NS"
in_ns() { nsenter --net=/run/netns/"$NS" -- "$@"; }
in_ns ip link set lo up
in_ns ip link add v0 type veth peer name v1
in_ns ip addr add 10.99.0.1/24 dev v0
in_ns ip link set v0 up; in_ns ip link set v1 up
printf 'mode = "enforce"\n' > "$TMP/policy.toml"

in_ns "$EGRET" run --policy "$TMP/policy.toml" --state-dir "$TMP/state" --update-every 1s \
    > "$TMP/events.jsonl" 2> "$TMP/stderr" &
DAEMON=$!
for _ in $(seq 100); do grep -q "watching blocked egress" "$TMP/stderr" && break; sleep 0.1; done
grep -q "watching blocked egress" "$TMP/stderr" || { cat "$TMP/stderr"; exit 1; }
PID=$(cat "$TMP/state/egret.pid")
rss() { awk -v k="$1:" '$1 == k { print int($2 / 1024) }' /proc/$PID/status; }
db() { du -k --apparent-size "$TMP"/state/events.db* | awk '{ s += $1 } END { print int(s / 1024) }'; }
echo "before: RSS $(rss VmRSS) MiB (peak $(rss VmHWM) MiB), store $(db) MiB"

ARG=$(head -c 128000 /dev/zero | tr '\0' a)
ARGS=("$ARG" "$ARG" "$ARG" "$ARG" "$ARG" "$ARG" "$ARG" "$ARG")
TRY='import socket,sys,time
s=socket.socket(); s.setblocking(False); s.connect_ex(("10.99.0.2",int(sys.argv[1]))); time.sleep(1.5)'
start=$(date +%s.%N)
PIDS=()
for i in $(seq 0 $((N - 1))); do
    nsenter --net=/run/netns/"$NS" -- setpriv --reuid=65534 --regid=65534 --clear-groups \
        /usr/bin/python3 -c "$TRY" $((20000 + i)) "${ARGS[@]}" &
    PIDS+=($!)
    # ten at a time
    if (( i % 10 == 9 )); then wait "${PIDS[@]}" || true; PIDS=(); fi
done
[ ${#PIDS[@]} -eq 0 ] || wait "${PIDS[@]}" || true
for _ in $(seq 100); do
    [ "$(grep -c '"update":false' "$TMP/events.jsonl")" -ge "$N" ] && break; sleep 0.1
done
sleep 2  # the next store write and update tick
end=$(date +%s.%N)
new=$(grep -c '"update":false' "$TMP/events.jsonl" || true)
longest=$(awk '{ if (length($0) > m) m = length($0) } END { print m + 0 }' "$TMP/events.jsonl")
echo "after $N connects with ~1 MB of arguments each ($new incidents reported, $(printf '%.1f' "$(echo "$end - $start" | bc)") s):"
echo "  RSS $(rss VmRSS) MiB (peak $(rss VmHWM) MiB), store $(db) MiB, longest event line $longest bytes"
echo "  truncated marks: $(grep -c '"truncated":\["process.command_line"\]' "$TMP/events.jsonl" || true)"
