#!/usr/bin/env bash
# Installs the Debian package on a real systemd host and drives it as an admin
# would: dpkg -i, systemctl start/reload/stop, a blocked attempt reported,
# remove, purge. The host is a Debian 12 container booted with systemd as PID 1
# (systemd-nspawn -b) in a network namespace made here, so egret's rules never
# reach this machine's own; nftables on this side of it is the witness.
#
#   bash scripts/check-package-systemd.sh [DEB]    (default: scripts/package.sh builds it)
#
# The root filesystem (debootstrap, ~250 MB) is cached in target/nspawn/bookworm
# and never written to: the container runs on a tmpfs overlay (--volatile=overlay),
# so every run starts from a freshly debootstrapped system. `rm -rf target/nspawn`
# makes the next run debootstrap again (about a minute and a half here).
# This machine has no systemd as PID 1: the container is not registered with
# machined (--register=no --keep-unit) and is entered with nsenter.
set -euo pipefail
# Bounded in time (debootstrap included): past the limit, the TERM trap below
# says which step hung, and the EXIT trap still stops and removes everything.
limit=1200
if [ -z "${EGRET_NSPAWN_BOUNDED:-}" ]; then
  EGRET_NSPAWN_BOUNDED=1 exec timeout "$limit" bash "$0" "$@"
fi
deb_arg=${1:+$(realpath "$1")}
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the check boots a container" >&2; exit 1; }
for cmd in debootstrap systemd-nspawn nsenter unshare nft ip; do
  command -v "$cmd" >/dev/null || { echo "check-package-systemd: $cmd is missing (bash scripts/deps.sh)" >&2; exit 1; }
done

deb=${deb_arg:-$(realpath "$(bash scripts/package.sh)")}
[ -f "$deb" ] || { echo "check-package-systemd: no package at $deb" >&2; exit 1; }
cache=$PWD/target/nspawn
rootfs=$cache/bookworm
include=systemd,systemd-sysv,dbus,nftables,iproute2
tag=egret-nsp-$$
ns=$tag peer=$tag-peer
log=$cache/last-run.log
step="setting up"
made="" nspawn_pid="" leader="" cgroups=()

mkdir -p "$cache"
: >"$log"

# Runs a command inside the container, as a login shell there would.
in_ct() {
  timeout 90 nsenter -t "$leader" -a env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
    LANG=C.UTF-8 SYSTEMD_COLORS=0 SYSTEMD_PAGER= DEBIAN_FRONTEND=noninteractive "$@" </dev/null
}
# The independent witness: this machine's nft, in the container's network namespace.
egret_table_loaded() { nsenter --net="/run/netns/$ns" nft list table inet egret >/dev/null 2>&1; }

fail() {
  echo "check-package-systemd: $step: $*" >&2
  if [ -n "$leader" ] && kill -0 "$leader" 2>/dev/null; then
    echo "--- journalctl -u egret (last 30 lines) ---" >&2
    in_ct journalctl -u egret --no-pager -n 30 >&2 || true
  fi
  echo "--- commands run in the container: $log ---" >&2
  exit 1
}

cleanup() {
  set +e
  if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
    kill -TERM "$nspawn_pid"                      # nspawn asks the container's systemd to power off
    for _ in $(seq 100); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$nspawn_pid" 2>/dev/null; then
      echo "check-package-systemd: the container did not power off in 20 s; killing it" >&2
      kill -KILL "$nspawn_pid"
    fi
    wait "$nspawn_pid" 2>/dev/null
  fi
  ip netns del "$ns" 2>/dev/null
  ip netns del "$peer" 2>/dev/null
  # The cgroups nspawn made for the container (payload) and itself (supervisor), deepest first.
  for cg in "${cgroups[@]}"; do
    [ -d "$cg" ] && find "$cg" -depth -type d -exec rmdir {} + 2>/dev/null
    [ -d "$cg" ] && echo "check-package-systemd: cgroup $cg is left (a process still in it?)" >&2
  done
  if grep -q " $rootfs" /proc/mounts; then
    echo "check-package-systemd: mounts under $rootfs are left:" >&2
    grep " $rootfs" /proc/mounts >&2
  fi
}
trap cleanup EXIT
trap 'fail "stopped after $limit s"' TERM

