#!/usr/bin/env bash
# Guest disks in the layouts people run, for the file-restore tests (files-vm, files-fuse; built once per version
# of this script and cached by test/files-tree.ts's filesDisks). In OUT (new):
#   src/        the files every filesystem below holds (src/unix: with symlinks and a hostile name, for the
#               filesystems that can hold them; src/plain: for vfat and NTFS)
#   vda.img     GPT: p1 an EFI system partition (vfat, populated with mtools' mcopy: this host's kernel has
#               no vfat), p2 an LVM physical volume of VG "guestvg" holding LV "root" with xfs
#   vdb.img     MBR: p1 ext4, p2 NTFS (mkntfs, populated through ntfs-3g's FUSE mount)
#   vdc.img     btrfs on the whole disk, with a subvolume "@home"
# LVM: this host's kernel has no device-mapper targets, so lvcreate fails; pvcreate and vgcreate work on a loop
# device, and the logical volume is added to the VG's metadata with vgcfgbackup/vgcfgrestore (text metadata:
# one linear segment from extent 0), which needs no device-mapper. The LV's bytes start at the PV's pe_start.
# Needs root (loop devices, mounts) and the packages lvm2, xfsprogs, dosfstools, mtools, ntfs-3g, btrfs-progs,
# e2fsprogs, fdisk.
set -euo pipefail
out=${1:?usage: build-files-disks.sh OUT}
# One build at a time on a host: the VG name is the host's (LVM's own metadata and locks), and test runs (other
# worktrees') may build at once.
# The same lock serializes every test's loop devices (test/restore-guard.test.ts holds it too): a loop device
# this build had just released was found "in use by the system" by another test's mkfs.
exec 9>/run/lock/engine-test-loop-devices.lock
flock 9
mkdir -p "$out"
work=$(mktemp -d /tmp/engine-files-disks.XXXXXX)
loop=""
mnt="$work/mnt"
mkdir -p "$mnt"
vg=guestvg
cleanup() {
  mountpoint -q "$mnt" && umount "$mnt"
  if [ -n "$loop" ]; then
    vgchange -an "$vg" >/dev/null 2>&1 || true
    losetup -d "$loop" || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
export LVM_SUPPRESS_FD_WARNINGS=1

# The files. Times are fixed so that a restore's times can be compared exactly.
src="$out/src"
mkdir -p "$src/plain/docs/deeper" "$src/unix"
printf 'guest-host\n' > "$src/plain/hostname"
printf 'a file with spaces in its name\n' > "$src/plain/docs/name with spaces.txt"
printf 'unicode: Grüße, 日本語, ελληνικά\n' > "$src/plain/docs/ünïcødé 日本.txt"
head -c 3000017 /dev/urandom > "$src/plain/docs/deeper/random.bin"
head -c 5000 /dev/zero > "$src/plain/docs/deeper/zeros.bin"
cp -a "$src/plain/." "$src/unix/"
mkdir -p "$src/unix/etc"
printf 'guest-host\n' > "$src/unix/etc/hostname"
printf 'secret\n' > "$src/unix/etc/shadow-ish"
chmod 0640 "$src/unix/etc/shadow-ish"
chmod 4755 "$src/unix/docs/deeper/random.bin"
chown 1234:2345 "$src/unix/docs/name with spaces.txt"
# Hostile: control characters in a name, a symlink out of the volume, a symlink up through "..".
printf 'escape attempt\n' > "$src/unix/bad"$'\n'"name"$'\033'"[31m"
ln -s /tmp/engine-files-escaped "$src/unix/escape"
ln -s ../../../../.. "$src/unix/up"
find "$src" -exec touch -h -d '2024-02-29 12:34:56.123456789 UTC' {} +
touch -d '2023-01-02 03:04:05 UTC' "$src/unix/etc/hostname" "$src/plain/hostname"

# vda: GPT, ESP (vfat) + LVM PV with an xfs LV.
esp="$work/esp.img"
truncate -s 32M "$esp"
mkfs.vfat -n ESP "$esp" >/dev/null
mcopy -s -m -i "$esp" "$src/plain/"* ::/
pv="$work/pv.img"
truncate -s 400M "$pv"
loop=$(losetup --find --show "$pv")
pvcreate -q "$loop" >/dev/null
vgcreate -q "$vg" "$loop" >/dev/null
vgcfgbackup -q -f "$work/vg.conf" "$vg" >/dev/null
extent_kib=$(vgs --noheadings --units k --nosuffix -o vg_extent_size "$vg" | tr -d ' ' | cut -d. -f1)
pe_start=$(pvs --noheadings --units b --nosuffix -o pe_start "$loop" | tr -d ' ')
lv_extents=$((320 * 1024 / extent_kib))
lvid=$(python3 -c "import random, string; s = ''.join(random.choice(string.ascii_letters + string.digits) for _ in range(32)); print('-'.join([s[:6], s[6:10], s[10:14], s[14:18], s[18:22], s[22:26], s[26:]]))")
# The LV goes in before the VG section's last closing brace.
python3 - "$work/vg.conf" "$lvid" "$lv_extents" <<'PY'
import sys
path, lvid, extents = sys.argv[1], sys.argv[2], int(sys.argv[3])
text = open(path).read()
lv = f'''
	logical_volumes {{
		root {{
			id = "{lvid}"
			status = ["READ", "WRITE", "VISIBLE"]
			flags = []
			creation_time = 1700000000
			creation_host = "guest"
			segment_count = 1
			segment1 {{
				start_extent = 0
				extent_count = {extents}
				type = "striped"
				stripe_count = 1
				stripes = [
					"pv0", 0
				]
			}}
		}}
	}}
'''
end = text.rindex('}')
open(path, 'w').write(text[:end] + lv + text[end:])
PY
vgcfgrestore -q -f "$work/vg.conf" "$vg" >/dev/null
vgs --noheadings -o lv_count "$vg" | grep -q 1
losetup -d "$loop"
loop=""
xfs="$work/xfs.img"
truncate -s 320M "$xfs"
mkfs.xfs -q -L guestroot "$xfs"
mount -o loop "$xfs" "$mnt"
cp -a "$src/unix/." "$mnt/"
umount "$mnt"
dd if="$xfs" of="$pv" bs=1M seek=$((pe_start / 1048576)) conv=notrunc,sparse status=none
truncate -s $((1 + 32 + 400 + 1))M "$out/vda.img"
printf 'label: gpt\nstart=2048, size=32M, type=U, name="EFI"\nsize=400M, type=V, name="lvm"\n' | sfdisk -q "$out/vda.img" >/dev/null
dd if="$esp" of="$out/vda.img" bs=1M seek=1 conv=notrunc,sparse status=none
dd if="$pv" of="$out/vda.img" bs=1M seek=33 conv=notrunc,sparse status=none

# vdb: MBR, ext4 + NTFS.
truncate -s $((1 + 64 + 64))M "$out/vdb.img"
printf 'start=2048, size=64M, type=83\nsize=64M, type=7\n' | sfdisk -q "$out/vdb.img" >/dev/null
ext4="$work/ext4.img"
truncate -s 64M "$ext4"
mke2fs -q -t ext4 -L guestdata "$ext4"
mount -o loop "$ext4" "$mnt"
cp -a "$src/unix/." "$mnt/"
umount "$mnt"
dd if="$ext4" of="$out/vdb.img" bs=1M seek=1 conv=notrunc,sparse status=none
ntfs="$work/ntfs.img"
truncate -s 64M "$ntfs"
mkntfs -q -F -f -L WINDATA "$ntfs" >/dev/null 2>&1
ntfs-3g "$ntfs" "$mnt"
cp -r --preserve=timestamps "$src/plain/." "$mnt/"
umount "$mnt"
dd if="$ntfs" of="$out/vdb.img" bs=1M seek=65 conv=notrunc,sparse status=none

# vdc: btrfs on the whole disk, a subvolume holding files.
truncate -s 160M "$out/vdc.img"
mkfs.btrfs -q -L guestbtrfs "$out/vdc.img" >/dev/null
mount -o loop "$out/vdc.img" "$mnt"
btrfs -q subvolume create "$mnt/@home" >/dev/null
cp -a "$src/unix/." "$mnt/@home/"
umount "$mnt"
