#!/usr/bin/env bash
# Installs what egret's build, tests and demos need on Debian 12 (run as root).
# A C compiler builds the bundled SQLite.
# egret itself needs no nft binary; the tests use nft as an independent witness,
# dnsmasq as a real upstream DNS server, dig and curl as real clients, openssl
# for a test certificate, systemd-analyze to check the unit file, chromium and
# chromedriver to test the dashboard in a real headless browser.
# docker.io (dockerd, containerd, runc) and busybox-static (the one-file test
# image) run a real Docker daemon inside a test's network namespace
# (tests/docker.rs); the package must not start its own daemon here.
# debootstrap and systemd-container (systemd-nspawn) make and boot the Debian 12
# container in which the package is installed and started under a real systemd
# (scripts/check-package-systemd.sh); no recommends: libnss-mymachines would
# edit this machine's nsswitch.conf.
# rsyslog: a private rsyslogd (own config, sockets and files, never the system's)
# receives egret's syslog alerts in tests/alerts.rs; prometheus provides promtool,
# which lints the metrics exposition in tests/metrics.rs. Neither daemon is started.
# nginx-light and a JDK (the source launcher needs javac's module) are the
# long-running clients that keep an address past its TTL (tests/dns.rs,
# revalidation); nginx is installed without starting the system's server.
# python3-pip installs the OpenTelemetry project's protobuf definitions
# (opentelemetry-proto, pinned with its protobuf runtime) from PyPI: the OTLP
# receiver of tests/alerts.rs decodes egret's exports with them, not with
# egret's code. Debian 12 ships neither; they go to /usr/local.
# unbound is a local cache behind the DNS guard (tests/dns_cache.rs), run with
# its own config in a test namespace; the system's unbound is not started.
# podman with netavark and aardvark-dns (runc, from docker.io): a real rootful podman service in
# a test's own network and mount namespaces (tests/podman.rs); no recommends.
set -euo pipefail
need=()
for pkg_cmd in nftables:nft iproute2:ip python3:/usr/bin/python3 util-linux:nsenter util-linux:setpriv iptables:iptables build-essential:cc dnsmasq-base:dnsmasq bind9-dnsutils:dig curl:curl python3-pip:/usr/bin/pip3 openssl:openssl systemd:systemd-analyze lintian:lintian chromium:chromium chromium-driver:chromedriver; do
  pkg=${pkg_cmd%%:*} cmd=${pkg_cmd#*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ ! -x /usr/sbin/dockerd ] || [ ! -x /bin/busybox ] || [ ! -x /usr/sbin/debootstrap ] || [ ! -x /usr/bin/systemd-nspawn ] || [ ! -x /usr/sbin/rsyslogd ] || [ ! -x /usr/bin/promtool ] || [ ! -x /usr/sbin/nginx ] || [ ! -x /usr/bin/javac ] || [ ! -x /usr/sbin/unbound ] || [ ! -x /usr/bin/podman ] || [ ! -x /usr/lib/podman/aardvark-dns ]; then
  export DEBIAN_FRONTEND=noninteractive
  [ ${#need[@]} -gt 0 ] || apt-get update -qq
  # policy-rc.d: no daemon is started in this machine's root namespace by the install.
  blocker=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    blocker=/usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get install -y -qq --no-install-recommends docker.io busybox-static debootstrap systemd-container rsyslog prometheus nginx-light default-jdk-headless unbound podman netavark aardvark-dns >/dev/null
  [ -z "$blocker" ] || rm -f "$blocker"
fi
command -v cargo >/dev/null 2>&1 || { echo "egret needs a Rust stable toolchain (rustup) on PATH" >&2; exit 1; }
if ! /usr/bin/python3 -c 'import opentelemetry.proto.collector.logs.v1.logs_service_pb2' 2>/dev/null; then
  # --break-system-packages: PEP 668's marker; these are in no Debian package here.
  /usr/bin/python3 -m pip install -q --disable-pip-version-check --break-system-packages \
    opentelemetry-proto==1.45.2 protobuf==7.36.2
fi
# Docker 26+ (Debian trixie's docker.io, unpacked under target/, never
# installed) for tests/docker.rs's newer-Docker variants: ~30 MB and about a
# minute and a half; those tests are skipped, with the reason, without it.
here=$(cd "$(dirname "$0")" && pwd)
if [ ! -x "$here/../target/docker-trixie/root/usr/sbin/dockerd" ]; then
  "$here/fetch-docker-trixie.sh" >/dev/null || echo "warning: Debian trixie's docker.io was not fetched: tests/docker.rs skips its newer-Docker variants" >&2
fi
