#!/usr/bin/env bash
# Revalidation on block (docs/dns.md): what a program that keeps an address
# past its time sees, and how the upstream load is bounded, in one run.
#   - connect time to an address still in the rule's set (baseline)
#   - connect time to the same kind of address after the kernel forgot it:
#     with revalidation (first SYN blocked, the retry passes) and without
#   - a burst of blocked SYNs to BURST expired addresses at once: upstream
#     lookups it caused, revalidated / limited counts
# Two namespaces it creates and deletes, traffic only between them:
#   U  upstream: dnsmasq (names r$i.bench.test → 10.61.x.y, TTL 1) and a TCP
#      listener on every 10.61/16 address (AnyIP route on lo)
#   G  egret run with [dns] (ttl_floor 0s, grace 1s) and the clients
#
#   sudo bash bench/revalidate.sh          # N=30 BURST=500
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
N=${N:-30} BURST=${BURST:-500}
command -v dnsmasq >/dev/null || apt-get install -y -qq dnsmasq-base >/dev/null
cargo build --release -q --bin egret
E=$PWD/${CARGO_TARGET_DIR:-target}/release/egret
U=egret-revu-$$ G=egret-revg-$$ TMP=$(mktemp -d)
cleanup() {
  for ns in "$U" "$G"; do ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true; done
  sleep 0.3
  for ns in "$U" "$G"; do ip netns del "$ns" 2>/dev/null || true; done
  rm -rf "$TMP"
}
trap cleanup EXIT
for ns in "$U" "$G"; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
ip -n "$U" link add ug type veth peer name gu netns "$G"
ip -n "$U" addr add 10.53.1.1/24 dev ug; ip -n "$G" addr add 10.53.1.2/24 dev gu
ip -n "$U" link set ug up; ip -n "$G" link set gu up
ip -n "$U" route add local 10.61.0.0/16 dev lo
ip -n "$G" route add 10.61.0.0/16 via 10.53.1.1
in_ns() { local ns=$1; shift; nsenter --net=/run/netns/"$ns" -- "$@"; }

total=$((3 * N + BURST))
records=()
for i in $(seq 0 "$total"); do records+=("--host-record=r$i.bench.test,10.61.$((i / 250 % 250)).$((i % 250 + 1))"); done
(in_ns "$U" dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts --no-poll \
  --bind-interfaces --listen-address=10.53.1.1 --port=53 --local-ttl=1 --user=root --pid-file= \
  --dns-forward-max=1000 --log-queries --log-facility="$TMP/queries.log" "${records[@]}" >/dev/null 2>&1 &)
(in_ns "$U" python3 -c '
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.SOL_IP, 19, 1)  # IP_FREEBIND
s.bind(("0.0.0.0", 8080)); s.listen(4096)
while True:
    c, _ = s.accept(); c.close()
' >/dev/null 2>&1 &)

policy() {
  cat > "$TMP/policy.toml" <<EOF
mode = "enforce"
[dns]
listen = "127.0.0.1:53"
upstream = ["10.53.1.1"]
ttl_floor = "0s"
grace = "1s"
revalidate = $1
[[allow]]
name = "bench"
hosts = ["*.bench.test"]
ports = [8080]
EOF
}
start_egret() {
  policy "$1"
  rm -rf "$TMP/state"; : > "$TMP/egret.err"
  (in_ns "$G" "$E" run --policy "$TMP/policy.toml" --state-dir "$TMP/state" >"$TMP/events.json" 2>"$TMP/egret.err" &)
  for _ in $(seq 100); do grep -q "watching blocked egress" "$TMP/egret.err" 2>/dev/null && break; sleep 0.1; done
}
stop_egret() { ip netns pids "$G" | xargs -r kill; sleep 0.5; }

# Resolves names FIRST..LAST through the guard, waits WAIT s, then times one
# blocking connect per address (5 s timeout); prints ms per connect or "fail".
cat > "$TMP/dial.py" <<'EOF'
import socket, struct, sys, time
first, last, wait = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
def resolve(name):
    q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
    s.sendto(q, ("127.0.0.1", 53)); r = s.recv(512)
    return socket.inet_ntoa(r[-4:])
addrs = [resolve(f"r{i}.bench.test") for i in range(first, last + 1)]
time.sleep(wait)
for a in addrs:
    t = time.monotonic()
    try:
        socket.create_connection((a, 8080), timeout=5).close()
        print(f"{(time.monotonic() - t) * 1000:.1f}")
    except OSError:
        print("fail")
EOF
stats() { sort -n | awk '$1 != "fail" {a[++n]=$1} $1 == "fail" {f++} END {if (n) printf "ok %d/%d  p50 %.1f ms  p95 %.1f ms\n", n, n+f, a[int(n*0.5)+1], a[int(n*0.95)+1]; else printf "ok 0/%d\n", f}'; }

start_egret true
echo "== connect to an address still in the set (resolved just before)"
in_ns "$G" python3 "$TMP/dial.py" 0 $((N - 1)) 0 | stats
echo "== connect to an address the kernel forgot (TTL 1 s + grace 1 s, waited 4 s), revalidate = true"
in_ns "$G" python3 "$TMP/dial.py" "$N" $((2 * N - 1)) 4 | stats
stop_egret
start_egret false
echo "== the same, revalidate = false"
in_ns "$G" python3 "$TMP/dial.py" $((2 * N)) $((3 * N - 1)) 4 | stats
stop_egret

start_egret true
echo "== a burst: $BURST expired addresses get one SYN each at once"
first=$((3 * N)) last=$((3 * N + BURST - 1))
in_ns "$G" python3 - "$first" "$last" <<'EOF'
import socket, struct, sys, time
first, last = int(sys.argv[1]), int(sys.argv[2])
def resolve(name):
    q = struct.pack(">HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)
    s.sendto(q, ("127.0.0.1", 53)); return socket.inet_ntoa(s.recv(512)[-4:])
addrs = [resolve(f"r{i}.bench.test") for i in range(first, last + 1)]
time.sleep(4)
socks = []
for a in addrs:
    s = socket.socket(); s.setblocking(False)
    try: s.connect((a, 8080))
    except BlockingIOError: pass
    socks.append(s)
time.sleep(6)
EOF
before=$(grep -c "query\[A\] r" "$TMP/queries.log" || true)
sleep 1
in_ns "$G" "$E" status --state-dir "$TMP/state" --json > "$TMP/status.json"
python3 - "$TMP/status.json" "$BURST" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1])); burst = int(sys.argv[2])
r = (s.get("monitor") or {}).get("dns_guard", {}).get("revalidation", {})
print(f"revalidations started {r.get('started')}, revalidated {r.get('revalidated')}, limited {r.get('limited')}, "
      f"upstream lookups {r.get('lookups')} for {burst} blocked addresses (cap: 40 at once, then 20/s)")
EOF
echo "(upstream A queries seen by dnsmasq in all, resolves included: $before)"
stop_egret
