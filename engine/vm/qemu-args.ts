/**
 * The command line of a throw-away QEMU VM, from what it is for: disks (NBD exports or files, read-only
 * or not), firmware, an optional kernel, virtio-serial ports on Unix sockets, the serial console to a
 * file, a QMP socket. Never a network (`-nic none`), never a default device (`-nodefaults`), no display
 * but the serial console (`graphics=off` also sends SeaBIOS's messages there: "No bootable device."),
 * and no reboot: a guest that resets has failed, and QEMU exits.
 */

export type VmDisk =
  /** An NBD export on a Unix socket (engine serve's machinery). */
  | { kind: 'nbd'; socket: string; exportName: string; readOnly: boolean; serial?: string | undefined }
  | { kind: 'file'; path: string; format: 'raw' | 'qcow2'; readOnly: boolean; serial?: string | undefined };

export interface VmSpec {
  /** `q35`, `pc`, or a versioned type (`pc-q35-7.2`): what the guest was made on, when known. */
  machine: string;
  firmware: 'bios' | 'uefi';
  /** UEFI: the firmware's code and a throw-away copy of its variables (firmware.ts finds them). */
  uefi?: { code: string; vars: string } | undefined;
  memoryBytes: number;
  cpus: number;
  /**
   * `kvm` runs with `-cpu host` (the host's CPU, as KVM is meant to be used) and nothing to fall back to inside
   * QEMU: a KVM that cannot run the guest makes QEMU exit or stop the guest, which qemu.ts reports as
   * KvmFailedError, and the caller starts again under `tcg` (accelerator.ts).
   */
  accelerator: 'kvm' | 'tcg';
  disks: VmDisk[];
  kernel?: { path: string; initrd?: string | undefined; append?: string | undefined } | undefined;
  /**
   * virtio-serial ports, each on a Unix socket: QEMU listens on it (the guest agent's, `org.qemu.guest_agent.0`),
   * or, with `qemuConnects`, the engine listens and QEMU connects at its start (the file-restore appliance's:
   * the connection exists before the guest runs).
   */
  serialPorts: { name: string; socket: string; qemuConnects?: boolean | undefined }[];
  consoleFile: string;
  qmpSocket: string;
  /** QEMU's own messages (its stdout and stderr), appended. */
  logFile: string;
}

export function qemuArgs(spec: VmSpec): string[] {
  const args = ['-nodefaults', '-no-user-config', '-nic', 'none', '-display', 'none', '-no-reboot'];
  args.push('-machine', `${spec.machine},graphics=off`);
  args.push('-accel', spec.accelerator);
  if (spec.accelerator === 'kvm') args.push('-cpu', 'host');
  args.push('-m', `${Math.max(1, Math.floor(spec.memoryBytes / (1024 * 1024)))}M`, '-smp', String(spec.cpus));
  if (spec.firmware === 'uefi') {
    if (!spec.uefi) throw new Error('qemuArgs: UEFI without firmware files');
    args.push('-drive', `if=pflash,format=raw,unit=0,readonly=on,file=${optionValue(spec.uefi.code)}`);
    args.push('-drive', `if=pflash,format=raw,unit=1,file=${optionValue(spec.uefi.vars)}`);
  }
  args.push('-chardev', `file,id=console0,path=${chardevPath(spec.consoleFile)}`, '-serial', 'chardev:console0');
  args.push('-qmp', `unix:${chardevPath(spec.qmpSocket)},server=on,wait=off`);
  for (const [i, disk] of spec.disks.entries()) {
    // JSON -blockdev: no escaping rules for paths and export names, whatever they hold.
    const file =
      disk.kind === 'nbd'
        ? { driver: 'nbd', server: { type: 'unix', path: disk.socket }, export: disk.exportName }
        : { driver: 'file', filename: disk.path };
    const format = disk.kind === 'nbd' ? 'raw' : disk.format;
    args.push('-blockdev', JSON.stringify({ driver: format, 'node-name': `disk${i}`, 'read-only': disk.readOnly, file }));
    // The disks' order is the boot order, unless a kernel is given (QEMU boots it first anyway; no guest disk
    // is then meant to boot). A serial number names the disk to the guest (/dev/disk/by-id/virtio-<serial>).
    const serial = disk.serial === undefined ? '' : `,serial=${optionValue(disk.serial)}`;
    args.push('-device', `virtio-blk-pci,drive=disk${i}${spec.kernel ? '' : `,bootindex=${i + 1}`}${serial}`);
  }
  if (spec.serialPorts.length > 0) {
    args.push('-device', 'virtio-serial-pci,id=vser0');
    for (const [i, port] of spec.serialPorts.entries()) {
      args.push('-chardev', `socket,id=port${i},path=${chardevPath(port.socket)}${port.qemuConnects ? '' : ',server=on,wait=off'}`);
      args.push('-device', `virtserialport,bus=vser0.0,chardev=port${i},name=${port.name}`);
    }
  }
  if (spec.kernel) {
    args.push('-kernel', spec.kernel.path);
    if (spec.kernel.initrd !== undefined) args.push('-initrd', spec.kernel.initrd);
    if (spec.kernel.append !== undefined) args.push('-append', spec.kernel.append);
  }
  return args;
}

/** QEMU's option syntax splits on commas (`,,` is a literal one): paths are ours, but say so rather than misparse. */
function chardevPath(path: string): string {
  if (path.includes(',')) throw new Error(`qemuArgs: a path with a comma: ${path}`);
  return path;
}

/** A value (a path, a serial number) in QEMU's option syntax: commas doubled. */
function optionValue(value: string): string {
  return value.replace(/,/g, ',,');
}
