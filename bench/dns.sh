#!/usr/bin/env bash
# The DNS guard beside dnsmasq, with dnsperf (both from Debian), in one run:
#   - kernel set insert latency (examples/set_insert.rs, beside `nft add element`)
#   - cache-hit throughput: dnsperf at full speed for DURATION s (median of ROUNDS)
#   - cache-hit and cache-miss latency: dnsperf -v at a fixed rate, p50/p99
#   - resident memory after the runs
# Three namespaces it creates and deletes, traffic only between them:
#   U  upstream: dnsmasq, authoritative for NAMES names *.bench.test (TTL 3600)
#   G  egret run with [dns] on 127.0.0.1:53, forwarding to U (enforce mode)
#   D  dnsmasq as a caching forwarder on 127.0.0.1:53, forwarding to U
#   B  with BEFORE=path/to/egret: that build as a second guard, same setup,
#      in the same rounds (a before/after comparison in one run)
# It ends with the ratios to dnsmasq (and to BEFORE) and the goals' verdicts
# (issue 22: miss p50 <= 1.2x dnsmasq, miss p99 <= 1.5x dnsmasq).
#
#   sudo bash bench/dns.sh              # ROUNDS=3 DURATION=10 NAMES=1000 RATE=2000
#   sudo BEFORE=/tmp/egret-main bash bench/dns.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10} NAMES=${NAMES:-1000} RATE=${RATE:-2000} BEFORE=${BEFORE:-}
# GUARD_POLICY, BEFORE_POLICY: TOML appended to the guard's and BEFORE's
# policies, e.g. the same build with and without a feature:
#   sudo BEFORE=target/release/egret GUARD_POLICY='[novelty]' bash bench/dns.sh
GUARD_POLICY=${GUARD_POLICY:-} BEFORE_POLICY=${BEFORE_POLICY:-}
[ -z "$BEFORE" ] || [ -x "$BEFORE" ] || { echo "BEFORE=$BEFORE is not an executable" >&2; exit 1; }
command -v dnsperf >/dev/null && command -v dnsmasq >/dev/null || apt-get install -y -qq dnsperf dnsmasq-base >/dev/null
cargo build --release -q --bin egret --example set_insert
T=${CARGO_TARGET_DIR:-target}/release
E=$PWD/$T/egret
U=egret-dnsu-$$ G=egret-dnsg-$$ D=egret-dnsd-$$ B=egret-dnsb-$$ TMP=$(mktemp -d)
cleanup() {
  for ns in "$U" "$G" "$D" "$B"; do ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true; done
  sleep 0.3
  for ns in "$U" "$G" "$D" "$B"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT
for ns in "$U" "$G" "$D" "$B"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n "$U" link add ug type veth peer name gu netns "$G"
ip -n "$U" link add ud type veth peer name du netns "$D"
ip -n "$U" link add ub type veth peer name bu netns "$B"
ip -n "$U" addr add 10.53.1.1/24 dev ug; ip -n "$G" addr add 10.53.1.2/24 dev gu
ip -n "$U" addr add 10.53.2.1/24 dev ud; ip -n "$D" addr add 10.53.2.2/24 dev du
ip -n "$U" addr add 10.53.3.1/24 dev ub; ip -n "$B" addr add 10.53.3.2/24 dev bu
ip -n "$U" link set ug up; ip -n "$U" link set ud up; ip -n "$G" link set gu up; ip -n "$D" link set du up
ip -n "$U" link set ub up; ip -n "$B" link set bu up
in_ns() { local ns=$1; shift; nsenter --net=/run/netns/"$ns" -- "$@"; }
servers=(guard dnsmasq); [ -n "$BEFORE" ] && servers=(guard before dnsmasq)
ns_of() { case $1 in guard) echo "$G";; dnsmasq) echo "$D";; before) echo "$B";; esac; }

# Upstream: NAMES cached names and NAMES never-asked-before ones per server and round for the miss runs.
records=()
for i in $(seq 0 $((3 * NAMES * (ROUNDS + 1)))); do
  records+=("--host-record=n$i.bench.test,10.60.$((i / 250 % 250)).$((i % 250 + 1))")
done
(in_ns "$U" dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts --no-poll \
  --bind-interfaces --listen-address=10.53.1.1 --listen-address=10.53.2.1 --listen-address=10.53.3.1 --port=53 \
  --local-ttl=3600 --user=root --pid-file= --dns-forward-max=1000 "${records[@]}" >/dev/null 2>&1 &)
# D: dnsmasq as the local caching forwarder a user would otherwise run.
(in_ns "$D" dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts --no-poll \
  --bind-interfaces --listen-address=127.0.0.1 --port=53 --server=10.53.2.1 --cache-size=10000 \
  --dns-forward-max=1000 --user=root --pid-file= >/dev/null 2>&1 &)
# G (and B): egret run; the guard forwards to U, allowed names go into the kernel sets.
start_guard() { # NS BINARY UPSTREAM NAME [EXTRA POLICY]
  cat > "$TMP/$4.toml" <<EOF
mode = "enforce"
[dns]
listen = "127.0.0.1:53"
upstream = ["$3"]
[[allow]]
name = "bench"
hosts = ["*.bench.test"]
ports = [443]
${5:-}
EOF
  (in_ns "$1" "$2" run --policy "$TMP/$4.toml" --state-dir "$TMP/$4.state" >/dev/null 2>"$TMP/$4.err" &)
  for _ in $(seq 100); do grep -q "watching blocked egress" "$TMP/$4.err" 2>/dev/null && break; sleep 0.1; done
}
start_guard "$G" "$E" 10.53.1.1 guard "$GUARD_POLICY"
[ -z "$BEFORE" ] || start_guard "$B" "$BEFORE" 10.53.3.1 before "$BEFORE_POLICY"
sleep 0.5

