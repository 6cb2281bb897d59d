#!/usr/bin/env bash
# Blocked-packet ingest: `egret run` beside ulogd2 (Debian's, JSON output) on
# the same flood of blocked UDP packets, in the same run. Each consumer in
# turn owns NFLOG group 5 behind the very same ruleset (egret's), with the
# same socket buffer (32 MiB) and batching (qthresh 32, 100 ms flush).
# Reports what the kernel logged, what each received, its CPU time and peak
# RSS. Runs in a network namespace it creates (a veth pair, 10.77.0.0/24)
# and deletes; the flood is bounded by COUNT.
#
#   sudo bash bench/ingest.sh            # COUNT=500000 ROUNDS=3 by default
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
COUNT=${COUNT:-500000} ROUNDS=${ROUNDS:-3}
command -v ulogd >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ulogd2 ulogd2-json >/dev/null
cargo build --release -q --bin egret --example udp_flood
T=${CARGO_TARGET_DIR:-target}/release
E=$PWD/$T/egret FLOOD=$PWD/$T/examples/udp_flood
[ -x "$E" ] || E=$T/egret FLOOD=$T/examples/udp_flood
NS=egret-ingest-$$ TMP=$(mktemp -d)
cleanup() { ip netns pids "$NS" 2>/dev/null | xargs -r kill 2>/dev/null || true; sleep 0.3; ip netns del "$NS" 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
ip netns add "$NS"
in_ns() { nsenter --net=/run/netns/"$NS" -- "$@"; }
in_ns ip link set lo up
in_ns ip link add v0 type veth peer name v1
in_ns ip addr add 10.77.0.1/24 dev v0
in_ns ip link set v0 up; in_ns ip link set v1 up
cat > "$TMP/policy.toml" <<'P'
mode = "enforce"
[[allow]]
name = "mirror"
cidrs = ["10.77.0.3"]
ports = [443]
P
U=/usr/lib/x86_64-linux-gnu/ulogd
cat > "$TMP/ulogd.conf" <<C
[global]
logfile="$TMP/ulogd.log"
loglevel=5
plugin="$U/ulogd_inppkt_NFLOG.so"
plugin="$U/ulogd_raw2packet_BASE.so"
plugin="$U/ulogd_filter_IFINDEX.so"
plugin="$U/ulogd_filter_IP2STR.so"
plugin="$U/ulogd_output_JSON.so"
stack=log1:NFLOG,base1:BASE,ifi1:IFINDEX,ip2str1:IP2STR,json1:JSON
[log1]
group=5
netlink_socket_buffer_size=33554432
netlink_socket_buffer_maxsize=33554432
netlink_qthreshold=32
netlink_qtimeout=10
[json1]
sync=0
file="$TMP/ulogd.json"
C

kernel_count() { in_ns "$E" status --json --state-dir "$TMP/none" | python3 -c 'import json,sys; print(json.load(sys.stdin)["blocked_packets"])'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
peak_kib() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
# Waits until the consumer's received count stops moving for 1.5 s.
settle() { local prev=-1 cur; while :; do cur=$("$@"); [ "$cur" = "$prev" ] && break; prev=$cur; sleep 1.5; done; echo "$cur"; }
egret_received() { in_ns "$E" status --json --state-dir "$TMP/state" | python3 -c 'import json,sys; m=json.load(sys.stdin)["monitor"]; print(m["loss"]["received"], m["lost"])'; }
ulogd_received() { wc -l < "$TMP/ulogd.json"; }
HZ=$(getconf CLK_TCK)

run_egret() {
  rm -rf "$TMP/state"
  (in_ns "$E" run --policy "$TMP/policy.toml" --state-dir "$TMP/state" --log-level warn > "$TMP/egret.jsonl" 2> "$TMP/egret.err" &)
  local pid=""; for _ in $(seq 100); do pid=$(cat "$TMP/state/egret.pid" 2>/dev/null || true); [ -n "$pid" ] && [ -e "$TMP/state/events.db" ] && break; sleep 0.1; done
  sleep 1
  local k0 c0 flood got
  k0=$(kernel_count); c0=$(cpu_ticks "$pid")
  flood=$(in_ns "$FLOOD" 10.77.0.2:9 "$COUNT")
  got=$(settle egret_received)
  report egret "$pid" "$k0" "$c0" "$flood" "${got% *}"
  kill "$pid"; while [ -e "/proc/$pid" ]; do sleep 0.1; done
}

run_ulogd() {
  in_ns "$E" apply "$TMP/policy.toml" >/dev/null
  rm -f "$TMP/ulogd.json"; : > "$TMP/ulogd.json"
  (in_ns ulogd -c "$TMP/ulogd.conf" > /dev/null 2>&1 &)
  local pid=""; for _ in $(seq 100); do pid=$(pgrep -f "ulogd -c $TMP/ulogd.conf" || true); [ -n "$pid" ] && break; sleep 0.1; done
  sleep 1
  local k0 c0 flood got
  k0=$(kernel_count); c0=$(cpu_ticks "$pid")
  flood=$(in_ns "$FLOOD" 10.77.0.2:9 "$COUNT")
  got=$(settle ulogd_received)
  report ulogd2 "$pid" "$k0" "$c0" "$flood" "$got"
  kill "$pid"; while [ -e "/proc/$pid" ]; do sleep 0.1; done
}

report() {
  local name=$1 pid=$2 k0=$3 c0=$4 flood=$5 got=$6 k1 c1 secs
  k1=$(kernel_count); c1=$(cpu_ticks "$pid")
  secs=$(sed 's/.*seconds=\([0-9.]*\).*/\1/' <<<"$flood")
  awk -v n="$name" -v logged=$((k1 - k0)) -v got="$got" -v cpu=$((c1 - c0)) -v hz="$HZ" -v s="$secs" -v rss="$(peak_kib "$pid")" 'BEGIN {
    c = cpu / hz; if (c <= 0) c = 1 / hz
    printf "%-7s %9d %9d %8d %9.0f %8.2f %9.2f %11.0f %9d\n", n, logged, got, logged - got, logged / s, c, c * 1e6 / got, got / c, rss }' | tee -a "$TMP/results"
}

printf '%-7s %9s %9s %8s %9s %8s %9s %11s %9s\n' consumer logged received lost offered/s cpu_s cpu_us/pkt pkts/cpu_s peak_KiB
for _ in $(seq "$ROUNDS"); do run_egret; run_ulogd; done
echo "medians:"
for n in egret ulogd2; do
  grep "^$n " "$TMP/results" | sort -k8 -n | awk -v r="$ROUNDS" 'NR == int((r + 1) / 2)'
done
