#!/usr/bin/env bash
# The whole test suite. Run as root: the integration tests create their own
# network namespaces (never touching this machine's own firewall) and cgroups.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root: the tests create network namespaces" >&2; exit 1; }
bash scripts/deps.sh
cargo test --all-targets
# The Debian package: built and checked, never installed or started here;
# then installed and started under systemd in a booted Debian 12 container.
bash scripts/check-package.sh
bash scripts/check-package-systemd.sh target/debian/egret_*.deb
