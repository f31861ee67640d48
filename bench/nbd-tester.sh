#!/usr/bin/env bash
# Builds nbd-tester-client, the NBD reference implementation's own test client (tests/run/nbd-tester-client.c
# of the nbd project, the source of Debian's nbd-server and nbd-client packages), for bench/overlay-writes.ts.
# It is not packaged by Debian: it is built from the nbd source, at the version of Debian 12's nbd-server
# (3.24), so that client and reference server come from the same release.
#
#   bash bench/nbd-tester.sh [OUT_DIR]      prints the path of the built client (OUT_DIR default
#                                           /var/tmp/engine-nbd-tester; an existing build is reused)
#
# Where the source comes from, first that works:
#   1. NBD_SOURCE=DIR: a checkout of the nbd project (git tag nbd-3.24) or an unpacked nbd source package;
#   2. `apt-get source nbd` (needs a deb-src line for Debian's main archive). Measured on this project's
#      machine (2026-12): the mirror serves nbd_3.24-1.1.dsc but answers 404 for nbd_3.24.orig.tar.gz, so
#      the bench there was run with NBD_SOURCE set to a checkout of the project's public repository.
# Build needs (Debian packages): build-essential autoconf automake libtool autoconf-archive bison flex
# pkg-config libglib2.0-dev libgnutls28-dev; installed here when missing and run as root.
set -euo pipefail
out=${1:-/var/tmp/engine-nbd-tester}
client=$out/nbd-tester-client
if [ -x "$client" ]; then echo "$client"; exit 0; fi
mkdir -p "$out"
work=$(mktemp -d "${TMPDIR:-/tmp}/engine-nbd-tester-XXXXXX")
trap 'rm -rf "$work"' EXIT

missing=()
for tool in gcc:build-essential autoreconf:autoconf automake:automake libtoolize:libtool bison:bison flex:flex pkg-config:pkg-config; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool##*:}")
done
pkg-config --exists glib-2.0 2>/dev/null || missing+=(libglib2.0-dev)
pkg-config --exists gnutls 2>/dev/null || missing+=(libgnutls28-dev)
[ -d /usr/share/aclocal ] && ls /usr/share/aclocal/ax_*.m4 >/dev/null 2>&1 || missing+=(autoconf-archive)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then echo "nbd-tester.sh: missing ${missing[*]} (install them as root)" >&2; exit 1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ -n "${NBD_SOURCE:-}" ]; then
  if git -C "$NBD_SOURCE" rev-parse --verify -q "${NBD_TAG:-nbd-3.24}^{commit}" >/dev/null 2>&1; then
    git -C "$NBD_SOURCE" archive "${NBD_TAG:-nbd-3.24}" | tar -x -C "$work"
  else
    cp -a "$NBD_SOURCE/." "$work/"
  fi
  src=$work
else
  (cd "$work" && apt-get source -qq --download-only nbd >/dev/null && dpkg-source -x --no-check nbd_*.dsc src >/dev/null) || {
    echo "nbd-tester.sh: apt-get source nbd failed; set NBD_SOURCE to a checkout of the nbd project (tag nbd-3.24)" >&2
    exit 1
  }
  src=$work/src
fi

cd "$src"
# A git checkout has no generated man pages, and their generator (docbook2man) is not needed for the client:
# empty stand-ins let configure run.
for page in nbd-server.1 nbd-server.5 nbd-client.8 nbd-trdump.1 nbd-trplay.1 nbdtab.5; do
  [ -f "man/$page.sh.in" ] || : > "man/$page.sh.in"
done
[ -f systemd/nbd@.service.sh.in ] || make -s -C systemd -f Makefile.am nbd@.service.sh.in >/dev/null
[ -x configure ] || autoreconf -f -i >/dev/null 2>&1
./configure --disable-manpages >/dev/null
make -s -C tests/run nbd-tester-client >/dev/null
cp tests/run/nbd-tester-client tests/run/integrity-test.tr "$out/"
echo "$client"
