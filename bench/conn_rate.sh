#!/usr/bin/env bash
# New TCP connections per second from namespace A to a server in namespace B
# (veth pair, 10.1.0.1 -> 10.1.0.2:5201), with the firewall in A's output path:
#   none        no ruleset at all (no conntrack either)
#   egret-1     egret, one allowed entry (the stateful baseline)
#   egret-100k  egret, 100,000 allowed entries (random /24s and /32s, the server last in sort order)
#   ipt-10k     iptables (Debian's default, iptables-nft), one ACCEPT rule per entry,
#               10,000 entries with the server's rule last, as ufw generates them
# Interleaved rounds; median of ROUNDS (default 3) runs of DURATION seconds (default 5).
# Runs in namespaces it creates and deletes; traffic only between them.
#
#   sudo bash bench/conn_rate.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
ROUNDS=${ROUNDS:-3} SECONDS_PER_RUN=${DURATION:-5} THREADS=${THREADS:-2}
command -v iptables-restore >/dev/null && command -v nft >/dev/null || apt-get install -y -qq iptables nftables >/dev/null
cargo build --release -q --bin egret --example conn_rate
T=${CARGO_TARGET_DIR:-target}/release
E=$PWD/$T/egret LOAD=$PWD/$T/examples/conn_rate
A=egret-cr-a-$$ B=egret-cr-b-$$ TMP=$(mktemp -d)
cleanup() {
  for ns in "$A" "$B"; do ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true; done
  sleep 0.2; ip netns del "$A" 2>/dev/null || true; ip netns del "$B" 2>/dev/null || true; rm -rf "$TMP"
}
trap cleanup EXIT
ip netns add "$A"; ip netns add "$B"
ip -n "$A" link add va type veth peer name vb netns "$B"
ip -n "$A" addr add 10.1.0.1/24 dev va; ip -n "$B" addr add 10.1.0.2/24 dev vb
for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
ip -n "$A" link set va up; ip -n "$B" link set vb up
in_a() { nsenter --net=/run/netns/"$A" -- "$@"; }
in_b() { nsenter --net=/run/netns/"$B" -- "$@"; }
(in_b "$LOAD" server 10.1.0.2:5201 "$THREADS" > "$TMP/server.out" &) 2>/dev/null
for _ in $(seq 50); do grep -q listening "$TMP/server.out" 2>/dev/null && break; sleep 0.1; done

python3 - "$TMP" <<'PY'
import random, sys
random.seed(7)
nets = set()
while len(nets) < 100000 - 1:
    a, b, c = random.randrange(11, 223), random.randrange(256), random.randrange(256)
    if a == 127:
        continue
    nets.add(f"{a}.{b}.{c}.0/24" if len(nets) % 2 else f"{a}.{b}.{c}.{random.randrange(1, 255)}")
nets = sorted(nets)
tail = '\nprotocol = "tcp"\nports = [5201]\n'
with open(f"{sys.argv[1]}/egret-100k.toml", "w") as f:
    f.write('mode = "enforce"\n[[allow]]\nname = "bulk"' + tail + 'cidrs = [\n' + ",\n".join(f'"{x}"' for x in nets + ["10.1.0.2"]) + "\n]\n")
with open(f"{sys.argv[1]}/egret-1.toml", "w") as f:
    f.write('mode = "enforce"\n[[allow]]\nname = "one"' + tail + 'cidrs = ["10.1.0.2"]\n')
with open(f"{sys.argv[1]}/ipt-10k.rules", "w") as f:
    f.write("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT DROP [0:0]\n")
    f.write("-A OUTPUT -o lo -j ACCEPT\n-A OUTPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n")
    for n in nets[:9999] + ["10.1.0.2"]:
        f.write(f"-A OUTPUT -d {n} -p tcp -m tcp --dport 5201 -j ACCEPT\n")
    f.write("COMMIT\n")
PY

load() {
  case $1 in
    none) ;;
    egret-*) in_a "$E" apply "$TMP/$1.toml" >/dev/null ;;
    ipt-10k) in_a iptables-restore < "$TMP/ipt-10k.rules" ;;
  esac
}
unload() { in_a nft flush ruleset; }
measure() { in_a "$LOAD" client 10.1.0.2:5201 "$SECONDS_PER_RUN" "$THREADS" | tee -a "$TMP/client.log" | awk '{print $1}'; }

SETUPS="none egret-1 egret-100k ipt-10k"
echo "iptables: $(in_a iptables --version)"
for r in $(seq "$ROUNDS"); do
  for s in $SETUPS; do
    load "$s"; rate=$(measure); unload
    echo "$s $rate" | tee -a "$TMP/results"
  done
done
median() { grep "^$1 " "$TMP/results" | awk '{print $2}' | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
none=$(median none)
printf '\n%-11s %10s %12s\n' setup conn/s vs_none
for s in $SETUPS; do
  m=$(median "$s"); printf '%-11s %10s %12s\n' "$s" "$m" "$(awk -v a="$m" -v b="$none" 'BEGIN{printf "%.2f", a/b}')"
done
e1=$(median egret-1) e100=$(median egret-100k) ipt=$(median ipt-10k)
awk -v a="$e100" -v b="$e1" -v c="$ipt" 'BEGIN{printf "\negret-100k / egret-1 = %.2f (goal >= 0.95)\negret-100k / ipt-10k = %.1f (goal >= 10)\n", a/b, a/c}'
