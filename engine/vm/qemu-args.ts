/**
 * The command line of a throw-away QEMU VM, from what it is for: disks (NBD exports or files, read-only
 * or not), firmware, an optional kernel, virtio-serial ports on Unix sockets, the serial console to a
 * file, a QMP socket. Never a network (`-nic none`), never a default device (`-nodefaults`), no display
 * but the serial console (`graphics=off` also sends SeaBIOS's messages there: "No bootable device."),
 * and no reboot: a guest that resets has failed, and QEMU exits.
 */

export type VmDisk =
  /** An NBD export on a Unix socket (engine serve's machinery). */
  | { kind: 'nbd'; socket: string; exportName: string; readOnly: boolean }
  | { kind: 'file'; path: string; format: 'raw' | 'qcow2'; readOnly: boolean };

export interface VmSpec {
  /** `q35`, `pc`, or a versioned type (`pc-q35-7.2`): what the guest was made on, when known. */
  machine: string;
  firmware: 'bios' | 'uefi';
  /** UEFI: the firmware's code and a throw-away copy of its variables (firmware.ts finds them). */
  uefi?: { code: string; vars: string } | undefined;
  memoryBytes: number;
  cpus: number;
  /** `kvm` only when /dev/kvm can be opened; QEMU falls back to TCG when KVM cannot start (QMP `query-kvm` says which ran). */
  accelerators: ('kvm' | 'tcg')[];
  disks: VmDisk[];
  kernel?: { path: string; initrd?: string | undefined; append?: string | undefined } | undefined;
  /** virtio-serial ports, each a Unix socket QEMU listens on (the guest agent's is `org.qemu.guest_agent.0`). */
  serialPorts: { name: string; socket: string }[];
  consoleFile: string;
  qmpSocket: string;
  /** QEMU's own messages (its stdout and stderr), appended. */
  logFile: string;
}

export function qemuArgs(spec: VmSpec): string[] {
  const args = ['-nodefaults', '-no-user-config', '-nic', 'none', '-display', 'none', '-no-reboot'];
  args.push('-machine', `${spec.machine},graphics=off`);
  for (const accel of spec.accelerators) args.push('-accel', accel);
  args.push('-m', `${Math.max(1, Math.floor(spec.memoryBytes / (1024 * 1024)))}M`, '-smp', String(spec.cpus));
  if (spec.firmware === 'uefi') {
    if (!spec.uefi) throw new Error('qemuArgs: UEFI without firmware files');
    args.push('-drive', `if=pflash,format=raw,unit=0,readonly=on,file=${drivePath(spec.uefi.code)}`);
    args.push('-drive', `if=pflash,format=raw,unit=1,file=${drivePath(spec.uefi.vars)}`);
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
    args.push('-device', `virtio-blk-pci,drive=disk${i},bootindex=${i + 1}`);
  }
  if (spec.serialPorts.length > 0) {
    args.push('-device', 'virtio-serial-pci,id=vser0');
    for (const [i, port] of spec.serialPorts.entries()) {
      args.push('-chardev', `socket,id=port${i},path=${chardevPath(port.socket)},server=on,wait=off`);
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

function drivePath(path: string): string {
  return path.replace(/,/g, ',,');
}
