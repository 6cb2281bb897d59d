#!/usr/bin/env bash
# Builds the Debian package (target/debian/egret_*.deb) with cargo-deb. Man
# pages and shell completions are generated from the CLI definition first.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo-deb >/dev/null 2>&1 || cargo install cargo-deb --locked -q
cargo build --release -q
rm -rf target/assets
mkdir -p target/assets/man target/assets/completions
cp target/release/egret target/assets/egret
strip --strip-unneeded target/assets/egret
target/release/egret man target/assets/man >/dev/null
gzip -9n target/assets/man/*.1
target/release/egret completions bash > target/assets/completions/egret.bash
target/release/egret completions zsh > target/assets/completions/_egret
target/release/egret completions fish > target/assets/completions/egret.fish
rm -f target/debian/egret_*.deb
cargo deb --no-build -q "$@" >/dev/null
ls target/debian/egret_*.deb