echo "== kernel set insert latency (one address per transaction, with a timeout)"
# set_insert loads its own table in a namespace of its own, so the guard's is untouched.
SI=egret-dnssi-$$; ip netns add "$SI"
in_ns "$SI" "$PWD/$T/examples/set_insert" 20000 30 || true
ip netns del "$SI"

seq 0 $((NAMES - 1)) | sed 's/^/n/; s/$/.bench.test A/' > "$TMP/hits"
for who in "${servers[@]}"; do in_ns "$(ns_of "$who")" dnsperf -s 127.0.0.1 -d "$TMP/hits" -n 1 -q 20 >/dev/null; done  # warm the caches

qps() { in_ns "$1" dnsperf -s 127.0.0.1 -d "$TMP/hits" -l "$DURATION" -c 4 -q 200 | awk '/Queries per second/ {print int($4)}'; }
# dnsperf -v prints one line per answer ending in the latency (seconds).
latency() {
  in_ns "$1" dnsperf -s 127.0.0.1 -d "$2" -n 1 -Q "$RATE" -q 50 -v \
    | awk '/^> / {print $NF * 1e6}' | sort -n \
    | awk '{a[NR]=$1} END{if (NR==0) {print "- -"; exit} printf "%d %d\n", a[int(NR*0.5)+0], a[int(NR*0.99)+0]}'
}
echo "== cache hits: throughput (dnsperf, 4 clients, ${DURATION}s) and latency at ${RATE} q/s; misses: latency of first-time names"
for r in $(seq "$ROUNDS"); do
  k=0
  for who in "${servers[@]}"; do
    ns=$(ns_of "$who") k=$((k + 1))
    q=$(qps "$ns")
    read -r h50 h99 < <(latency "$ns" "$TMP/hits")
    start=$(( (3 * r + k - 1) * NAMES ))
    seq "$start" $((start + NAMES - 1)) | sed 's/^/n/; s/$/.bench.test A/' > "$TMP/miss"
    read -r m50 m99 < <(latency "$ns" "$TMP/miss")
    echo "$who $q $h50 $h99 $m50 $m99" | tee -a "$TMP/results"
  done
done
rss() { ps -o rss= -p "$(ip netns pids "$(ns_of "$1")" | head -1)" | tr -d ' '; }
median() { grep "^$1 " "$TMP/results" | awk -v c="$2" '{print $c}' | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
printf '\n%-8s %10s %12s %12s %12s %12s %10s\n' server qps hit_p50_us hit_p99_us miss_p50_us miss_p99_us rss_kib
for who in "${servers[@]}"; do
  printf '%-8s %10s %12s %12s %12s %12s %10s\n' "$who" "$(median "$who" 2)" "$(median "$who" 3)" "$(median "$who" 4)" "$(median "$who" 5)" "$(median "$who" 6)" "$(rss "$who")"
done
# Ratios per round (the servers ran one after the other within a round), then of the medians.
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{if (b > 0) printf "%.2f", a/b; else printf "-"}'; }
verdict() { awk -v r="$1" -v goal="$2" -v op="$3" 'BEGIN{ok = (op == "<=") ? r <= goal : r >= goal; print (ok ? "met" : "NOT met")}'; }
echo
for r in $(seq "$ROUNDS"); do
  read -r _ gq _ _ g50 g99 < <(grep "^guard " "$TMP/results" | sed -n "${r}p")
  read -r _ dq _ _ d50 d99 < <(grep "^dnsmasq " "$TMP/results" | sed -n "${r}p")
  echo "round $r, guard / dnsmasq: throughput $(ratio "$gq" "$dq"), miss p50 $(ratio "$g50" "$d50"), miss p99 $(ratio "$g99" "$d99")"
done
m() { median "$1" "$2"; }
tp=$(ratio "$(m guard 2)" "$(m dnsmasq 2)") m50=$(ratio "$(m guard 5)" "$(m dnsmasq 5)") m99=$(ratio "$(m guard 6)" "$(m dnsmasq 6)")
echo "medians, guard / dnsmasq: throughput $tp (goal >= 1: $(verdict "$tp" 1 ">=")), miss p50 $m50 (goal <= 1.2: $(verdict "$m50" 1.2 "<=")), miss p99 $m99 (goal <= 1.5: $(verdict "$m99" 1.5 "<="))"
if [ -n "$BEFORE" ]; then
  echo "medians, guard / before: throughput $(ratio "$(m guard 2)" "$(m before 2)"), hit p50 $(ratio "$(m guard 3)" "$(m before 3)"), hit p99 $(ratio "$(m guard 4)" "$(m before 4)"), miss p50 $(ratio "$(m guard 5)" "$(m before 5)"), miss p99 $(ratio "$(m guard 6)" "$(m before 6)")"
fi
in_ns "$G" "$E" status --state-dir "$TMP/guard.state" | grep "dns guard" || true
