#!/bin/bash
# A real-data disk image for the benches (issue 15): an ext4 file system of 3 GiB filled from this machine's
# own /usr (binaries, shared libraries, Python, headers, docs, locales), about 2 GiB allocated.
# Built once and cached outside the repository:
#   bash bench/real-image.sh [OUT]      (default /var/tmp/engine-real-image/usr.img; root not needed)
# The staging tree is hard links where /usr and OUT share a file system (instant), copies elsewhere; it is
# removed afterwards. The image is the same from run to run on one machine only as far as /usr is.
set -euo pipefail
out=${1:-/var/tmp/engine-real-image/usr.img}
if [ -s "$out" ]; then echo "$out exists ($(du -h --apparent-size "$out" | cut -f1) apparent, $(du -h "$out" | cut -f1) allocated)"; exit 0; fi
mkdir -p "$(dirname "$out")"
stage=$(mktemp -d "$(dirname "$out")/stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/usr/lib"
for d in bin sbin include share libexec lib/x86_64-linux-gnu lib/python3 lib/python3.11; do
  [ -d "/usr/$d" ] || continue
  mkdir -p "$stage/usr/$(dirname "$d")"
  cp -a --link "/usr/$d" "$stage/usr/$d" 2>/dev/null || cp -a "/usr/$d" "$stage/usr/$d"
done
# -E root_owner: files keep their owners; no journal replay or lazy init left for a later mount to do.
mke2fs -q -t ext4 -E lazy_itable_init=0,lazy_journal_init=0 -d "$stage" "$out.part" 3G
mv "$out.part" "$out"
echo "$out: $(du -h --apparent-size "$out" | cut -f1) apparent, $(du -h "$out" | cut -f1) allocated"