# --- the root filesystem -----------------------------------------------------
# Rebuilt when the package list changes; a half-made one is never used.
if [ "$(cat "$rootfs/.egret-include" 2>/dev/null)" != "$include" ]; then
  step="debootstrap"
  mirror=${EGRET_DEBIAN_MIRROR:-$(apt-get indextargets --format '$(SITE)' 'Release: bookworm' \
    'Target-Of: deb' 'Identifier: Packages' | sort -u | head -1)}
  [ -n "$mirror" ] || fail "no Debian 12 mirror in this machine's apt sources; set EGRET_DEBIAN_MIRROR"
  rm -rf "$rootfs" "$rootfs.tmp"
  t0=$SECONDS
  echo "debootstrap bookworm (minbase + $include) into $rootfs ..." >&2
  timeout 900 debootstrap --variant=minbase --include="$include" bookworm "$rootfs.tmp" "$mirror" \
    >"$cache/debootstrap.log" 2>&1 || fail "failed, see $cache/debootstrap.log"
  echo "$include" >"$rootfs.tmp/.egret-include"
  mv "$rootfs.tmp" "$rootfs"
  made="debootstrap $((SECONDS - t0)) s, "
fi
started=$SECONDS

# --- the network: the container's namespace, and a peer it can try to reach --
step="network namespaces"
ip netns add "$ns"
ip netns add "$peer"
ip link add eg-ct$$ netns "$ns" type veth peer name eg-peer$$ netns "$peer"
nsenter --net="/run/netns/$ns" sh -ec "ip link set lo up; ip link set eg-ct$$ name eg0 up; ip addr add 10.77.0.1/24 dev eg0"
nsenter --net="/run/netns/$peer" sh -ec "ip link set lo up; ip link set eg-peer$$ up; ip addr add 10.77.0.2/24 dev eg-peer$$"
# The peer drops what comes to 8443: the attempt stays open (SYN-SENT) long
# enough for egret to find the socket and its process.
nsenter --net="/run/netns/$peer" nft -f - <<'NFT'
table inet peer {
  chain input { type filter hook input priority 0; policy accept; tcp dport 8443 drop; }
}
NFT

# --- boot ----------------------------------------------------------------------
# nspawn runs in cgroups of its own (removed afterwards) and in a private mount
# namespace, so none of its mounts or its /run/systemd/nspawn state reach this
# machine even if it dies. CAP_NET_ADMIN, which --private-network would grant
# and --network-namespace-path does not, acts on the container's own namespace.
step="boot"
case "$(stat -fc %T /sys/fs/cgroup)" in
  cgroup2fs) cgroups=(/sys/fs/cgroup/$tag) ;;
  *) cgroups=(/sys/fs/cgroup/unified/$tag /sys/fs/cgroup/systemd/$tag) ;;
esac
for cg in "${cgroups[@]}"; do mkdir "$cg"; done
# shellcheck disable=SC2016 # expanded by the inner shell
unshare --mount --propagation private sh -c '
  for cg in $1; do echo $$ >"$cg/cgroup.procs"; done
  [ ! -d /run/systemd ] || mount -t tmpfs -o mode=0755 egret-nspawn /run/systemd
  shift; exec "$@"' sh "${cgroups[*]}" \
  systemd-nspawn --quiet --directory="$rootfs" --volatile=overlay --machine="$tag" \
    --register=no --keep-unit --network-namespace-path="/run/netns/$ns" --capability=CAP_NET_ADMIN \
    --bind-ro="$deb:/root/egret.deb" --console=pipe --boot \
  >"$cache/console.log" 2>&1 </dev/null &
nspawn_pid=$!
for _ in $(seq 100); do
  leader=$(pgrep -P "$nspawn_pid" -x systemd || true)
  [ -n "$leader" ] && break
  kill -0 "$nspawn_pid" 2>/dev/null || fail "systemd-nspawn exited: $(cat "$cache/console.log")"
  sleep 0.2
