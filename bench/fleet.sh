#!/usr/bin/env bash
# A fleet on one machine (issue 21): N `egret run` daemons (default 50), each
# in a network namespace and a UTS namespace of its own with its own host name
# (web-01 ...), enforcing one policy, shipping every event over the syslog
# sink (TCP, RFC 5424) to one real rsyslogd writing JSON lines. Everything
# runs in namespaces this script creates (and deletes): a collector namespace
# with a bridge, rsyslogd, dnsmasq (the upstream resolver) and a TCP server;
# each host on the bridge through a veth. Traffic goes only to the collector
# namespace's address and to TEST-NET-3 (blocked inside the host namespace).
#
# Workload per host, bounded: ALLOWED connections to api.fleet.test:8080 as
# nobody (a name through the DNS guard: allowed, no event), BLOCKED blocked
# connects to distinct ports of the collector's address (every host: a rule
# the policy misses), 10.77.0.1:5432 on 4 hosts in 5, 203.0.113.66:4444 on
# web-07 only (the odd one out), REFUSED refused names through the guard.
#
# Figures: events at the collector and events/s (collector's receive times),
# events lost (each host's books: kernel logged = received, lost 0; each
# incident in the host's store arrived at the collector under the host's
# name), CPU and RSS per daemon; then `egret suggest --from` the collected
# file for web-*, `egret check` of it, and `egret simulate --from` of it
# against every host's events.
#
#   sudo bash bench/fleet.sh                        # N=50 ALLOWED=20 BLOCKED=20 REFUSED=5
#   N=5 sudo -E bash bench/fleet.sh                 # a smoke run
#   EGRET=target/debug/egret N=5 sudo -E bash bench/fleet.sh
#   KEEP=/tmp/fleet sudo -E bash bench/fleet.sh     # keep the collected file and policies there
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
N=${N:-50} ALLOWED=${ALLOWED:-20} BLOCKED=${BLOCKED:-20} REFUSED=${REFUSED:-5}
[ "$N" -ge 1 ] && [ "$N" -le 250 ] || { echo "N: 1..250" >&2; exit 2; }
if [ -z "${EGRET:-}" ]; then
  cargo build --release -q --bin egret
  E=$PWD/${CARGO_TARGET_DIR:-target}/release/egret
else
  E=$(readlink -f "$EGRET")
fi
for c in rsyslogd dnsmasq dig python3 nsenter unshare setpriv; do
  command -v "$c" >/dev/null || { echo "needs $c (scripts/deps.sh)" >&2; exit 1; }
