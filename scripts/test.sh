#!/usr/bin/env bash
# The whole test suite. Run as root: the integration tests create their own
# network namespaces (never touching this machine's own firewall) and cgroups.
# Every stage runs even when an earlier one failed (one run shows every
# failure); the summary at the end names what failed, and the exit status is
# non-zero if anything did.
set -uo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the tests create network namespaces" >&2; exit 1; }
bash scripts/deps.sh || { echo "scripts/deps.sh failed: cannot run the tests" >&2; exit 1; }
failed=()
stage() {
  echo "==> $*"
  "$@" || failed+=("$*")
}
stage cargo test --all-targets --no-fail-fast
# The Debian package: built and checked, never installed or started here;
# then installed and started under systemd in a booted Debian 12 container.
stage bash scripts/check-package.sh
# The package check-package.sh built (if it failed before building one,
# check-package-systemd.sh builds it itself).
deb=$(ls -t target/debian/egret_*.deb 2>/dev/null | head -n1)
stage bash scripts/check-package-systemd.sh ${deb:+"$deb"}
# The kernel-facing core on the kernels Debian 11 and 12 run (5.10, 6.1, and
# bookworm-backports' 6.12), booted under QEMU (docs/deployment.md, Kernels):
# enforcement, unit rules (refused on 5.10), the DNS guard's element lifetimes,
# doctor, NFLOG loss books and tamper, plus the nf_tables behaviours egret
# relies on (scripts/kernel-facts.sh). The suites are the list's, in its order.
stage env KM_SUITES="$(cut -d: -f1 scripts/kernel-matrix-ci.txt | awk '!seen[$0]++' | tr '\n' ' ')" \
  KM_TESTS="$(tr '\n' ' ' <scripts/kernel-matrix-ci.txt)" \
  KM_SUITE_TIMEOUT=1500 KM_VM_TIMEOUT=2400 bash scripts/kernel-matrix.sh 6.1 5.10 6.12
echo
if [ ${#failed[@]} -gt 0 ]; then
  echo "FAILED stages:"
  printf '  %s\n' "${failed[@]}"
  exit 1
fi
echo "all stages passed"
