#!/usr/bin/env bash
# Fetches Debian trixie's docker.io (Docker 26+) into a cache directory,
# unpacked, without installing it: a private apt state (sources, lists,
# cache) names trixie only, `apt-get download` takes the .deb, `dpkg-deb -x`
# unpacks it. The machine's apt configuration and installed packages are not
# touched. Prints the unpacked dockerd's path.
#   scripts/fetch-docker-trixie.sh [CACHE_DIR]   (default: target/docker-trixie)
set -euo pipefail
cd "$(dirname "$0")/.."
d=$(realpath -m "${1:-target/docker-trixie}")
mkdir -p "$d/apt/state/lists/partial" "$d/apt/cache/archives/partial" "$d/apt/prefs" "$d/debs"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" >"$d/apt/sources.list"
a=(-o "Dir::Etc::SourceList=$d/apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
  -o "Dir::State=$d/apt/state" -o "Dir::Cache=$d/apt/cache" -o Dir::Etc::Preferences=/nonexistent
  -o "Dir::Etc::PreferencesParts=$d/apt/prefs" -o Debug::NoLocking=1
  -o Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false
  -o Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false
  -o Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false)
apt-get -qq "${a[@]}" update >&2
version=$(apt-cache "${a[@]}" show docker.io | awk '/^Version:/ {print $2; exit}')
[ -n "$version" ] || { echo "no docker.io in trixie" >&2; exit 1; }
root=$d/root
if [ "$(cat "$root/.version" 2>/dev/null)" != "$version" ]; then
  (cd "$d/debs" && rm -f ./*.deb && apt-get -qq "${a[@]}" download docker.io >&2)
  rm -rf "$root"
  mkdir -p "$root"
  dpkg-deb -x "$d"/debs/docker.io_*.deb "$root"
  echo "$version" >"$root/.version"
fi
rm -rf "$d/apt/state/lists" "$d/apt/cache" "$d/debs"
echo "$root/usr/sbin/dockerd"
