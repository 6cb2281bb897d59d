#!/usr/bin/env bash
# Runs egret's kernel-facing test suites on Debian's own kernels under QEMU
# (virtme-ng, sharing this machine's filesystem read-only with a RAM overlay)
# and on this machine's own kernel, then prints a matrix kernel x suite.
#
#   sudo scripts/kernel-matrix.sh                 # host 5.10 6.1 6.12
#   sudo scripts/kernel-matrix.sh 6.1 5.10        # a subset
#   KM_SUITES="enforcement dns" scripts/kernel-matrix.sh 6.1
#
# Kernels: 5.10 = bullseye, 6.1 = bookworm, 6.12 = bookworm-backports, each
# the newest linux-image-*-amd64 of that suite, downloaded with apt into a
# private state directory (its own sources list, lists and cache: this
# machine's apt sources are never changed) and unpacked, never installed.
# The guest is its own machine (its own root network namespace, its own
# nf_tables), and the tests still make their own namespaces inside it.
# KVM: virtme-ng's `-cpu host` fails in nested setups ("failed to set MSR"),
# so the VM runs under TCG (--disable-kvm), 5-10x slower than the host: the
# tests must wait for states, never for fixed times.
#
# Knobs (environment): KM_SUITES, KM_THREADS (--test-threads, default 1),
# KM_SUITE_TIMEOUT (s per suite, default 1500), KM_VM_TIMEOUT (s per kernel,
# default 5400), KM_CPUS (default 2), KM_MEM (default 2G), KM_NICE (default 10),
# KM_STATE (default target/kernel-matrix), KM_KVM=1 to try KVM (it hangs at boot
# in this nested setup: see docs/deployment.md), KM_TESTS="suite:filter ..." to run
# only the tests of a suite whose names contain a filter (what CI runs).
# Exits non-zero when a test failed or did not finish, or a behaviour egret
# depends on was not as expected (scripts/kernel-facts.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
[ "$(id -u)" = 0 ] || { echo "run as root: the tests create network namespaces, the guest loads modules" >&2; exit 1; }

