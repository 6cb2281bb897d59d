#!/usr/bin/env bash
# egret's CONNECT tunnel beside HAProxy (Debian's, TCP mode, `option
# splice-auto`), relaying the same pull from the same namespace through the
# same firewall, with a direct connection as the ceiling. One run, rounds
# interleaved (the order rotates each round), medians and per-round ratios:
#   - throughput of a BYTES pull (examples/proxy_load.rs pull), and the relay
#     process's CPU seconds per GB (user+system, /proc/PID/stat)
#   - new tunnels per second (egret: CONNECT + one HTTP/1.0 GET, close;
#     HAProxy: connect + the same GET: it needs no CONNECT), CPU per tunnel
# Namespaces it creates and deletes: S (nginx, dnsmasq, a byte source on
# 198.51.100.10) and P, joined by a veth. In P: `egret run` enforcing its
# ruleset (so both connections of either relay go through conntrack and the
# same rules), its proxy on 127.0.0.1:3128, and HAProxy on 127.0.0.1:3129
# (-> 198.51.100.10:9000) and :3180 (-> :80). Clients run in P.
#
#   sudo bash bench/relay.sh    # ROUNDS=5 BYTES=2000000000 DURATION=5 THREADS=8 EGRET_THREADS=1 HAPROXY_THREADS=1
# HAPROXY_SPLICE="splice-request splice-response" makes HAProxy splice every
# transfer (splice-auto, the default, splices only when it expects a gain).
# STRACE=1 adds one pull per relay under `strace -c -f` (system calls per MB).
# EGRET=path runs another egret binary; EGRET_B=path runs a second build beside
# the first (in namespace P2, a copy of P with its own veth), as relay
# "egret-b", interleaved with the others: an A/B of a change in one run.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
ROUNDS=${ROUNDS:-5} BYTES=${BYTES:-2000000000} DURATION=${DURATION:-5} THREADS=${THREADS:-8}
EGRET_THREADS=${EGRET_THREADS:-1} HAPROXY_THREADS=${HAPROXY_THREADS:-1} STRACE=${STRACE:-0}
HAPROXY_SPLICE=${HAPROXY_SPLICE:-splice-auto}
need=()
for c in haproxy:haproxy nginx:nginx-light dnsmasq:dnsmasq-base; do
  command -v "${c%%:*}" >/dev/null || need+=("${c#*:}")