done
TMP=$(mktemp -d)
chmod 755 "$TMP"
C=egf-c$$
HOSTS=()
declare -A PID
cleanup() {
  for h in "${!PID[@]}"; do kill "${PID[$h]}" 2>/dev/null || true; done
  [ -n "${RSYSLOG:-}" ] && kill "$RSYSLOG" 2>/dev/null || true
  [ -n "${DNSMASQ:-}" ] && kill "$DNSMASQ" 2>/dev/null || true
  [ -n "${SERVER:-}" ] && kill "$SERVER" 2>/dev/null || true
  sleep 0.5
  for h in "${HOSTS[@]}"; do ip netns del "egf-$h-$$" 2>/dev/null || true; done
  ip netns del "$C" 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then mkdir -p "$KEEP" && cp "$TMP"/collected.jsonl "$TMP"/*.toml "$KEEP"/ 2>/dev/null || true; fi
  rm -rf "$TMP"
}
trap cleanup EXIT
in_ns() { local ns=$1; shift; nsenter --net="/run/netns/$ns" -- "$@"; }

# The collector namespace: bridge, rsyslogd, dnsmasq, the allowed server.
ip netns add "$C"
in_ns "$C" ip link set lo up
in_ns "$C" ip link add br0 type bridge
in_ns "$C" ip addr add 10.77.0.1/16 dev br0
in_ns "$C" ip link set br0 up
mkdir -p "$TMP/rsyslog"
cat >"$TMP/rsyslog.conf" <<EOF
global(workDirectory="$TMP/rsyslog" maxMessageSize="64k")
module(load="imtcp")
input(type="imtcp" address="10.77.0.1" port="6514")
module(load="mmpstrucdata")
template(name="json" type="string" string="%jsonmesg%\n")
if \$app-name == "egret" then {
  action(type="mmpstrucdata")
  action(type="omfile" file="$TMP/collected.jsonl" template="json")
}
EOF
in_ns "$C" rsyslogd -N1 -f "$TMP/rsyslog.conf" >/dev/null
nsenter --net="/run/netns/$C" -- rsyslogd -n -f "$TMP/rsyslog.conf" -i "$TMP/rsyslogd.pid" >"$TMP/rsyslogd.log" 2>&1 &
RSYSLOG=$!
nsenter --net="/run/netns/$C" -- dnsmasq --keep-in-foreground --conf-file=/dev/null --no-resolv --no-hosts --no-poll \
  --bind-interfaces --listen-address=10.77.0.1 --user=root --pid-file= --local-ttl=600 \
  --host-record=api.fleet.test,10.77.0.1 >/dev/null 2>&1 &
DNSMASQ=$!
nsenter --net="/run/netns/$C" -- python3 -c '
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("10.77.0.1", 8080)); s.listen(1024)
while True:
    c, _ = s.accept(); c.close()
' >/dev/null 2>&1 &
SERVER=$!

cat >"$TMP/policy.toml" <<EOF
mode = "enforce"

[dns]
listen = "127.0.0.1:53"
upstream = ["10.77.0.1:53"]

[[alerts]]
name = "collector"
type = "syslog"
target = "tcp://10.77.0.1:6514"
facility = "local0"
rate_limit = 100000

[[allow]]
name = "api"
hosts = ["api.fleet.test"]
protocol = "tcp"
ports = [8080]
users = ["nobody"]
EOF
chmod 600 "$TMP/policy.toml"
cat >"$TMP/work.py" <<'EOF'
import socket, sys, time
api, allowed, hold = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
failed = 0
for _ in range(allowed):
    try:
        socket.create_connection((api, 8080), timeout=5).close()
    except OSError:
        failed += 1
if failed:
    print(f"{failed} of {allowed} allowed connections failed", file=sys.stderr)
held = []
for d in sys.argv[4:]:
    ip, port = d.rsplit(":", 1)
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((ip, int(port)))
    held.append(s)
time.sleep(hold)
EOF
chmod 644 "$TMP/work.py"

# The hosts.
for i in $(seq 1 "$N"); do
  h=$(printf 'web-%02d' "$i")
  HOSTS+=("$h")
  ns="egf-$h-$$"
  ip netns add "$ns"
  in_ns "$ns" ip link set lo up
  in_ns "$C" ip link add "p$i" type veth peer name eth0 netns "$ns"
  in_ns "$C" ip link set "p$i" master br0 up
  in_ns "$ns" ip addr add "10.77.1.$i/16" dev eth0
  in_ns "$ns" ip link set eth0 up
  # TEST-NET-3 needs a route to be tried at all (egret blocks it inside the namespace).
  in_ns "$ns" ip route add default via 10.77.0.1
  mkdir -p "$TMP/$h"
  nsenter --net="/run/netns/$ns" -- unshare --uts sh -c "hostname $h && exec $E run --policy $TMP/policy.toml --state-dir $TMP/$h" \
    >"$TMP/$h/stdout" 2>"$TMP/$h/stderr" &
  PID[$h]=$!
done
status() { in_ns "egf-$1-$$" "$E" status --json --state-dir "$TMP/$1"; }
deadline=$((SECONDS + 60 + N * 3))
for h in "${HOSTS[@]}"; do
  until [ "$(status "$h" 2>/dev/null | python3 -c 'import json,sys; print((json.load(sys.stdin).get("monitor") or {}).get("pid",""))' 2>/dev/null)" = "${PID[$h]}" ]; do
    kill -0 "${PID[$h]}" 2>/dev/null || { echo "$h: egret run exited:"; cat "$TMP/$h/stderr"; exit 1; }
    [ $SECONDS -lt $deadline ] || { echo "$h: not ready"; cat "$TMP/$h/stderr"; exit 1; }
    sleep 0.2
  done
done
echo "fleet: $N daemons ready ($(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)), $E"
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
declare -A T0
for h in "${HOSTS[@]}"; do T0[$h]=$(ticks "${PID[$h]}"); done
start=$(date +%s.%N)

# The workload, all hosts at once.
WORK=()
for i in $(seq 1 "$N"); do
  h=${HOSTS[$((i - 1))]}
  ns="egf-$h-$$"
  (
    # A failed step must not skip the rest of this host's workload.
    set +e +o pipefail
    api=""
    for _ in 1 2 3 4 5; do
      api=$(in_ns "$ns" setpriv --reuid=65534 --regid=65534 --clear-groups dig @127.0.0.1 +short +tries=1 +time=5 api.fleet.test | grep -m1 -E '^[0-9.]+$')
      [ -n "$api" ] && break
    done
    [ -n "$api" ] || echo "$h: api.fleet.test did not resolve through the guard" >&2
    dests=()
    for j in $(seq 1 "$BLOCKED"); do dests+=("10.77.0.1:$((20000 + j))"); done
    [ $((i % 5)) -ne 0 ] && dests+=("10.77.0.1:5432")
    [ "$i" -eq 7 ] && dests+=("203.0.113.66:4444")
    in_ns "$ns" setpriv --reuid=65534 --regid=65534 --clear-groups /usr/bin/python3 "$TMP/work.py" "${api:-10.77.0.1}" "$([ -n "$api" ] && echo "$ALLOWED" || echo 0)" 3 "${dests[@]}"
    for j in $(seq 1 "$REFUSED"); do
      in_ns "$ns" setpriv --reuid=65534 --regid=65534 --clear-groups dig @127.0.0.1 +short +tries=1 +time=1 "bad-$j.fleet.test" >/dev/null || true
    done
    [ "$i" -eq 3 ] && in_ns "$ns" setpriv --reuid=65534 --regid=65534 --clear-groups dig @127.0.0.1 +short +tries=1 +time=1 c2.evil.test >/dev/null || true
  ) &
  WORK+=($!)
done
wait "${WORK[@]}" || true
work_end=$(date +%s.%N)

# Until the collector has been quiet for 3 s (at most 120 s).
last=-1 quiet=0 deadline=$((SECONDS + 120))
while [ $quiet -lt 15 ] && [ $SECONDS -lt $deadline ]; do
  n=$(wc -l <"$TMP/collected.jsonl" 2>/dev/null || echo 0)
  if [ "$n" = "$last" ]; then quiet=$((quiet + 1)); else quiet=0 last=$n; fi
  sleep 0.2
done
for h in "${HOSTS[@]}"; do
  T1=$(ticks "${PID[$h]}")
  RSS=$(awk '/VmRSS/ {print $2}' "/proc/${PID[$h]}/status")
  echo "$h $((T1 - T0[$h])) $RSS" >>"$TMP/cpu"
  status "$h" >"$TMP/$h/status.json"
  in_ns "egf-$h-$$" "$E" events --json --since 1h --limit 1000000 --state-dir "$TMP/$h" >"$TMP/$h/events.jsonl"
done

python3 - "$TMP" "$start" "$work_end" "$(getconf CLK_TCK)" "${HOSTS[@]}" <<'PY'
import json, sys, datetime
tmp, start, work_end, hz, hosts = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), sys.argv[5:]
recs = [json.loads(l) for l in open(f"{tmp}/collected.jsonl")]
def t(s):
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
recv = sorted(t(r["timegenerated"]) for r in recs)
by_host = {}
for r in recs:
    sd = r.get("$!", {}).get("rfc5424-sd", {}).get("egret@32473", {})
    by_host.setdefault(r.get("hostname"), set()).add((sd.get("action"), sd.get("id")))
print(f"collector: {len(recs)} records from {len(by_host)} host names; "
      f"first {recv[0] - start:.2f} s after the workload started, last {recv[-1] - start:.2f} s; "
      f"{len(recs) / max(recv[-1] - recv[0], 1e-3):.0f} events/s between first and last "
      f"(workload ran {work_end - start:.1f} s)")
peak = {}
for x in recv:
    peak[int(x)] = peak.get(int(x), 0) + 1
print(f"collector: peak {max(peak.values())} events in one second")
unknown = set(by_host) - set(hosts)
assert not unknown, f"records under host names egret did not run as: {unknown}"
lost_total = missing_total = incidents = 0
any_unbalanced = False
for h in hosts:
    st = json.load(open(f"{tmp}/{h}/status.json"))["monitor"]
    loss = st["loss"]
    stored = [json.loads(l) for l in open(f"{tmp}/{h}/events.jsonl") if l.strip()]
    ids = {(d["event"]["action"], d["event"]["id"]) for d in stored if d.get("event", {}).get("id")}
    incidents += len(ids)
    missing = ids - by_host.get(h, set())
    unbalanced = loss["kernel_logged"] - loss["received"] - loss["seq_lost"] - loss["unaccounted"] - loss["while_down"]
    lost_total += st["lost"]
    missing_total += len(missing)
    any_unbalanced |= unbalanced != 0
    if missing or st["lost"] or unbalanced:
        print(f"  {h}: lost {st['lost']}, kernel logged {loss['kernel_logged']} received {loss['received']}, {len(missing)} stored incidents not at the collector")
print(f"books: {incidents} incidents stored on {len(hosts)} hosts, {missing_total} of them missing at the collector; "
      f"lost by the books: {lost_total}; kernel logged = received + lost on every host: "
      f"{'yes' if not any_unbalanced else 'NO'}")
cpu = [l.split() for l in open(f"{tmp}/cpu")]
secs = [int(c[1]) / hz for c in cpu]
rss = [int(c[2]) for c in cpu]
print(f"per daemon: CPU during the run {sum(secs)/len(secs):.2f} s mean, {max(secs):.2f} s max; "
      f"RSS {sum(rss)/len(rss)/1024:.1f} MiB mean, {max(rss)/1024:.1f} MiB max")
PY

echo "--- egret suggest --from collected.jsonl --hosts 'web-*' --policy policy.toml"
"$E" suggest --from "$TMP/collected.jsonl" --hosts 'web-*' --policy "$TMP/policy.toml" >"$TMP/suggested.toml"
grep -E '^# (seen on|Seen on)|^(#  ?)?name = ' "$TMP/suggested.toml" | sed 's/^/  /'
chmod 600 "$TMP/suggested.toml"
"$E" check "$TMP/suggested.toml"
echo "--- egret simulate suggested.toml --from collected.jsonl --hosts 'web-*'"
set +e
"$E" simulate "$TMP/suggested.toml" --from "$TMP/collected.jsonl" --hosts 'web-*' >"$TMP/simulate.txt"
rc=$?
set -e
head -1 "$TMP/simulate.txt"
grep -B1 -E '^  (blocked|would-block)' "$TMP/simulate.txt" | grep -E '^host|^  [a-z]' | head -12
echo "simulate exit $rc (5: some host has flows the policy does not allow)"