suites=${KM_SUITES:-enforcement dns monitor doctor containers audit}
threads=${KM_THREADS:-1}
suite_timeout=${KM_SUITE_TIMEOUT:-1500}
vm_timeout=${KM_VM_TIMEOUT:-5400}
cpus=${KM_CPUS:-2}
mem=${KM_MEM:-2G}
nice_level=${KM_NICE:-10}
state=${KM_STATE:-$repo/target/kernel-matrix}
kernels=("$@")
[ ${#kernels[@]} -gt 0 ] || kernels=(host 5.10 6.1 6.12)
stamp=$(date -u +%Y-%m-%dT%H%MZ)
out=$state/results/$stamp-$(IFS=_; echo "${kernels[*]}")
mkdir -p "$out"

log() { printf '[kernel-matrix %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# --- tools: qemu (Debian), kmod (depmod/modprobe for the guest), virtme-ng (PyPI, pinned)
bash scripts/deps.sh
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v depmod >/dev/null || need+=(kmod)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
venv=$state/venv
if [ ! -x "$venv/bin/vng" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q 'virtme-ng==1.42'
fi
export PATH=$venv/bin:$PATH

# --- the test binaries, built once on the host and run as they are inside each guest
log "building test binaries"
cargo build --bin egret
bins=$out/bins.txt
args=()
for s in $suites; do args+=(--test "$s"); done
cargo test --no-run --message-format=json "${args[@]}" 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])
' >"$bins.all"
# In KM_SUITES order, so a bounded run covers the first suites on every kernel.
for s in $suites; do grep "^$s " "$bins.all" || true; done >"$bins"
for t in ${KM_TESTS:-}; do echo "$t"; done >"$out/filters.txt"

# --- a kernel: newest linux-image-*-amd64 of a Debian suite, unpacked under $state/kernels/SUITE
fetch_kernel() {
  local suite=$1 d=$state/apt/$1 root=$state/kernels/$1
  mkdir -p "$d/state/lists/partial" "$d/cache/archives/partial" "$d/prefs" "$state/debs/$suite"
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian $suite main" >"$d/sources.list"
  local a=(-o "Dir::Etc::SourceList=$d/sources.list" -o Dir::Etc::SourceParts=/nonexistent
    -o "Dir::State=$d/state" -o "Dir::Cache=$d/cache" -o Dir::Etc::Preferences=/nonexistent
    -o "Dir::Etc::PreferencesParts=$d/prefs" -o Debug::NoLocking=1
    -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false
    -o Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false
    -o Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false)
  apt-get -qq "${a[@]}" update >&2
  local pkg
  pkg=$(apt-cache "${a[@]}" depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
  [ -n "$pkg" ] || { echo "no linux-image-amd64 in $suite" >&2; return 1; }
  if [ ! -d "$root/boot" ] || [ "$(cat "$root/.pkg" 2>/dev/null)" != "$pkg" ]; then
    (cd "$state/debs/$suite" && rm -f ./*.deb && apt-get -qq "${a[@]}" download "$pkg" >&2 2>/dev/null)
    rm -rf "$root"
    mkdir -p "$root"
    dpkg-deb -x "$state/debs/$suite"/*.deb "$root"
    echo "$pkg" >"$root/.pkg"
  fi
  local kver
  kver=$(basename "$root"/lib/modules/*)
  [ -e "$root/lib/modules/$kver/modules.dep" ] || depmod -b "$root" "$kver"
  echo "$root/boot/vmlinuz-$kver"
}

# --- what runs on the kernel under test (inside the guest, or on the host)
guest_script=$out/guest.sh
cat >"$guest_script" <<'EOF'
#!/bin/bash
# $1: results dir, $2: modules dir of this kernel (empty on the host), $3: suite timeout, $4: threads,
# $5: the checkout
res=$1 moddir=$2 tmo=$3 thr=$4 repo=$5
kver=$(uname -r)
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:$PATH
# Emulated (TCG) kernels run 5-10x slower: stretch the windows tests give egret.
[ -n "$moddir" ] && export EGRET_TEST_TIME_SCALE=${EGRET_TEST_TIME_SCALE:-10}
{
  echo "kernel: $kver"
  if [ -n "$moddir" ] && [ ! -e "/lib/modules/$kver/modules.dep" ]; then
    rm -f "/lib/modules/$kver" 2>/dev/null
    mkdir -p /lib/modules && ln -sfn "$moddir" "/lib/modules/$kver"
  fi
  # What egret and the tests need; a missing one is recorded, the suites then show what it breaks.
  # On the host (no moddir) modules may be built in without modules.builtin: not checked there.
  [ -n "$moddir" ] && for m in nf_tables nfnetlink_log nft_ct nft_socket nft_log nft_limit nft_reject_inet nft_fib_inet nft_chain_nat veth bridge br_netfilter nf_conntrack_netlink inet_diag tcp_diag udp_diag; do
    modprobe -q "$m" 2>/dev/null && echo "module $m: ok" || echo "module $m: MISSING"
  done
  grep -o 'nsdelegate' /proc/mounts | head -1 | sed 's/^/cgroup2: /'
} >"$res/env.txt" 2>&1
# The nf_tables behaviours egret relies on, re-measured on this kernel.
timeout 300 "$repo/scripts/kernel-facts.sh" >"$res/facts.txt" 2>&1
while read -r suite bin; do
  [ "$suite" = egret ] && continue
  start=$(date +%s)
  filters=$(awk -v s="$suite" -F: '$1 == s { print $2 }' "$res/../filters.txt")
  # A second reader stamps each line with the second it was written: with
  # one test thread a test's result line ends it, so $suite.times gets each
  # test's duration (what it adds to CI on this kernel). The log itself is
  # written as before: no pipe that a test's leftover child could hold open.
  # shellcheck disable=SC2086 # one word per filter
  timeout -k 10 "$tmo" "$bin" --test-threads="$thr" $filters >"$res/$suite.log" 2>&1 &
  tpid=$!
  tail -n +1 -s 0.2 --pid="$tpid" -f "$res/$suite.log" 2>/dev/null \
    | while IFS= read -r l || [ -n "$l" ]; do printf '%(%s)T %s\n' -1 "$l"; done >"$res/$suite.timed" &
  wait "$tpid"
  rc=$?
  wait
  echo "$suite rc=$rc seconds=$(( $(date +%s) - start ))" >>"$res/runs.txt"
  awk -v t0="$start" '{ ts = $1; sub(/^[0-9]+ /, "") }
    /^test [^ ]+ \.\.\. / { name = $2 }
    name != "" && /(^| )(ok|FAILED|ignored)$/ { print ts - t0, name; t0 = ts; name = "" }' \
    "$res/$suite.timed" >"$res/$suite.times" 2>/dev/null
done <"$res/../bins.txt"
echo done >"$res/finished"
EOF
chmod +x "$guest_script"

run_kernel() {
  local k=$1 res=$out/$1 suite kimg
  mkdir -p "$res"
  local t0; t0=$(date +%s)
  if [ "$k" = host ]; then
    log "host kernel $(uname -r): running suites"
    nice -n "$nice_level" timeout "$vm_timeout" "$guest_script" "$res" "" "$suite_timeout" "$threads" "$repo" || true
  else
    case $k in 5.10) suite=bullseye ;; 6.1) suite=bookworm ;; 6.12) suite=bookworm-backports ;;
      *) echo "unknown kernel $k (host, 5.10, 6.1, 6.12)" >&2; return 1 ;; esac
    kimg=$(fetch_kernel "$suite")
    local kvm=(--disable-kvm)
    [ "${KM_KVM:-0}" = 1 ] && kvm=()
    log "$k: booting $(basename "$kimg") (${kvm[*]:-kvm})"
    # The guest sees / read-only (9p, RAM overlays on /etc /var /tmp ...);
    # only $out is shared read-write, to hand the results back.
    (cd /tmp && nice -n "$nice_level" timeout "$vm_timeout" vng -r "$kimg" "${kvm[@]}" --cpus "$cpus" --memory "$mem" \
      --rwdir="$out" --exec "$guest_script $res $(dirname "$(dirname "$kimg")")/lib/modules/$(basename "$kimg" | sed 's/^vmlinuz-//') $suite_timeout $threads $repo" \
      </dev/null >"$res/console.log" 2>&1) || true
  fi
  echo "$(( $(date +%s) - t0 ))" >"$res/seconds"
}

for k in "${kernels[@]}"; do run_kernel "$k"; done

# --- the matrix: passed/failed per kernel x suite, then what failed
python3 - "$out" "$stamp" "${kernels[@]}" <<'EOF' | tee "$out/matrix.md"
import os, re, sys
out, stamp, kernels = sys.argv[1], sys.argv[2], sys.argv[3:]
suites = [l.split()[0] for l in open(os.path.join(out, "bins.txt")) if l.split()[0] != "egret"]
def cell(k, s):
    p = os.path.join(out, k, s + ".log")
    if not os.path.exists(p):
        return "not run", []
    text = open(p, errors="replace").read()
    m = re.findall(r"test result: \w+\. (\d+) passed; (\d+) failed", text)
    failed = re.findall(r"^test (\S+) \.\.\. FAILED", text, re.M)
    if not m:
        # A test's own output can split "test NAME ... ok" over lines: count
        # the finished tests from the stamped copy when there is one.
        done = re.findall(r"^test (\S+) \.\.\. ok", text, re.M)
        t = os.path.join(out, k, s + ".times")
        if os.path.exists(t):
            done = [l for l in open(t).read().splitlines() if l.strip()]
            return "incomplete (timeout): %d finished, %d failed" % (len(done), len(failed)), failed
        return "incomplete (timeout): %d ok, %d failed" % (len(done), len(failed)), failed
    p_, f_ = m[-1]
    return "%s passed, %s failed" % (p_, f_), failed
def kname(k):
    try:
        return open(os.path.join(out, k, "env.txt")).readline().split(": ", 1)[1].strip()
    except (OSError, IndexError):
        return k
print("# egret kernel matrix, %s\n" % stamp)
print("| suite | " + " | ".join("%s (%s)" % (k, kname(k)) for k in kernels) + " |")
print("|---|" + "---|" * len(kernels))
fails = []
for s in suites:
    row = []
    for k in kernels:
        c, f = cell(k, s)
        row.append(c)
        fails += ["- %s / %s: %s" % (k, s, t) for t in f]
    print("| %s | %s |" % (s, " | ".join(row)))
facts = {}
for k in kernels:
    try:
        for l in open(os.path.join(out, k, "facts.txt"), errors="replace"):
            if ": " in l and not l.startswith("kernel:"):
                f, v = l.rstrip("\n").split(": ", 1)
                facts.setdefault(f, {})[k] = v
    except OSError:
        pass
if facts:
    print("\n| nf_tables behaviour (scripts/kernel-facts.sh) | " + " | ".join(kernels) + " |")
    print("|---|" + "---|" * len(kernels))
    for f, per in facts.items():
        print("| %s | %s |" % (f, " | ".join(per.get(k, "not run") for k in kernels)))
print("\nwall time per kernel (s): " + ", ".join(
    "%s %s" % (k, open(os.path.join(out, k, "seconds")).read().strip()) for k in kernels if os.path.exists(os.path.join(out, k, "seconds"))))
missing = []
for k in kernels:
    try:
        missing += ["%s: %s" % (k, l.strip()) for l in open(os.path.join(out, k, "env.txt")) if "MISSING" in l]
    except OSError:
        pass
if missing:
    print("\nmodules not loadable:\n" + "\n".join("- " + m for m in missing))
if fails:
    print("\nfailed tests:\n" + "\n".join(fails))
print("\nlogs: %s" % out)
# Green only when every suite finished with no failure on every kernel and
# egret's refresh of element timeouts works everywhere.
bad = [k + "/" + s for k in kernels for s in suites if not re.match(r"\d+ passed, 0 failed", cell(k, s)[0])]
bad += [k + ": " + f for f, per in facts.items() for k, v in per.items() if "FAILS" in v]
bad += [k + ": no facts" for k in kernels if not any(k in per for per in facts.values())]
open(os.path.join(out, "verdict"), "w").write("\n".join(bad))
EOF
[ ! -s "$out/verdict" ] || { echo "kernel matrix: not green:" >&2; cat "$out/verdict" >&2; exit 1; }
