#!/usr/bin/env bash
# The cost of the proxy's per-connection identity check (a `users` rule: the
# client socket looked up by sock_diag and /proc for every new client
# connection, never from a cache), side by side with the same rule without
# `users` (no lookup), in one egret process switched by reload:
#   - new connections: examples/proxy_load.rs connect (CONNECT, one GET
#     through the tunnel, close), tunnels/s and proxy CPU per tunnel
#   - keep-alive: ab -k through the proxy (plain HTTP), requests/s and CPU
#     per request (one lookup per client connection, reused by its requests)
# Namespaces it creates and deletes: S (nginx on 198.51.100.10, dnsmasq) and
# PE (egret, the clients), joined by a veth.
#
#   sudo bash bench/proxy_identity.sh      # ROUNDS=3 DURATION=10 THREADS=8
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10} THREADS=${THREADS:-8}
for c in ab:apache2-utils nginx:nginx-light dnsmasq:dnsmasq-base; do
  command -v "${c%%:*}" >/dev/null || { echo "needs ${c#*:}" >&2; exit 1; }
done
ulimit -n "$(ulimit -Hn)"
cargo build --release -q --bin egret --example proxy_load
T=${CARGO_TARGET_DIR:-target}/release
E=$PWD/$T/egret LOAD=$PWD/$T/examples/proxy_load
S=egret-pi-s-$$ PE=egret-pi-e-$$ TMP=$(mktemp -d)
cleanup() {
  for ns in "$PE" "$S"; do ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true; done
  sleep 0.5
  for ns in "$PE" "$S"; do ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true; ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT
in_ns() { local ns=$1; shift; nsenter --net=/run/netns/"$ns" -- "$@"; }
for ns in "$S" "$PE"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n "$S" addr add 198.51.100.10/32 dev lo
ip -n "$S" link add s1 type veth peer name p netns "$PE"
ip -n "$S" addr add 10.56.1.1/24 dev s1; ip -n "$S" link set s1 up
ip -n "$PE" addr add 10.56.1.2/24 dev p; ip -n "$PE" link set p up
ip -n "$PE" route add 198.51.100.0/24 via 10.56.1.1

mkdir -p "$TMP/nginx"
cat > "$TMP/nginx.conf" <<EOC
worker_processes 1;
error_log $TMP/nginx/error.log crit;
pid $TMP/nginx/nginx.pid;
events { worker_connections 20000; }
http {
  access_log off;
  client_body_temp_path $TMP/nginx; proxy_temp_path $TMP/nginx; fastcgi_temp_path $TMP/nginx;
  uwsgi_temp_path $TMP/nginx; scgi_temp_path $TMP/nginx;
  keepalive_requests 10000000; keepalive_timeout 600s;
  server { listen 198.51.100.10:80 backlog=4096; location / { return 200 "hello\n"; } }
}
EOC
(in_ns "$S" nginx -c "$TMP/nginx.conf" -g 'daemon off;' &) 2>/dev/null
(in_ns "$S" dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts --bind-interfaces \
  --listen-address=10.56.1.1 --port=53 --user=root --pid-file= --local-ttl=3600 \
  --host-record=bench.test,198.51.100.10 >/dev/null 2>&1 &)

policy() { # $1: extra line for the rule ("" or users = ...)
  cat > "$TMP/policy.toml" <<EOC
mode = "enforce"
[dns]
upstream = ["10.56.1.1"]
[proxy]
listen = "127.0.0.1:3128"
max_connections = 30000
max_per_client = 30000
[[allow]]
name = "bench"
hosts = ["bench.test"]
via = "proxy"
ports = [80]
$1
EOC
}
policy ""
(in_ns "$PE" "$E" run --policy "$TMP/policy.toml" --state-dir "$TMP/state" >/dev/null 2>"$TMP/egret.err" &)
sleep 3
pid=$(ip netns pids "$PE" | xargs -r ps -o pid=,comm= -p | awk '$2 == "egret" {print $1}' | head -1)
in_ns "$PE" curl -s -m 5 -o /dev/null -w "%{http_code}" -x http://127.0.0.1:3128 http://bench.test/ | grep -q 200 \
  || { echo "proxy not answering"; cat "$TMP/egret.err"; exit 1; }
cpu_ticks() { awk '{print $14 + $15}' /proc/"$pid"/stat; }
tick=$(getconf CLK_TCK)
switch() { # reload with the rule with or without users, wait for it
  policy "$1"; local n; n=$(grep -c reloaded "$TMP/egret.err" || true)
  kill -HUP "$pid"
  for _ in $(seq 100); do [ "$(grep -c reloaded "$TMP/egret.err" || true)" -gt "$n" ] && return; sleep 0.1; done
  echo "no reload"; exit 1
}
run_connect() { in_ns "$PE" "$LOAD" connect 127.0.0.1:3128 bench.test:80 "$DURATION" "$THREADS" 2>>"$TMP/load.err" | awk '{print $1, $3, $5}' | tr -d '(' ; }
run_http() { in_ns "$PE" ab -q -k -c "$THREADS" -t "$DURATION" -n 100000000 -X 127.0.0.1:3128 http://bench.test/ 2>/dev/null \
  | awk '/Requests per second/ {rps=$4} /Complete requests/ {n=$3} END {print int(rps), n}'; }
echo "check          new-conn/s  us-CPU/conn  failed  keepalive-req/s  us-CPU/req"
for r in $(seq "$ROUNDS"); do
  for check in none users; do
    if [ $check = users ]; then switch 'users = ["root"]'; else switch ""; fi
    c0=$(cpu_ticks); read -r crate cn cfail < <(run_connect); c1=$(cpu_ticks)
    read -r hrate hn < <(run_http); c2=$(cpu_ticks)
    cus=$(awk -v t=$((c1 - c0)) -v n="$cn" -v k="$tick" 'BEGIN{printf "%.1f", n ? t / k / n * 1e6 : 0}')
    hus=$(awk -v t=$((c2 - c1)) -v n="$hn" -v k="$tick" 'BEGIN{printf "%.1f", n ? t / k / n * 1e6 : 0}')
    printf "%-14s %10s  %11s  %6s  %15s  %10s\n" "$check" "$crate" "$cus" "$cfail" "$hrate" "$hus"
  done
done
