# Sourced by bench/conn_rate.sh, rules.sh and novelty.sh: namespaces A
# (10.1.0.1) and B (10.1.0.2) joined by a veth pair, deleted on exit with
# everything running in them, and examples/conn_rate's server listening on
# 10.1.0.2:5201 with THREADS threads.
#   conn_lab TAG    (needs LOAD, the conn_rate binary, and THREADS;
#                    sets A, B, TMP; defines in_a and in_b)
# Called again with another TAG it makes another lab beside the first (the
# same addresses, in namespaces of its own) and points A and B at it; every
# lab is deleted on exit.
CONN_LAB_NS=() CONN_LAB_TMP=
conn_lab_cleanup() {
  for ns in "${CONN_LAB_NS[@]}"; do ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null || true; done
  sleep 0.2
  for ns in "${CONN_LAB_NS[@]}"; do ip netns del "$ns" 2>/dev/null || true; done
  [ -z "$CONN_LAB_TMP" ] || rm -rf "$CONN_LAB_TMP"
}
in_a() { nsenter --net=/run/netns/"$A" -- "$@"; }
in_b() { nsenter --net=/run/netns/"$B" -- "$@"; }
conn_lab() {
  [ -n "$CONN_LAB_TMP" ] || CONN_LAB_TMP=$(mktemp -d)
  A=egret-$1-a-$$ B=egret-$1-b-$$ TMP=$CONN_LAB_TMP
  CONN_LAB_NS+=("$A" "$B")
  trap conn_lab_cleanup EXIT
  ip netns add "$A"; ip netns add "$B"
  ip -n "$A" link add va type veth peer name vb netns "$B"
  ip -n "$A" addr add 10.1.0.1/24 dev va; ip -n "$B" addr add 10.1.0.2/24 dev vb
  for ns in "$A" "$B"; do ip -n "$ns" link set lo up; done
  ip -n "$A" link set va up; ip -n "$B" link set vb up
  (in_b "$LOAD" server 10.1.0.2:5201 "$THREADS" > "$TMP/server-$1.out" &) 2>/dev/null
  for _ in $(seq 50); do grep -q listening "$TMP/server-$1.out" 2>/dev/null && break; sleep 0.1; done
}
