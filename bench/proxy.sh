#!/usr/bin/env bash
# egret's proxy beside tinyproxy and squid (Debian's), same allowlist, same
# machine, one run:
#   - new CONNECT tunnels per second (examples/proxy_load.rs: CONNECT, one
#     HTTP/1.0 GET through the tunnel, close), and proxy CPU per tunnel
#   - keep-alive plain HTTP requests per second (ab -k -X), and CPU per request
#   - egret only: RSS with 10,000 idle tunnels; tunnel throughput vs direct
# Namespaces it creates and deletes: S (nginx, dnsmasq, a byte source on
# 198.51.100.10) and one per proxy (PE egret, PT tinyproxy, PQ squid), each
# joined to S by its own veth. Clients run beside their proxy.
#
#   sudo bash bench/proxy.sh        # ROUNDS=3 DURATION=10 THREADS=8 IDLE=10000 PEER_FIREWALL=1 EGRET_THREADS=1
# THREADS is the load's concurrency; EGRET_THREADS the proxy's `threads` setting.
# egret enforces its own egress ruleset in PE (so its two connections per
# tunnel are tracked by conntrack). A host that uses tinyproxy or squid as its
# egress control needs a default-deny egress firewall too, or the proxy could
# simply be bypassed: with PEER_FIREWALL=1 (the default) PT and PQ get what
# ufw would set up for them (iptables: loopback, established, the upstream's
# ports); PEER_FIREWALL=0 runs the peers with no firewall at all.
# Each idle tunnel takes two descriptors in the proxy: IDLE is capped to what
# the hard limit on open files allows (ulimit -Hn).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10} THREADS=${THREADS:-8} IDLE=${IDLE:-10000} PEER_FIREWALL=${PEER_FIREWALL:-1}
EGRET_THREADS=${EGRET_THREADS:-1}
ulimit -n "$(ulimit -Hn)"
max_idle=$(( ($(ulimit -n) - 500) / 2 ))
if [ "$IDLE" -gt "$max_idle" ]; then echo "note: open-file limit $(ulimit -n): $max_idle idle tunnels instead of $IDLE"; IDLE=$max_idle; fi
need=()
for c in tinyproxy:tinyproxy squid:squid ab:apache2-utils nginx:nginx-light dnsmasq:dnsmasq-base iptables-restore:iptables; do
  command -v "${c%%:*}" >/dev/null || need+=("${c#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  # Install without starting the packages' services on this machine.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi
cargo build --release -q --bin egret --example proxy_load
T=${CARGO_TARGET_DIR:-target}/release
E=$PWD/$T/egret LOAD=$PWD/$T/examples/proxy_load
S=egret-px-s-$$ PE=egret-px-e-$$ PT=egret-px-t-$$ PQ=egret-px-q-$$ TMP=$(mktemp -d)
chmod 777 "$TMP"
cleanup() {
  for ns in "$PE" "$PT" "$PQ" "$S"; do ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true; done
  sleep 0.5
  for ns in "$PE" "$PT" "$PQ" "$S"; do ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true; ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT
in_ns() { local ns=$1; shift; nsenter --net=/run/netns/"$ns" -- "$@"; }
for ns in "$S" "$PE" "$PT" "$PQ"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n "$S" addr add 198.51.100.10/32 dev lo
k=0
for ns in "$PE" "$PT" "$PQ"; do
  k=$((k + 1))
  ip -n "$S" link add "s$k" type veth peer name p netns "$ns"
  ip -n "$S" addr add "10.55.$k.1/24" dev "s$k"; ip -n "$S" link set "s$k" up
  ip -n "$ns" addr add "10.55.$k.2/24" dev p; ip -n "$ns" link set p up
  ip -n "$ns" route add 198.51.100.0/24 via "10.55.$k.1"
done
echo "198.51.100.10 bench.test" > "$TMP/hosts"

# S: nginx answering "hello", dnsmasq for egret's [dns], a byte source on :9000.
mkdir -p "$TMP/nginx"
cat > "$TMP/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile 65536;
error_log $TMP/nginx/error.log crit;
pid $TMP/nginx/nginx.pid;
events { worker_connections 40000; }
http {
  access_log off;
  client_body_temp_path $TMP/nginx; proxy_temp_path $TMP/nginx; fastcgi_temp_path $TMP/nginx;
  uwsgi_temp_path $TMP/nginx; scgi_temp_path $TMP/nginx;
  keepalive_requests 10000000; keepalive_timeout 600s; client_header_timeout 600s;
  server { listen 198.51.100.10:80 backlog=4096; location / { return 200 "hello\n"; } }
}
EOF
(in_ns "$S" nginx -c "$TMP/nginx.conf" -g 'daemon off;' &) 2>/dev/null
(in_ns "$S" dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts --bind-interfaces \
  --listen-address=10.55.1.1 --port=53 --user=root --pid-file= --local-ttl=3600 \
  --host-record=bench.test,198.51.100.10 >/dev/null 2>&1 &)
(in_ns "$S" "$LOAD" source 198.51.100.10:9000 >/dev/null &) 2>/dev/null

# PE: egret run with the proxy.
cat > "$TMP/policy.toml" <<EOF
mode = "enforce"
[dns]
upstream = ["10.55.1.1"]
[proxy]
listen = "127.0.0.1:3128"
max_connections = 30000
max_per_client = 30000
threads = $EGRET_THREADS
[[allow]]
name = "bench"
hosts = ["bench.test"]
via = "proxy"
ports = [80, 9000]
[[allow]]
name = "direct"
cidrs = ["198.51.100.10"]
ports = [9000]
EOF
(in_ns "$PE" "$E" run --policy "$TMP/policy.toml" --state-dir "$TMP/state" >/dev/null 2>"$TMP/egret.err" &)

# PT: tinyproxy, with bench.test in /etc/hosts of its own mount namespace.
echo '^bench\.test$' > "$TMP/filter"
cat > "$TMP/tinyproxy.conf" <<EOF
User nobody
Group nogroup
Port 3128
Listen 127.0.0.1
Timeout 600
MaxClients 30000
LogLevel Critical
Filter "$TMP/filter"
FilterDefaultDeny Yes
FilterType ere
ConnectPort 80
ConnectPort 9000
DisableViaHeader Yes
EOF
(in_ns "$PT" unshare -m sh -c "mount --bind $TMP/hosts /etc/hosts && exec tinyproxy -d -c $TMP/tinyproxy.conf" >/dev/null 2>"$TMP/tinyproxy.err" &)

# PQ: squid, bench.test from its own hosts file, no cache, no logs.
cat > "$TMP/squid.conf" <<EOF
http_port 127.0.0.1:3128
acl bench dstdomain bench.test
acl bench_ports port 80 9000
http_access deny !bench_ports
http_access allow bench
http_access deny all
cache deny all
cache_mem 8 MB
access_log none
cache_store_log none
cache_log $TMP/squid-cache.log
pid_filename $TMP/squid.pid
hosts_file $TMP/hosts
dns_nameservers 10.55.3.1
coredump_dir $TMP
max_filedescriptors 65536
via off
forwarded_for delete
shutdown_lifetime 1 seconds
EOF
(in_ns "$PQ" squid -N -f "$TMP/squid.conf" >/dev/null 2>"$TMP/squid.err" &)

# The peers' egress firewall, as ufw would write it (default deny outgoing,
# allow out to the upstream's ports).
if [ "$PEER_FIREWALL" = 1 ]; then
  for ns in "$PT" "$PQ"; do
    in_ns "$ns" iptables-restore <<EOF
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT DROP [0:0]
-A OUTPUT -o lo -j ACCEPT
-A OUTPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A OUTPUT -d 198.51.100.10/32 -p tcp -m multiport --dports 80,9000 -j ACCEPT
-A OUTPUT -d 10.55.0.0/16 -p udp --dport 53 -j ACCEPT
COMMIT
EOF
  done
  echo "peers behind an iptables egress policy ($(iptables --version))"
else
  echo "peers with no firewall"
fi

sleep 3
pid_of() { # the proxy's main process in namespace $1
  local comm
  case $1 in "$PE") comm=egret ;; "$PT") comm=tinyproxy ;; "$PQ") comm=squid ;; esac
  ip netns pids "$1" | xargs -r ps -o pid=,comm= -p | awk -v c="$comm" '$2 == c {print $1}' | sort -n | head -1
}
cpu_ticks() { awk '{print $14 + $15}' /proc/"$1"/stat; }
tick=$(getconf CLK_TCK)
for ns in "$PE" "$PT" "$PQ"; do
  in_ns "$ns" curl -s -m 5 -o /dev/null -w "%{http_code}" -x http://127.0.0.1:3128 http://bench.test/ | grep -q 200 \
    || { echo "proxy in $ns is not answering"; cat "$TMP"/*.err; exit 1; }
done
echo "versions: $(tinyproxy -v 2>&1 | head -1); $(squid -v | head -1)"

run_connect() { in_ns "$1" "$LOAD" connect 127.0.0.1:3128 bench.test:80 "$DURATION" "$THREADS" 2>>"$TMP/load.err" | awk '{print $1, $3}' | tr -d '(' ; }
run_http() { in_ns "$1" ab -q -k -c "$THREADS" -t "$DURATION" -n 100000000 -X 127.0.0.1:3128 http://bench.test/ 2>/dev/null \
  | awk '/Requests per second/ {rps=$4} /Complete requests/ {n=$3} END {print int(rps), n}'; }
for r in $(seq "$ROUNDS"); do
  for who in egret tinyproxy squid; do
    case $who in egret) ns=$PE ;; tinyproxy) ns=$PT ;; squid) ns=$PQ ;; esac
    pid=$(pid_of "$ns")
    c0=$(cpu_ticks "$pid"); read -r crate cn < <(run_connect "$ns"); c1=$(cpu_ticks "$pid")
    read -r hrate hn < <(run_http "$ns"); c2=$(cpu_ticks "$pid")
    cus=$(awk -v t=$((c1 - c0)) -v n="$cn" -v k="$tick" 'BEGIN{printf "%.1f", n ? t / k / n * 1e6 : 0}')
    hus=$(awk -v t=$((c2 - c1)) -v n="$hn" -v k="$tick" 'BEGIN{printf "%.1f", n ? t / k / n * 1e6 : 0}')
    echo "$who $crate $cus $hrate $hus" | tee -a "$TMP/results"
  done
done
median() { grep "^$1 " "$TMP/results" | awk -v c="$2" '{print $c}' | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
printf '\n%-10s %14s %16s %14s %16s %10s\n' proxy tunnels/s cpu_us/tunnel http_req/s cpu_us/request rss_kib
for who in egret tinyproxy squid; do
  case $who in egret) ns=$PE ;; tinyproxy) ns=$PT ;; squid) ns=$PQ ;; esac
  rss=$(awk '/VmRSS/ {print $2}' /proc/"$(pid_of "$ns")"/status)
  printf '%-10s %14s %16s %14s %16s %10s\n' $who "$(median $who 2)" "$(median $who 3)" "$(median $who 4)" "$(median $who 5)" "$rss"
done
for peer in tinyproxy squid; do
  awk -v e1="$(median egret 2)" -v p1="$(median $peer 2)" -v e2="$(median egret 4)" -v p2="$(median $peer 4)" \
      -v c1="$(median egret 3)" -v q1="$(median $peer 3)" -v c2="$(median egret 5)" -v q2="$(median $peer 5)" -v n=$peer \
    'BEGIN{printf "egret / %s: tunnels %.2fx, http %.2fx; cpu per tunnel %.2fx, per request %.2fx\n", n, e1/p1, e2/p2, c1/q1, c2/q2}'
done

echo
epid=$(pid_of "$PE")
before=$(awk '/VmRSS/ {print $2}' /proc/"$epid"/status)
exec 3> >(in_ns "$PE" "$LOAD" idle 127.0.0.1:3128 bench.test:80 "$IDLE" > "$TMP/idle.out" 2>&1)
for _ in $(seq 600); do grep -q "^ready" "$TMP/idle.out" 2>/dev/null && break; grep -q "tunnel" "$TMP/idle.out" 2>/dev/null && break; sleep 0.1; done
sleep 1
after=$(awk '/VmRSS/ {print $2}' /proc/"$epid"/status)
echo "egret with $(cat "$TMP/idle.out"): RSS $before KiB before, $after KiB with the idle tunnels ($(( (after - before) * 1024 / IDLE )) bytes per tunnel)"
exec 3>&-
sleep 1

# Tunnel throughput beside a direct connection from the same namespace, for
# each proxy (2 GB pulls, median of three), with the proxy's CPU per GB and
# how busy the machine's cores were (/proc/stat; the rest is idle).
busy() { awk '/^cpu / {print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }
for who in egret tinyproxy squid; do
  case $who in egret) ns=$PE ;; tinyproxy) ns=$PT ;; squid) ns=$PQ ;; esac
  pid=$(pid_of "$ns")
  for _ in 1 2 3; do
    d=$(in_ns "$ns" "$LOAD" pull 198.51.100.10:9000 2000000000 | awk '{print $1}')
    read -r b0 a0 < <(busy); c0=$(cpu_ticks "$pid")
    t=$(in_ns "$ns" "$LOAD" pull 127.0.0.1:3128 bench.test:9000 2000000000 | awk '{print $1}')
    read -r b1 a1 < <(busy); c1=$(cpu_ticks "$pid")
    echo "pull $who $d $t $(awk -v c=$((c1 - c0)) -v k="$tick" 'BEGIN{printf "%.2f", c / k / 2}') $(( 100 * (b1 - b0) / (a1 - a0) ))" >> "$TMP/results"
  done
done
printf '\n%-10s %12s %12s %7s %16s %11s\n' proxy direct_MB/s tunnel_MB/s ratio proxy_cpu_s/GB cores_busy
for who in egret tinyproxy squid; do
  grep "^pull $who " "$TMP/results" | sort -k4 -g | sed -n 2p \
    | awk '{printf "%-10s %12s %12s %7.2f %16s %10s%%\n", $2, $3, $4, $4 / $3, $5, $6}'
done
in_ns "$PE" "$E" status --state-dir "$TMP/state" | grep "proxy:" || true
