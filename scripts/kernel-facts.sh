#!/usr/bin/env bash
# Re-measures, on the running kernel, the nf_tables behaviours egret depends
# on, with Debian's nft in a fresh network namespace (never the caller's).
# One "fact: value" line each; scripts/kernel-matrix.sh runs it on every
# kernel of the matrix. Needs root (or an unprivileged user namespace).
set -uo pipefail
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
[ "${1:-}" = --inside ] || exec unshare -n -- "$0" --inside
fact() { printf '%s: %s\n' "$1" "$2"; }
# "expires 4m59s" / "expires 1m" -> seconds
expires() {
  nft list set inet t "$1" | tr ',{}' '\n\n\n' | grep -F "$2 " | grep -o 'expires [0-9hms]*' \
    | sed 's/expires //; s/[0-9]*ms$//' | awk '{ s=0; n=$0; while (match(n, /^[0-9]+[hms]/)) { v=substr(n,1,RLENGTH-1); u=substr(n,RLENGTH,1);
        s+= (u=="h"?3600:(u=="m"?60:1))*v; n=substr(n,RLENGTH+1) } print s }'
}
echo "kernel: $(uname -r)"
nft add table inet t || { fact nf_tables "unavailable"; exit 1; }

nft add set inet t s '{ type ipv4_addr; flags timeout; }'
nft add element inet t s '{ 10.0.0.1 timeout 60s }'
nft add element inet t s '{ 10.0.0.1 timeout 300s }'
e=$(expires s 10.0.0.1)
fact "re-adding an element with a longer timeout" "$([ "${e:-0}" -gt 100 ] && echo "replaces it (expires in ${e}s)" || echo "keeps the old one (expires in ${e}s)")"
nft add element inet t s '{ 10.0.0.1 timeout 20s }'
e=$(expires s 10.0.0.1)
fact "re-adding an element with a shorter timeout" "$([ "${e:-0}" -le 20 ] && echo "replaces it (expires in ${e}s)" || echo "keeps the old one (expires in ${e}s)")"

# egret's refresh: add (it may have expired), delete, add with the new
# timeout, in one transaction; for a live, an absent and an expired element.
nft add set inet t r '{ type ipv4_addr; flags timeout; gc-interval 1h; }'
nft add element inet t r '{ 10.0.0.1 timeout 60s, 10.0.0.3 timeout 1s }'
sleep 2
ok=0
for ip in 10.0.0.1 10.0.0.2 10.0.0.3; do
  printf 'add element inet t r { %s timeout 300s }\ndelete element inet t r { %s }\nadd element inet t r { %s timeout 300s }\n' \
    "$ip" "$ip" "$ip" | nft -f - 2>/dev/null || continue
  e=$(expires r "$ip")
  [ "${e:-0}" -gt 200 ] && ok=$((ok + 1))
done
fact "add+delete+add in one transaction (live, absent, expired element)" "$([ $ok = 3 ] && echo "sets the new timeout (3 of 3)" || echo "FAILS ($ok of 3)")"

nft add chain inet t c
nft add rule inet t c socket cgroupv2 level 1 '"/"' accept 2>/dev/null \
  && fact "socket cgroupv2 (units rules)" supported || fact "socket cgroupv2 (units rules)" "not supported"
nft add set inet t svc '{ type inet_proto . inet_service; flags interval; }' 2>/dev/null \
  && nft add element inet t svc '{ tcp . 8000-8100 }' 2>/dev/null \
  && fact "concatenated interval sets (rule ports)" supported || fact "concatenated interval sets (rule ports)" "not supported"
nft add set inet t full '{ type ipv4_addr; size 2; }'
nft add element inet t full '{ 10.0.0.1, 10.0.0.2 }'
nft add element inet t full '{ 10.0.0.3 }' 2>/dev/null \
  && fact "adding to a full set of size 2" "accepted" || fact "adding to a full set of size 2" "refused"
nft add set inet t dyn '{ type ipv4_addr; flags dynamic,timeout; timeout 1m; size 16; }' 2>/dev/null \
  && nft add rule inet t c update @dyn '{ ip daddr }' 2>/dev/null \
  && fact "sets updated from the packet path (dynset)" supported || fact "sets updated from the packet path (dynset)" "not supported"
nft add map inet t vm '{ type ipv4_addr . inet_service : verdict; flags interval; }' 2>/dev/null \
  && nft add rule inet t c ip daddr . tcp dport vmap @vm 2>/dev/null \
  && fact "concatenated interval verdict maps" supported || fact "concatenated interval verdict maps" "not supported"
nft list ruleset >/dev/null