done
[ "$STRACE" = 1 ] && { command -v strace >/dev/null || need+=(strace); }
if [ ${#need[@]} -gt 0 ]; then
  # Install without starting the packages' services on this machine.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi
cargo build --release -q --bin egret --example proxy_load
T=${CARGO_TARGET_DIR:-target}/release
E=${EGRET:-$PWD/$T/egret} LOAD=$PWD/$T/examples/proxy_load
S=egret-rl-s-$$ P=egret-rl-p-$$ P2=egret-rl-q-$$ TMP=$(mktemp -d) EGRET_B=${EGRET_B:-}
chmod 755 "$TMP"
cleanup() {
  for ns in "$P" "$P2" "$S"; do ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true; done
  sleep 0.5
  for ns in "$P" "$P2" "$S"; do ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true; ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT
in_ns() { local ns=$1; shift; nsenter --net=/run/netns/"$ns" -- "$@"; }
for ns in "$S" "$P"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n "$S" addr add 198.51.100.10/32 dev lo
ip -n "$S" link add s1 type veth peer name p netns "$P"
ip -n "$S" addr add 10.56.1.1/24 dev s1; ip -n "$S" link set s1 up
ip -n "$P" addr add 10.56.1.2/24 dev p; ip -n "$P" link set p up
ip -n "$P" route add 198.51.100.0/24 via 10.56.1.1
if [ -n "$EGRET_B" ]; then
  ip netns add "$P2"; ip -n "$P2" link set lo up
  ip -n "$S" link add s2 type veth peer name p netns "$P2"
  ip -n "$S" addr add 10.56.2.1/24 dev s2; ip -n "$S" link set s2 up
  ip -n "$P2" addr add 10.56.2.2/24 dev p; ip -n "$P2" link set p up
  ip -n "$P2" route add 198.51.100.0/24 via 10.56.2.1
fi

mkdir -p "$TMP/nginx"
cat > "$TMP/nginx.conf" <<EOF
worker_processes 1;
error_log $TMP/nginx/error.log crit;
pid $TMP/nginx/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $TMP/nginx; proxy_temp_path $TMP/nginx; fastcgi_temp_path $TMP/nginx;
  uwsgi_temp_path $TMP/nginx; scgi_temp_path $TMP/nginx;
  server { listen 198.51.100.10:80 backlog=4096; location / { return 200 "hello\n"; } }
}
EOF
(in_ns "$S" nginx -c "$TMP/nginx.conf" -g 'daemon off;' &) 2>/dev/null
(in_ns "$S" dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts --bind-interfaces \
  --listen-address=10.56.1.1 $([ -n "$EGRET_B" ] && echo --listen-address=10.56.2.1) --port=53 --user=root --pid-file= --local-ttl=3600 \
  --host-record=bench.test,198.51.100.10 >/dev/null 2>&1 &)
(in_ns "$S" "$LOAD" source 198.51.100.10:9000 >/dev/null &) 2>/dev/null

# egret's proxy reaches bench.test by name (rule "bench"); HAProxy and the
# direct pull reach its address (rule "direct"). Same namespace, same ruleset.
cat > "$TMP/policy.toml" <<EOF
mode = "enforce"
[dns]
upstream = ["10.56.1.1"]
[proxy]
listen = "127.0.0.1:3128"
threads = $EGRET_THREADS
[[allow]]
name = "bench"
hosts = ["bench.test"]
via = "proxy"
ports = [80, 9000]
[[allow]]
name = "direct"
cidrs = ["198.51.100.10"]
ports = [80, 9000]
EOF
(in_ns "$P" "$E" run --policy "$TMP/policy.toml" --state-dir "$TMP/state" >/dev/null 2>"$TMP/egret.err" &)
if [ -n "$EGRET_B" ]; then
  sed 's/10.56.1.1/10.56.2.1/' "$TMP/policy.toml" > "$TMP/policy-b.toml"
  (in_ns "$P2" "$EGRET_B" run --policy "$TMP/policy-b.toml" --state-dir "$TMP/state-b" >/dev/null 2>"$TMP/egret-b.err" &)
fi

cat > "$TMP/haproxy.cfg" <<EOF
global
  nbthread $HAPROXY_THREADS
  maxconn 4000
  user nobody
  group nogroup
defaults
  mode tcp
$(for o in $HAPROXY_SPLICE; do echo "  option $o"; done)
  timeout connect 5s
  timeout client 600s
  timeout server 600s
listen pull
  bind 127.0.0.1:3129
  server source 198.51.100.10:9000
listen web
  bind 127.0.0.1:3180
  server nginx 198.51.100.10:80
EOF
(in_ns "$P" haproxy -db -f "$TMP/haproxy.cfg" >/dev/null 2>"$TMP/haproxy.err" &)

pid_of() { ip netns pids "${2:-$P}" | xargs -r ps -o pid=,comm= -p | awk -v c="$1" '$2 == c {print $1}' | sort -n | head -1; }
for _ in $(seq 100); do
  in_ns "$P" curl -s -m 2 -o /dev/null -w "%{http_code}" -x http://127.0.0.1:3128 http://bench.test/ 2>/dev/null | grep -q 200 \
    && in_ns "$P" curl -s -m 2 -o /dev/null -w "%{http_code}" http://127.0.0.1:3180/ 2>/dev/null | grep -q 200 && break
  sleep 0.1
done
in_ns "$P" curl -s -m 2 -o /dev/null -w "%{http_code}" http://127.0.0.1:3180/ | grep -q 200 \
  && in_ns "$P" curl -s -m 2 -o /dev/null -w "%{http_code}" -x http://127.0.0.1:3128 http://bench.test/ | grep -q 200 \
  || { echo "a relay is not answering"; cat "$TMP"/*.err; exit 1; }
EPID=$(pid_of "$(basename "$E" | cut -c1-15)") HPID=$(pid_of haproxy) BPID=0
if [ -n "$EGRET_B" ]; then
  for _ in $(seq 100); do
    in_ns "$P2" curl -s -m 2 -o /dev/null -w "%{http_code}" -x http://127.0.0.1:3128 http://bench.test/ 2>/dev/null | grep -q 200 && break
    sleep 0.1
  done
  in_ns "$P2" curl -s -m 2 -o /dev/null -w "%{http_code}" -x http://127.0.0.1:3128 http://bench.test/ | grep -q 200 \
    || { echo "egret-b is not answering"; cat "$TMP"/egret-b.err; exit 1; }
  BPID=$(pid_of "$(basename "$EGRET_B" | cut -c1-15)" "$P2")
fi
tick=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' /proc/"$1"/stat; }
busy() { awk '/^cpu / {print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }
echo "$(haproxy -v | head -1); egret $("$E" --version 2>/dev/null || echo "(version?)"); load average $(cut -d' ' -f1-3 /proc/loadavg)"

pull() { # who -> "MB/s relay_cpu_s_per_GB cores_busy%"
  local pid=0 out b0 a0 b1 a1 c0=0 c1=0
  case $1 in egret) pid=$EPID ;; haproxy) pid=$HPID ;; egret-b) pid=$BPID ;; esac
  read -r b0 a0 < <(busy); [ "$pid" != 0 ] && c0=$(cpu_ticks "$pid")
  case $1 in
    direct) out=$(in_ns "$P" "$LOAD" pull 198.51.100.10:9000 "$BYTES") ;;
    egret) out=$(in_ns "$P" "$LOAD" pull 127.0.0.1:3128 bench.test:9000 "$BYTES") ;;
    haproxy) out=$(in_ns "$P" "$LOAD" pull 127.0.0.1:3129 "$BYTES") ;;
    egret-b) out=$(in_ns "$P2" "$LOAD" pull 127.0.0.1:3128 bench.test:9000 "$BYTES") ;;
  esac
  read -r b1 a1 < <(busy); [ "$pid" != 0 ] && c1=$(cpu_ticks "$pid")
  echo "$(echo "$out" | awk '{print $1}') $(awk -v c=$((c1 - c0)) -v k="$tick" -v b="$BYTES" 'BEGIN{printf "%.3f", c / k / (b / 1e9)}') $(( 100 * (b1 - b0) / (a1 - a0) ))"
}
rate() { # who -> "tunnels/s relay_cpu_us_per_tunnel"
  local pid=0 out c0=0 c1=0
  case $1 in egret) pid=$EPID ;; haproxy) pid=$HPID ;; egret-b) pid=$BPID ;; esac
  [ "$pid" != 0 ] && c0=$(cpu_ticks "$pid")
  case $1 in
    direct) out=$(in_ns "$P" "$LOAD" tcp 198.51.100.10:80 bench.test "$DURATION" "$THREADS" 2>>"$TMP/load.err") ;;
    egret) out=$(in_ns "$P" "$LOAD" connect 127.0.0.1:3128 bench.test:80 "$DURATION" "$THREADS" 2>>"$TMP/load.err") ;;
    haproxy) out=$(in_ns "$P" "$LOAD" tcp 127.0.0.1:3180 bench.test "$DURATION" "$THREADS" 2>>"$TMP/load.err") ;;
    egret-b) out=$(in_ns "$P2" "$LOAD" connect 127.0.0.1:3128 bench.test:80 "$DURATION" "$THREADS" 2>>"$TMP/load.err") ;;
  esac
  [ "$pid" != 0 ] && c1=$(cpu_ticks "$pid")
  local n; n=$(echo "$out" | awk '{print $3}' | tr -d '(')
  echo "$(echo "$out" | awk '{print $1}') $(awk -v c=$((c1 - c0)) -v k="$tick" -v n="$n" 'BEGIN{printf "%.1f", n ? c / k / n * 1e6 : 0}')"
}

WHO=(direct egret haproxy)
[ -n "$EGRET_B" ] && WHO+=(egret-b)
K=${#WHO[@]}
for r in $(seq "$ROUNDS"); do
  for i in $(seq 0 $((K - 1))); do
    who=${WHO[$(( (i + r) % K ))]}
    echo "pull $r $who $(pull "$who")" | tee -a "$TMP/results"
  done
  for i in $(seq 0 $((K - 1))); do
    who=${WHO[$(( (i + r) % K ))]}
    echo "rate $r $who $(rate "$who")" | tee -a "$TMP/results"
  done
done
# median KIND WHO COLUMN
median() { awk -v k="$1" -v w="$2" -v c="$3" '$1 == k && $3 == w {print $c}' "$TMP/results" | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
# per-round ratio A / B (default egret / haproxy) of KIND's COLUMN, listed
ratios() { awk -v k="$1" -v c="$2" -v a="${3:-egret}" -v b="${4:-haproxy}" '$1 == k && $3 == a {e[$2]=$c} $1 == k && $3 == b {h[$2]=$c}
  END {for (r = 1; r in e; r++) printf "%s%.2f", (r > 1 ? ", " : ""), (h[r] ? e[r] / h[r] : 0)}' "$TMP/results"; }
printf '\n%-8s %10s %8s %12s %11s %12s %14s\n' relay MB/s vs_direct cpu_s_per_GB cores_busy tunnels/s cpu_us/tunnel
for who in "${WHO[@]}"; do
  printf '%-8s %10s %8s %12s %10s%% %12s %14s\n' "$who" "$(median pull "$who" 4)" \
    "$(awk -v a="$(median pull "$who" 4)" -v b="$(median pull direct 4)" 'BEGIN{printf "%.2f", a / b}')" \
    "$(median pull "$who" 5)" "$(median pull "$who" 6)" "$(median rate "$who" 4)" "$(median rate "$who" 5)"
done
echo "egret / haproxy per round: throughput $(ratios pull 4); cpu per GB $(ratios pull 5); tunnels/s $(ratios rate 4); cpu per tunnel $(ratios rate 5)"
if [ -n "$EGRET_B" ]; then
  echo "egret-b / haproxy per round: throughput $(ratios pull 4 egret-b); cpu per GB $(ratios pull 5 egret-b); tunnels/s $(ratios rate 4 egret-b); cpu per tunnel $(ratios rate 5 egret-b)"
  echo "egret / egret-b per round: throughput $(ratios pull 4 egret egret-b); cpu per GB $(ratios pull 5 egret egret-b); tunnels/s $(ratios rate 4 egret egret-b); cpu per tunnel $(ratios rate 5 egret egret-b)"
fi
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"

if [ "$STRACE" = 1 ]; then
  for who in "${WHO[@]:1}"; do
    case $who in egret) pid=$EPID ;; haproxy) pid=$HPID ;; egret-b) pid=$BPID ;; esac
    strace -c -f -p "$pid" -o "$TMP/strace.$who" & st=$!
    sleep 1
    echo "under strace: $who $(pull "$who")"
    kill -INT "$st"; wait "$st" 2>/dev/null || true
    echo "system calls of $who for $((BYTES / 1000000)) MB (calls per MB in the last column):"
    awk -v mb=$((BYTES / 1000000)) 'NR > 2 && $1 !~ /^-/ && NF >= 5 {printf "  %-16s %10s %8.2f\n", $NF, $4, $4 / mb}' "$TMP/strace.$who" | head -12
  done
fi
