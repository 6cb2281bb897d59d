#!/usr/bin/env bash
# The otlp alert sink's cost: events per second one sink pushes to a receiver
# on loopback (examples/otlp_push.rs: the sink's own code, the real documents
# of tests/fixtures/ecs, a receiver that reads and answers 200) and the sink's
# CPU per 1,000 events, gzip and uncompressed, batches of 512 and 64.
# Interleaved rounds (default 3). Runs in a network namespace it creates
# (unshare -n): traffic only on that namespace's loopback.
#
#   sudo bash bench/otlp.sh
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
ROUNDS=${ROUNDS:-3} EVENTS=${EVENTS:-100000}
cargo build --release -q --example otlp_push
P=$PWD/${CARGO_TARGET_DIR:-target}/release/examples/otlp_push
for round in $(seq "$ROUNDS"); do
  for args in "512 gzip" "512 none" "64 gzip"; do
    # shellcheck disable=SC2086
    unshare -n sh -c "ip link set lo up && exec $P $EVENTS $args"
  done
done