done
[ -n "$leader" ] || fail "no systemd in the container after 20 s: $(cat "$cache/console.log")"
for _ in $(seq 100); do in_ct test -S /run/systemd/private && break; sleep 0.2; done
state=$(in_ct systemctl is-system-running --wait) || true
case "$state" in
  running) ;;
  degraded) echo "check-package-systemd: the container booted degraded: $(in_ct systemctl --failed --plain --no-legend | tr '\n' ' ')" >&2 ;;
  *) fail "the container's systemd did not finish booting (is-system-running: $state)" ;;
esac
booted=$SECONDS

# Runs a step's command in the container; its output goes to the log.
run() {
  echo "# $*" >>"$log"
  in_ct "$@" >>"$log" 2>&1 || fail "\`$*\` failed: $(tail -n 5 "$log")"
}
expect() { # expect WHAT WANT GOT
  [ "$3" = "$2" ] || fail "$1 is '$3', expected '$2'"
}

# --- 1. install: enabled, not started ------------------------------------------
step="dpkg -i"
run dpkg -i /root/egret.deb
expect "systemctl is-enabled egret" enabled "$(in_ct systemctl is-enabled egret || true)"
expect "systemctl is-active egret" inactive "$(in_ct systemctl is-active egret || true)"
! egret_table_loaded || fail "egret's table is loaded although nothing started egret"
status=$(in_ct egret status 2>&1) || true
grep -q "not loaded" <<<"$status" || fail "egret status does not say 'not loaded' after the install: $status"

# --- 2. start (Type=notify), status, a reported attempt, reload -----------------
step="systemctl start egret"
run systemctl start egret
expect "systemctl is-active egret" active "$(in_ct systemctl is-active egret || true)"
# `systemctl start` returned: systemd got READY=1. The status text came with it.
expect "the unit's StatusText" "watching blocked egress" "$(in_ct systemctl show -P StatusText egret)"
egret_table_loaded || fail "the service is active but nft sees no egret table in the container"
status=$(in_ct egret status) || fail "egret status failed in the container"
grep -q "mode audit" <<<"$status" || fail "egret status does not show audit mode: $status"

step="a blocked attempt"
# Audit mode: the SYN passes (the peer drops it) and is reported with its process.
in_ct timeout 3 bash -c 'exec 3<>/dev/tcp/10.77.0.2/8443' >/dev/null 2>&1 &
attempt=$!
for _ in $(seq 50); do
  events=$(in_ct egret events) || fail "egret events failed"
  grep -q "10.77.0.2" <<<"$events" && break
  sleep 0.2
done
wait "$attempt" || true
grep -q "10.77.0.2.*8443\|8443.*10.77.0.2" <<<"$events" || fail "no event for 10.77.0.2:8443 in egret events: $events"
grep -q "would-block" <<<"$events" || fail "the event is not a would-block (audit mode): $events"
for _ in $(seq 50); do
  event=$(in_ct journalctl -u egret -o cat --no-pager | grep -m1 '"destination":{[^}]*"ip":"10.77.0.2"') && break
  sleep 0.2
done
[ -n "$event" ] || fail "the event is not in the journal (journalctl -u egret)"
for field in '"action":"would-block"' '"port":8443' '"name":"bash"'; do
  grep -qF "$field" <<<"$event" || fail "the journal's event lacks $field: $event"
done

