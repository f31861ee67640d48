#!/usr/bin/env bash
# The file-restore appliance (SPEC 16.3): a kernel and an initramfs that together are a small throw-away VM
# reading LVM, ext2/3/4, xfs, btrfs, vfat and NTFS from read-only virtio disks and serving their files over a
# virtio-serial port (agent.c). Built from Debian's packages on this host: Debian's cloud kernel (downloaded with
# apt-get, unpacked, never installed: it has dm-mod, xfs, btrfs, vfat and fuse as modules; no ntfs3, so NTFS is
# read through ntfs-3g on FUSE), and this host's busybox (static), lvm, ntfs-3g and GNU tar with the libraries
# ldd lists for them (the Debian packages busybox-static, lvm2, ntfs-3g, tar), and the agent compiled here (gcc).
# Output in OUT (made fresh): vmlinuz, initrd (uncompressed cpio: nothing to decompress under TCG),
# kernel-release. Usage: build-appliance.sh AGENT_C OUT. No network in the appliance, no disk of its own.
set -euo pipefail
agent_c=${1:?usage: build-appliance.sh AGENT_C OUT}
out=${2:?usage: build-appliance.sh AGENT_C OUT}
work=$(mktemp -d /tmp/engine-appliance.XXXXXX)
trap 'rm -rf "$work"' EXIT
need() { command -v "$1" >/dev/null 2>&1 || { echo "build-appliance: $1 is not installed (Debian package $2)" >&2; exit 1; }; }
need busybox busybox-static
need lvm lvm2
need ntfs-3g ntfs-3g
need tar tar
need gcc gcc
need cpio cpio
need blkid util-linux
need apt-get apt

kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
[ -n "$kpkg" ] || { echo "build-appliance: apt knows no linux-image-cloud-amd64" >&2; exit 1; }
(cd "$work" && apt-get download -q "$kpkg" >/dev/null 2>&1) || { echo "build-appliance: apt-get download $kpkg failed" >&2; exit 1; }
dpkg-deb -x "$work"/"$kpkg"_*.deb "$work/kernel"
release=${kpkg#linux-image-}
moddir="$work/kernel/lib/modules/$release"
[ -f "$work/kernel/boot/vmlinuz-$release" ] && [ -d "$moddir" ] || { echo "build-appliance: no kernel in $kpkg" >&2; exit 1; }

root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,run,mnt,tmp,etc,modules,lib64}

# Modules in dependency order (the .deb has no modules.dep; each .ko names its own in its modinfo "depends=").
# Grouped: init loads a group only when a volume needs it (under TCG, loading btrfs.ko or xfs.ko costs ~1 s each).
# modules/<group>.list names a group's modules, dependencies first; a module already loaded is skipped.
order=()
add_module() {
  local m=$1 ko dep
  for dep in "${order[@]}"; do [ "$dep" = "$m" ] && return; done
  ko=$(find "$moddir" -name "$m.ko" | head -1)
  [ -n "$ko" ] || { echo "build-appliance: module $m not found in $kpkg" >&2; exit 1; }
  for dep in $(tr '\0' '\n' < "$ko" | sed -n 's/^depends=//p' | tr ',' ' '); do add_module "$dep"; done
  cp "$ko" "$root/modules/$m.ko"
  order+=("$m")
}
group() {
  local name=$1 m
  shift
  order=()
  for m in "$@"; do add_module "$m"; done
  printf '%s\n' "${order[@]}" > "$root/modules/$name.list"
}
group base virtio_pci virtio_blk virtio_console
group lvm dm-mod
group xfs xfs
group btrfs btrfs xxhash_generic blake2b_generic
group vfat vfat nls_cp437 nls_utf8 nls_iso8859-1
group ntfs fuse

