#!/usr/bin/env bash
# Compile + apply time for policies of 100, 10k and 100k CIDRs: `egret apply`
# beside `nft -f` of the very ruleset egret plans (replacing the table each run,
# as egret does). Runs in a network namespace it creates (`ip netns add`: nft
# cannot raise its socket buffer inside a user namespace), then deletes it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
command -v nft >/dev/null && [ -x /usr/bin/time ] || apt-get install -y -qq nftables time >/dev/null
cargo build --release -q
E=$PWD/target/release/egret
NS=egret-bench-$$ TMP=$(mktemp -d)
trap 'ip netns del $NS 2>/dev/null || true; rm -rf $TMP' EXIT
ip netns add "$NS"
python3 - "$TMP" <<'PY'
import random, sys
random.seed(7)
for n in (100, 10000, 100000):
    nets = set()
    while len(nets) < n:
        a, b, c = random.randrange(1, 223), random.randrange(256), random.randrange(256)
        if a in (10, 127):
            continue
        nets.add(f"{a}.{b}.{c}.0/24" if len(nets) % 2 else f"{a}.{b}.{c}.{random.randrange(1, 255)}")
    with open(f"{sys.argv[1]}/p{n}.toml", "w") as f:
        f.write('mode = "enforce"\n[[allow]]\nname = "bulk"\nports = [443]\ncidrs = [\n' + ",\n".join(f'"{x}"' for x in sorted(nets)) + "\n]\n")
PY
in_ns() { ip netns exec "$NS" "$@"; }
ms() { local s e; s=$(date +%s%N); "$@" >/dev/null; e=$(date +%s%N); echo $(( (e - s) / 1000000 )); }
median() { tr ' ' '\n' | sort -n | awk '{a[NR]=$1} END{print a[int((NR+1)/2)]}'; }
printf '%-8s %12s %12s %8s %14s %12s\n' entries egret_ms nft_f_ms ratio egret_rss_KiB nft_rss_KiB
for n in 100 10000 100000; do
  "$E" plan "$TMP/p$n.toml" | sed '/^#/,$d' > "$TMP/p$n.nft"
  printf 'table inet egret\ndelete table inet egret\n' | cat - "$TMP/p$n.nft" > "$TMP/r$n.nft"
  e=() f=()
  for _ in 1 2 3 4 5; do
    e+=("$(ms in_ns "$E" apply "$TMP/p$n.toml")")
    f+=("$(ms in_ns nft -f "$TMP/r$n.nft")")
  done
  em=$(echo "${e[*]}" | median) fm=$(echo "${f[*]}" | median)
  er=$(in_ns /usr/bin/time -f %M "$E" apply "$TMP/p$n.toml" 2>&1 >/dev/null | tail -1)
  fr=$(in_ns /usr/bin/time -f %M nft -f "$TMP/r$n.nft" 2>&1 >/dev/null | tail -1)
  printf '%-8s %12s %12s %8s %14s %12s\n' "$n" "$em" "$fm" "$(awk -v a="$em" -v b="$fm" 'BEGIN{printf "%.2f", a/b}')" "$er" "$fr"
  in_ns "$E" remove >/dev/null
done
