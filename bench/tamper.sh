#!/usr/bin/env bash
# Tamper detection cost and latency with a 100k-CIDR policy: idle CPU of
# `egret run` (change notifications + the full table comparison every 10 s,
# which reads every static set's elements), and the time from a foreign
# `nft add element` to the tamper event (restore_table = true, so each one is
# also put back). Runs in a network namespace it creates, then deletes it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
cargo build --release -q
E=$PWD/target/release/egret
NS=egret-bench-tamper-$$ TMP=$(mktemp -d)
PID=
trap '[ -n "$PID" ] && kill "$PID" 2>/dev/null; ip netns del $NS 2>/dev/null || true; rm -rf $TMP' EXIT
ip netns add "$NS"
python3 - "$TMP" <<'PY'
import random, sys
random.seed(7)
nets = set()
while len(nets) < 100000:
    a, b, c = random.randrange(1, 223), random.randrange(256), random.randrange(256)
    if a in (10, 127):
        continue
    nets.add(f"{a}.{b}.{c}.0/24" if len(nets) % 2 else f"{a}.{b}.{c}.{random.randrange(1, 255)}")
with open(f"{sys.argv[1]}/p.toml", "w") as f:
    f.write('mode = "enforce"\nrestore_table = true\n[[allow]]\nname = "bulk"\nports = [443]\ncidrs = [\n' + ",\n".join(f'"{x}"' for x in sorted(nets)) + "\n]\n")
PY
chmod 700 "$TMP"
ip netns exec "$NS" "$E" run --policy "$TMP/p.toml" --state-dir "$TMP/state" >"$TMP/out" 2>"$TMP/err" &
PID=$!
until grep -q "watching blocked egress" "$TMP/err"; do sleep 0.2; done
sleep 2
ticks() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
HZ=$(getconf CLK_TCK)
t0=$(ticks); sleep 60; t1=$(ticks)
echo "idle CPU over 60 s: $(( (t1 - t0) * 1000 / HZ )) ms ($(awk -v t=$((t1 - t0)) -v hz="$HZ" 'BEGIN{printf "%.2f", t / hz / 60 * 100}')% of one core)"
lat=()
for i in 1 2 3 4 5; do
  n=$(grep -c '"tamper"' "$TMP/out" || true)
  s=$(date +%s%N)
  ip netns exec "$NS" nft add element inet egret a_bulk_v4 "{ 10.9.9.$i }"
  until [ "$(grep -c '"tamper"' "$TMP/out" || true)" -gt "$n" ]; do sleep 0.01; done
  e=$(date +%s%N)
  lat+=($(( (e - s) / 1000000 )))
  sleep 3 # the restore of 100k elements
done
echo "nft add element → tamper event (ms): ${lat[*]}"
grep '"tamper"' "$TMP/out" | head -1
