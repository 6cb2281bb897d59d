#!/usr/bin/env bash
# Builds the Debian package and checks it without installing it: contents,
# conffile, the extracted binary and policy, the unit, lintian. Never starts
# the service or loads rules on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
deb=$(bash scripts/package.sh)
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
fail() { echo "package check: $*" >&2; exit 1; }
listing=$(dpkg-deb -c "$deb" | awk '{print $6}')
for path in ./usr/bin/egret ./usr/lib/systemd/system/egret.service ./etc/egret/policy.toml \
    ./usr/share/man/man1/egret.1.gz ./usr/share/man/man1/egret-run.1.gz ./usr/share/man/man1/egret-doctor.1.gz \
    ./usr/share/bash-completion/completions/egret ./usr/share/zsh/vendor-completions/_egret \
    ./usr/share/fish/vendor_completions.d/egret.fish ./usr/share/doc/egret/copyright ./usr/share/doc/egret/changelog.Debian.gz; do
  grep -qx "$path" <<<"$listing" || fail "$path is missing from $deb"
done
dpkg-deb --info "$deb" conffiles | grep -qx /etc/egret/policy.toml || fail "/etc/egret/policy.toml is not a conffile"
# The resolved drop-in is an example the admin copies: never active by itself.
grep -qx ./usr/share/doc/egret/examples/resolved-egret.conf <<<"$listing" || fail "the resolved example is missing"
! grep -q '^\./etc/systemd/' <<<"$listing" || fail "the package must not configure systemd-resolved by itself"
dpkg-deb -x "$deb" "$tmp"
"$tmp/usr/bin/egret" --version | grep -q "^egret " || fail "the packaged binary does not run"
"$tmp/usr/bin/egret" check "$tmp/etc/egret/policy.toml" >/dev/null || fail "the packaged policy does not pass egret check"
grep -q '^mode = "audit"' "$tmp/etc/egret/policy.toml" || fail "the packaged policy does not start in audit mode"
sed "s|/usr/bin/egret|$tmp/usr/bin/egret|" "$tmp/usr/lib/systemd/system/egret.service" > "$tmp/egret.service"
systemd-analyze verify --man=no "$tmp/egret.service" || fail "the unit does not verify"
lintian --fail-on error,warning "$deb" 2>&1 | grep -v "running with root privileges" || true
lintian --fail-on error,warning "$deb" >/dev/null 2>&1 || fail "lintian is not clean"
echo "package ok: $deb ($(du -h "$deb" | cut -f1))"
