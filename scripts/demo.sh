#!/usr/bin/env bash
# egret in 30 seconds, safely: two throwaway network namespaces joined by a veth
# pair stand in for a server ("host") and the internet ("net"). egret's rules are
# loaded in "host" only; this machine's own firewall is never touched.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the demo creates network namespaces" >&2; exit 1; }
bash scripts/deps.sh
cargo build --release -q
EGRET=$PWD/target/release/egret
HOST=egret-demo-host-$$ NET=egret-demo-net-$$
cleanup() { ip netns pids "$NET" 2>/dev/null | xargs -r kill; ip netns del "$HOST" 2>/dev/null || true; ip netns del "$NET" 2>/dev/null || true; rm -rf "$TMP"; }
TMP=$(mktemp -d); trap cleanup EXIT
ip netns add "$HOST"; ip netns add "$NET"
ip -n "$HOST" link add veth-h type veth peer name veth-n netns "$NET"
ip -n "$HOST" addr add 10.99.0.1/24 dev veth-h; ip -n "$NET" addr add 10.99.0.2/24 dev veth-n
for ns in "$HOST" "$NET"; do ip -n "$ns" link set lo up; done
ip -n "$HOST" link set veth-h up; ip -n "$NET" link set veth-n up
in_host() { nsenter --net=/run/netns/"$HOST" -- "$@"; }
for port in 443 1389; do
  nsenter --net=/run/netns/"$NET" -- /usr/bin/python3 tests/support/peer.py tcp-server 10.99.0.2 $port >/dev/null & done
sleep 0.5
cat > "$TMP/policy.toml" <<POLICY
mode = "enforce"
[[allow]]
name = "updates"
comment = "the only place this server may talk to"
cidrs = ["10.99.0.2"]
ports = [443]
POLICY
try() { if in_host /usr/bin/python3 tests/support/peer.py tcp-connect 10.99.0.2 "$1" 2>/dev/null; then echo "  connect 10.99.0.2:$1 -> allowed"; else echo "  connect 10.99.0.2:$1 -> BLOCKED"; fi; }
echo "== egret check"; in_host "$EGRET" check "$TMP/policy.toml"
echo "== egret apply (one atomic nf_tables transaction)"; in_host "$EGRET" apply "$TMP/policy.toml"
echo "== a service fetches an update (443) and then, exploited, its LDAP payload (1389)"
try 443; try 1389
echo "== egret status"; in_host "$EGRET" status
echo "== egret remove"; in_host "$EGRET" remove
