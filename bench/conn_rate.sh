#!/usr/bin/env bash
# New TCP connections per second from namespace A to a server in namespace B
# (veth pair, 10.1.0.1 -> 10.1.0.2:5201), with the firewall in A's output path:
#   none        no ruleset at all (no conntrack either)
#   egret-1     egret, one allowed entry (the stateful baseline)
#   egret-100k  egret, 100,000 allowed entries (random /24s and /32s, the server last in sort order)
#   ipt-10k     iptables (Debian's default, iptables-nft), one ACCEPT rule per entry,
#               10,000 entries with the server's rule last, as ufw generates them
# Interleaved rounds; median of ROUNDS (default 3) runs of DURATION seconds (default 5).
# Also what each ruleset adds to one new connection over no firewall,
# 1/rate - 1/rate_none, both from the same round (then the median of the rounds).
# Runs in namespaces it creates and deletes; traffic only between them.
#
#   sudo bash bench/conn_rate.sh      # ROUNDS=3 DURATION=5 THREADS=2
# ADDR_FIRST=1 adds egret-100k-af: egret-100k with its rule on the address
# set (hash) moved by hand (nft) before its rule on the range set (interval),
# to see what the rule order costs a connection to a single address.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
ROUNDS=${ROUNDS:-3} SECONDS_PER_RUN=${DURATION:-5} THREADS=${THREADS:-2}
command -v iptables-restore >/dev/null && command -v nft >/dev/null || apt-get install -y -qq iptables nftables >/dev/null
cargo build --release -q --bin egret --example conn_rate
T=${CARGO_TARGET_DIR:-target}/release
E=$PWD/$T/egret LOAD=$PWD/$T/examples/conn_rate
. "$(dirname "$0")/lib/conn_lab.sh"
conn_lab cr

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
    egret-100k-af)
      in_a "$E" apply "$TMP/egret-100k.toml" >/dev/null
      local h rule
      h=$(in_a nft -a list chain inet egret output | awk '/@a_bulk_v4 / {print $NF}')
      rule=$(in_a nft list chain inet egret output | grep '@a_bulk_v4 ' | sed 's/^[[:space:]]*//')
      in_a nft delete rule inet egret output handle "$h"
      h=$(in_a nft -a list chain inet egret output | awk '/@a_bulk_v4_addr / {print $NF}')
      echo "add rule inet egret output position $h $rule" | in_a nft -f - ;;
    egret-*) in_a "$E" apply "$TMP/$1.toml" >/dev/null ;;
    ipt-10k) in_a iptables-restore < "$TMP/ipt-10k.rules" ;;
  esac
}
unload() { in_a nft flush ruleset; }
measure() { in_a "$LOAD" client 10.1.0.2:5201 "$SECONDS_PER_RUN" "$THREADS" | tee -a "$TMP/client.log" | awk '{print $1}'; }

SETUPS="none egret-1 egret-100k ipt-10k"
[ "${ADDR_FIRST:-0}" = 1 ] && SETUPS="$SETUPS egret-100k-af"
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
# The firewall's own cost per new connection, in µs: 1/rate - 1/rate_none with
# both rates from the same round, median of the rounds (and each round listed).
awk '{r[$1, ++n[$1]] = $2} END {
  for (i = 1; i <= n["none"]; i++) for (s in n) if (s != "none" && r[s, i] > 0 && r["none", i] > 0)
    printf "%s %d %.2f\n", s, i, 1e6 / r[s, i] - 1e6 / r["none", i]
}' "$TMP/results" > "$TMP/added"
added() { awk -v s="$1" '$1 == s {print $3}' "$TMP/added" | sort -g | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
printf '\n%-11s %12s   %s\n' setup "µs added" "(per round)"
for s in ${SETUPS#none }; do
  printf '%-11s %12s   %s\n' "$s" "$(added "$s")" "$(awk -v s="$s" '$1 == s {printf "%s%s", (k++ ? " " : ""), $3}' "$TMP/added")"
done
awk '{a[$1, $2] = $3; if ($2 > n) n = $2} END {
  for (i = 1; i <= n; i++)
    printf "round %d: egret-100k / egret-1 %.2f, ipt-10k / egret-100k %.1f\n", i,
      (a["egret-1", i] > 0 ? a["egret-100k", i] / a["egret-1", i] : 0), (a["egret-100k", i] > 0 ? a["ipt-10k", i] / a["egret-100k", i] : 0)
}' "$TMP/added"
awk -v a="$(added egret-100k)" -v b="$(added egret-1)" -v c="$(added ipt-10k)" 'BEGIN{
  printf "medians: added by egret-100k / added by egret-1 = %s (goal <= 1.2)\n", (b > 0 ? sprintf("%.2f", a / b) : "n/a")
  printf "         added by ipt-10k / added by egret-100k = %s (goal >= 20)\n", (a > 0 ? sprintf("%.1f", c / a) : "n/a")}'
if [ "${ADDR_FIRST:-0}" = 1 ]; then
  awk -v a="$(added egret-100k-af)" -v b="$(added egret-1)" 'BEGIN{
    printf "         added by egret-100k-af / added by egret-1 = %s\n", (b > 0 ? sprintf("%.2f", a / b) : "n/a")}'
fi
