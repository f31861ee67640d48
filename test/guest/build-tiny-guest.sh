#!/usr/bin/env bash
# A small, real, bootable Linux guest with a QEMU guest agent, built from Debian's own packages on this machine
# (recipe and pitfalls measured in ../shared/reference/tiny-guest.md). Output in OUT (made fresh):
#   guest.img   raw, 128 MiB, boots by itself: MBR (syslinux) -> SYSLINUX -> Debian's cloud kernel -> ext3 root
#               on /dev/vda1 holding busybox, qemu-ga and its libraries; init starts the agent on the virtio-serial
#               port org.qemu.guest_agent.0 and prints "TINY-GUEST-READY" on ttyS0.
#   vmlinuz, initrd.gz   the same kernel and initramfs, for direct kernel boot (-kernel/-initrd) when wanted.
#   kernel-release       the kernel's release string (modules live under lib/modules/<release> in the root).
# Usage: build-tiny-guest.sh OUT. Needs root (a loop mount with an offset, for extlinux), apt-get download access,
# and the packages busybox-static, qemu-guest-agent, extlinux, syslinux-common, cpio, fdisk, e2fsprogs.
set -euo pipefail
out=${1:?usage: build-tiny-guest.sh OUT}
work=$(mktemp -d /tmp/engine-tiny-guest.XXXXXX)
mnt=""
cleanup() {
  if [ -n "$mnt" ] && mountpoint -q "$mnt"; then umount "$mnt"; fi
  rm -rf "$work"
}
trap cleanup EXIT

# The kernel: Debian's cloud kernel (ext4 and devtmpfs built in, virtio as modules), unpacked, never installed.
kpkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
# (apt warns that _apt cannot write into a private folder and downloads as root: harmless, so quiet.)
(cd "$work" && apt-get download -q "$kpkg" >/dev/null 2>&1) || { echo "build-tiny-guest: apt-get download $kpkg failed" >&2; exit 1; }
dpkg-deb -x "$work"/"$kpkg"_*.deb "$work/kernel"
release=${kpkg#linux-image-}
vmlinuz="$work/kernel/boot/vmlinuz-$release"
moddir="$work/kernel/lib/modules/$release"
[ -f "$vmlinuz" ] && [ -d "$moddir" ] || { echo "build-tiny-guest: no kernel in $kpkg" >&2; exit 1; }

# The initramfs: static busybox and the virtio modules, loaded in dependency order (the .deb has no modules.dep).
initramfs="$work/initramfs"
mkdir -p "$initramfs"/{bin,dev,proc,sys,newroot,modules}
cp /bin/busybox "$initramfs/bin/busybox"
modules="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk virtio_console"
for m in $modules; do
  ko=$(find "$moddir" -name "$m.ko" -o -name "$m.ko.xz" | head -1)
  [ -n "$ko" ] || { echo "build-tiny-guest: module $m not found" >&2; exit 1; }
  case "$ko" in *.xz) xz -dc "$ko" > "$initramfs/modules/$m.ko" ;; *) cp "$ko" "$initramfs/modules/$m.ko" ;; esac
done
cat > "$initramfs/init" <<INIT
#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sys /sys
/bin/busybox mount -t devtmpfs dev /dev
for m in $modules; do /bin/busybox insmod /modules/\$m.ko 2>/dev/null; done
root=/dev/vda1
for word in \$(/bin/busybox cat /proc/cmdline); do case "\$word" in root=*) root=\${word#root=} ;; esac; done
i=0
while [ ! -b "\$root" ] && [ \$i -lt 100 ]; do /bin/busybox sleep 0.1; i=\$((i+1)); done
if ! /bin/busybox mount -t ext4 "\$root" /newroot; then
  echo "TINY-GUEST-NO-ROOT: cannot mount \$root"
  /bin/busybox poweroff -f
fi
/bin/busybox umount /proc /sys
/bin/busybox mount --move /dev /newroot/dev
exec /bin/busybox switch_root /newroot /sbin/init
INIT
chmod 755 "$initramfs/init"
(cd "$initramfs" && find . | cpio -o -H newc --quiet | gzip -9) > "$work/initrd.gz"

# The root file system: busybox, qemu-ga and the libraries ldd lists for it, an init that starts the agent.
root="$work/root"
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,run,tmp,boot,root,data,lib64,usr/sbin}
# qemu-ga writes its pid file under /var/run.
mkdir -p "$root/var"; ln -s /run "$root/var/run"
cp /bin/busybox "$root/bin/busybox"
for applet in $(/bin/busybox --list); do [ -e "$root/bin/$applet" ] || ln -s busybox "$root/bin/$applet"; done
cp /usr/sbin/qemu-ga "$root/usr/sbin/qemu-ga"
for lib in $(ldd /usr/sbin/qemu-ga | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
done
# qemu-ga's guest-shutdown runs /sbin/shutdown -h -P +0 (or -r); busybox powers off without an init system.
cat > "$root/sbin/shutdown" <<'SHUTDOWN'
#!/bin/sh
case " $* " in *" -r "*) exec /bin/reboot -f ;; *) sync; exec /bin/poweroff -f ;; esac
SHUTDOWN
chmod 755 "$root/sbin/shutdown"
echo "root:x:0:0:root:/root:/bin/sh" > "$root/etc/passwd"
echo "tiny-guest" > "$root/etc/hostname"
cat > "$root/sbin/init" <<'GUESTINIT'
#!/bin/sh
export PATH=/bin:/sbin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t tmpfs run /run
mount -o remount,rw /
mkdir -p /dev/virtio-ports
for p in /sys/class/virtio-ports/*; do
  [ -e "$p/name" ] && ln -sf "/dev/$(basename "$p")" "/dev/virtio-ports/$(cat "$p/name")"
done
if [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ]; then
  qemu-ga -m virtio-serial -p /dev/virtio-ports/org.qemu.guest_agent.0 -d -t /run
fi
echo "TINY-GUEST-READY"
while :; do sleep 3600; done
GUESTINIT
chmod 755 "$root/sbin/init"
cp "$vmlinuz" "$root/boot/vmlinuz"
cp "$work/initrd.gz" "$root/boot/initrd.gz"
cat > "$root/boot/extlinux.conf" <<'CONF'
DEFAULT linux
TIMEOUT 0
PROMPT 0
LABEL linux
  KERNEL /boot/vmlinuz
  APPEND initrd=/boot/initrd.gz root=/dev/vda1 console=ttyS0 quiet
CONF

# The disk: MBR with one bootable partition from sector 2048; ext3 made in place (syslinux 6.04 cannot load a
# kernel from mke2fs 1.47's ext4); extlinux installed through a loop mount; syslinux's MBR code in the first 440 bytes.
img="$work/guest.img"
truncate -s 128M "$img"
echo 'start=2048, type=83, bootable' | sfdisk -q "$img" >/dev/null
mke2fs -q -t ext3 -L tiny-root -E offset=1048576 -d "$root" "$img" 126M
mnt="$work/mnt"
mkdir -p "$mnt"
mount -o loop,offset=1048576 "$img" "$mnt"
extlinux --install "$mnt/boot" >/dev/null 2>&1
umount "$mnt"
mnt=""
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$img" bs=440 count=1 conv=notrunc status=none

rm -rf "$out"
mkdir -p "$out"
cp "$vmlinuz" "$out/vmlinuz"
cp "$work/initrd.gz" "$out/initrd.gz"
echo "$release" > "$out/kernel-release"
mv "$img" "$out/guest.img"