copy_with_libraries() {
  local binary=$1 target=$2 lib
  cp -L "$binary" "$root$target"
  for lib in $(ldd "$binary" | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
}
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"; done
copy_with_libraries "$(command -v lvm)" /sbin/lvm
copy_with_libraries "$(command -v ntfs-3g)" /bin/ntfs-3g
rm -f "$root/bin/tar"
copy_with_libraries "$(command -v tar)" /bin/tar
# util-linux's blkid (probes ntfs, LVM2_member and the rest reliably; busybox's knows fewer).
rm -f "$root/sbin/blkid"
copy_with_libraries /sbin/blkid /sbin/blkid
gcc -O2 -Wall -Werror -o "$work/agent" "$agent_c"
copy_with_libraries "$work/agent" /sbin/agent
echo "root:x:0:0:root:/:/bin/sh" > "$root/etc/passwd"

cat > "$root/init" <<INIT
#!/bin/busybox sh
# PID 1 of the appliance: load the modules, find the volumes, mount each read-only under /mnt/<name>, list them
# in /run/volumes, and become the agent. Names (SPEC 16.3): d<K> is the disk with serial d<K>; then p<N> for a
# partition, lvm/<VG>/<LV> for a logical volume (under the disk holding the VG's first PV), nothing for a
# filesystem on the whole disk.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mount -t tmpfs run /run
load() { for m in \$(cat /modules/\$1.list); do [ -e /sys/module/\$(echo \$m | tr - _) ] || insmod /modules/\$m.ko 2>/dev/null; done; }
load base
mkdir -p /dev/virtio-ports /run/lock/lvm
for p in /sys/class/virtio-ports/*; do
  [ -e "\$p/name" ] && ln -sf "/dev/\$(basename "\$p")" "/dev/virtio-ports/\$(cat "\$p/name")"
done
: > /run/volumes
candidates=/run/candidates
: > \$candidates
for b in /sys/block/vd*; do
  [ -e "\$b" ] || continue
  dev=\$(basename "\$b")
  serial=\$(cat "\$b/serial" 2>/dev/null)
  case "\$serial" in d[0-9]*) ;; *) continue ;; esac
  echo "\$dev \$serial" >> /run/disks
  parts=0
  for p in "\$b"/"\$dev"*; do
    [ -e "\$p/partition" ] || continue
    parts=1
    echo "/dev/\$(basename "\$p") \$serial/p\$(cat "\$p/partition")" >> \$candidates
  done
  [ \$parts = 1 ] || echo "/dev/\$dev \$serial" >> \$candidates
done
# LVM: every VG found, activated read-only (read_only_volume_list names them all), device nodes made by lvm
# itself (no udev here).
lvmconf='global { locking_dir = "/run/lock/lvm" } activation { udev_sync = 0 udev_rules = 0 verify_udev_operations = 1 monitoring = 0 } devices { obtain_device_list_from_udev = 0 write_cache_state = 0 }'
vgs=""
while read -r dev name; do
  [ "\$(/sbin/blkid -p -o value -s TYPE "\$dev" 2>/dev/null)" = LVM2_member ] && { load lvm; vgs=\$(lvm vgs --noheadings -o vg_name --config "\$lvmconf" 2>/dev/null | tr -d ' '); break; }
done < \$candidates
if [ -n "\$vgs" ]; then
  list=\$(for v in \$vgs; do printf '"%s",' "\$v"; done)
  lvm vgchange -ay --config "\$lvmconf activation { read_only_volume_list = [ \${list%,} ] }" >/dev/null 2>/run/lvm.log
  lvm lvs --noheadings --separator '|' -o vg_name,lv_name,lv_dm_path,devices --config "\$lvmconf" 2>/dev/null |
  while IFS='|' read -r vg lv path devices; do
    vg=\$(echo \$vg); pv=\${devices%%(*}; pv=\${pv%%,*}
    owner=\$(grep "^/dev/\$(basename "\$pv") " \$candidates | head -1 | cut -d' ' -f2 | cut -d/ -f1)
    [ -n "\$owner" ] && [ -n "\$path" ] && echo "\$path \$owner/lvm/\$vg/\$lv" >> \$candidates
  done
fi
while read -r dev name; do
  type=\$(/sbin/blkid -p -o value -s TYPE "\$dev" 2>/dev/null)
  size=\$(blockdev --getsize64 "\$dev" 2>/dev/null)
  dir="/mnt/\$name"
  state=mounted
  detail=""
  case "\$type" in
    xfs|btrfs|vfat) load \$type ;;
    ntfs) load ntfs ;;
  esac
  case "\$type" in
    ext2|ext3|ext4) mkdir -p "\$dir"; mount -t ext4 -o ro,noload "\$dev" "\$dir" 2>/run/err || state=failed ;;
    xfs) mkdir -p "\$dir"; mount -t xfs -o ro,norecovery "\$dev" "\$dir" 2>/run/err || state=failed ;;
    btrfs) mkdir -p "\$dir"; mount -t btrfs -o ro,rescue=nologreplay,subvolid=5 "\$dev" "\$dir" 2>/run/err || state=failed ;;
    vfat) mkdir -p "\$dir"; mount -t vfat -o ro,iocharset=utf8,shortname=mixed "\$dev" "\$dir" 2>/run/err || state=failed ;;
    ntfs) mkdir -p "\$dir"; ntfs-3g -o ro "\$dev" "\$dir" 2>/run/err || state=failed ;;
    LVM2_member) state=lvm; detail="physical volume" ;;
    "") state=unknown; detail="no filesystem recognised" ;;
    *) state=unsupported; detail="filesystem type \$type" ;;
  esac
  # The kernel's own words say more than mount's "Invalid argument".
  [ \$state = failed ] && detail="\$(tr '\n\t' '  ' < /run/err) \$(dmesg | tail -n 2 | tr '\n\t' '  ')"
  printf '%s\t%s\t%s\t%s\t%s\n' "\$name" "\${type:-none}" "\$state" "\${size:-0}" "\$detail" >> /run/volumes
done < \$candidates
echo "ENGINE-APPLIANCE-READY"
exec /sbin/agent /dev/virtio-ports/org.engine.files.0
INIT
chmod 755 "$root/init"

rm -rf "$out"
mkdir -p "$out"
cp "$work/kernel/boot/vmlinuz-$release" "$out/vmlinuz"
(cd "$root" && find . | cpio -o -H newc --quiet) > "$out/initrd"
echo "$release" > "$out/kernel-release"
