#!/usr/bin/env bash
# Attribution latency with ~300 processes (280 idle, 20 holding 100 sockets
# each): 5-tuple → sock_diag → /proc → pid, executable, unit. Runs in a
# network namespace it creates (a veth pair; SYNs to 10.77.0.2 go nowhere, so
# sockets stay in SYN-SENT as a blocked connect's do) and deletes.
#
#   sudo bash bench/attribution.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
cargo build --release -q --example attribution_bench
T=${CARGO_TARGET_DIR:-target}/release
NS=egret-attr-$$
trap 'ip netns pids $NS 2>/dev/null | xargs -r kill 2>/dev/null; ip netns del $NS 2>/dev/null || true' EXIT
ip netns add "$NS"
in_ns() { nsenter --net=/run/netns/"$NS" -- "$@"; }
in_ns ip link set lo up
in_ns ip link add v0 type veth peer name v1
in_ns ip addr add 10.77.0.1/24 dev v0
in_ns ip link set v0 up; in_ns ip link set v1 up
in_ns "$T/examples/attribution_bench"