step="systemctl reload egret"
# The admin's edit to the conffile: an allow rule, picked up by the reload.
run sh -c 'printf "\n[[allow]]\nname = \"peer-https\"\ncidrs = [\"10.77.0.2\"]\nports = [8443]\n" >>/etc/egret/policy.toml'
pid=$(in_ct systemctl show -P MainPID egret)
# At debug level systemd logs each notification it gets: the witness of
# RELOADING=1 and READY=1. (Only here: the debug lines of a service's start make
# journald file its first lines under init.scope, out of `journalctl -u`.)
run systemctl log-level debug
run systemctl reload egret
expect "systemctl is-active egret after the reload" active "$(in_ct systemctl is-active egret || true)"
expect "MainPID after the reload" "$pid" "$(in_ct systemctl show -P MainPID egret)"
for _ in $(seq 50); do in_ct egret status | grep -q "peer-https" && break; sleep 0.2; done
in_ct egret status | grep -q "peer-https" || fail "the reloaded policy's rule peer-https is not in egret status"
in_ct journalctl -u egret -o cat --no-pager | grep -q "reloaded policy=/etc/egret/policy.toml mode=audit rules=1" \
  || fail "egret's journal does not say it reloaded the policy with its new rule"
notifications=$(in_ct journalctl -u egret --no-pager -o cat | grep -F "Got notification message from PID $pid (" || true)
grep -q "(RELOADING=1)" <<<"$notifications" || fail "systemd got no RELOADING=1 from egret (pid $pid)"
grep -q "(READY=1, STATUS=watching blocked egress)" <<<"$notifications" || fail "systemd got no READY=1 from egret after the reload"
run systemctl log-level info
in_ct journalctl -u egret --no-pager | grep -q "Reloaded egret" || fail "systemd did not log the reload as finished"

# --- 3. upgrade over the edited conffile, stop, remove, purge --------------------
step="dpkg -i again (upgrade)"
run dpkg -i /root/egret.deb           # no tty: a conffile prompt would fail it
in_ct grep -q "peer-https" /etc/egret/policy.toml || fail "the admin's edit to /etc/egret/policy.toml was lost"
expect "systemctl is-active egret after the upgrade" active "$(in_ct systemctl is-active egret || true)"
[ "$(in_ct systemctl show -P MainPID egret)" != "$pid" ] || fail "the upgrade did not restart the running service"

step="systemctl stop egret"
run systemctl stop egret
expect "systemctl is-active egret" inactive "$(in_ct systemctl is-active egret || true)"
egret_table_loaded || fail "egret's table is gone after stop (it must stay: fail closed)"

step="apt-get remove egret"
run apt-get remove -y -q egret
! egret_table_loaded || fail "egret's table is still loaded after the package's removal"
expect "dpkg's status of egret" config-files "$(in_ct dpkg-query -W -f='${db:Status-Status}' egret)"
in_ct grep -q "peer-https" /etc/egret/policy.toml || fail "removal deleted the conffile (only purge may)"
in_ct test -d /var/lib/egret || fail "removal deleted /var/lib/egret (only purge may)"
in_ct test ! -e /usr/bin/egret || fail "/usr/bin/egret is still there after removal"

step="dpkg --purge egret"
run dpkg --purge egret
in_ct test ! -e /etc/egret || fail "/etc/egret is still there after purge"
in_ct test ! -e /var/lib/egret || fail "/var/lib/egret is still there after purge"
[ -z "$(in_ct find /etc/systemd/system -name 'egret*')" ] || fail "unit links are left in /etc/systemd/system after purge"
dpkg_status=$(in_ct dpkg-query -W -f='${db:Status-Status}' egret 2>/dev/null || true)
[ -z "$dpkg_status" ] || [ "$dpkg_status" = not-installed ] || fail "dpkg's status of egret after purge is $dpkg_status"

# --- 4. clean up ----------------------------------------------------------------
step="cleanup"
checked=$SECONDS
trap - EXIT
cleanup
kill -0 "$nspawn_pid" 2>/dev/null && fail "systemd-nspawn is still running"
for cg in "${cgroups[@]}"; do [ ! -d "$cg" ] || fail "cgroup $cg is left"; done
ip netns list | grep -q "^$tag" && fail "network namespace $tag is left"
grep -q " $rootfs" /proc/mounts && fail "mounts under $rootfs are left"
echo "package on systemd ok: installed, started, reloaded, reported, upgraded, removed, purged in a booted Debian 12 container (${made}$((booted - started)) s to boot, $((checked - booted)) s of checks, $((SECONDS - checked)) s to stop)"
