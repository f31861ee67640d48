/**
 * The boot test's pieces that need no VM: the verification record's decoding rules (SPEC.md 9.2), the
 * machine type and firmware read from a backup's attachments (libvirt domain XML, oVirt OVF), and the QEMU
 * command line (no network, no defaults, NBD disks as -blockdev, the agent's port).
 */
import { describe, expect, test } from 'vitest';
import { decodeVerification, encodeVerification, verificationKey, verificationName, verificationOfKey, type BootVerification } from '../dist/repo-format/verification-record.js';
import { bootTarget } from '../dist/engine/verify/boot-target.js';
import { qemuArgs } from '../dist/engine/vm/qemu-args.js';
import type { BackupRecord } from '../dist/repo-format/backup-record.js';

const BACKUP = '0123456789abcdef0123456789abcdef';
const passed: BootVerification = {
  version: 1,
  kind: 'boot',
  backup: BACKUP,
  started: '2026-12-07T09:00:00.000Z',
  ended: '2026-12-07T09:00:20.000Z',
  result: 'passed',
  reason: null,
  proofOfLifeMs: 9026,
  checks: { expect: 'agent', agentPing: true, filesystems: [{ mountpoint: '/', type: 'ext4', device: 'vda1' }], console: null },
  accelerator: 'tcg',
  machine: 'q35',
  firmware: 'bios',
  memoryBytes: 1024 ** 3,
  qemuVersion: '7.2.22',
  engineVersion: '0.1.0',
  hostname: 'host',
  consoleLogPath: null,
  attachments: [],
};

describe('verification records', () => {
  const name = verificationName(new Date(passed.started));
  const key = verificationKey(BACKUP, name);

  test('names sort by time and parse back; other keys are strays', () => {
    expect(name).toMatch(/^20261207T090000Z-[0-9a-f]{8}$/);
    expect(verificationOfKey(key)).toEqual({ backup: BACKUP, name });
    for (const stray of [`verifications/${BACKUP}/README`, `verifications/${BACKUP}`, `verifications/xyz/${name}`, `verifications/${BACKUP}/${name}/x`]) expect(verificationOfKey(stray)).toBeUndefined();
  });

  test('a record reads back as written; one that breaks a rule is damaged, saying which', () => {
    expect(decodeVerification(encodeVerification(passed), key)).toEqual(passed);
    const broken = (change: Record<string, unknown>, atKey = key): string => {
      try {
        decodeVerification(Buffer.from(JSON.stringify({ ...passed, ...change })), atKey);
        return 'accepted';
      } catch (error) {
        return (error as Error).message;
      }
    };
    expect(broken({ version: 2 })).toContain('version 2 is not 1');
    expect(broken({ reason: { code: 'BOOT_TIMEOUT', message: 'x' } })).toContain('a passed test with a reason');
    expect(broken({ result: 'failed', reason: { code: 'BOOT_BORED', message: 'x' }, proofOfLifeMs: null })).toContain('without a reason of a known code');
    expect(broken({ result: 'failed', reason: { code: 'BOOT_TIMEOUT', message: 'x' } })).toContain('proofOfLifeMs is given exactly when the test passed');
    expect(broken({}, verificationKey('f'.repeat(32), name))).toContain(`lies in the folder of ${'f'.repeat(32)}`);
    expect(broken({ accelerator: 'hvf' })).toContain('accelerator');
    expect(broken({ started: '2026-12-07 09:00' })).toContain('started is not an ISO 8601 UTC time');
    const failed = { result: 'failed', reason: { code: 'BOOT_VM_STOPPED', message: 'the VM stopped' }, proofOfLifeMs: null, consoleLogPath: '/var/cache/engine/boot-logs/x.log', attachments: [{ name: 'console', mediaType: 'text/plain', data: 'panic' }] };
    expect(broken(failed)).toBe('accepted');
  });
});

describe('the machine a backup boots on', () => {
  const record = (attachments: BackupRecord['attachments']): BackupRecord => ({ attachments }) as BackupRecord;

  test('from a libvirt domain XML, an oVirt OVF, the options, or q35 with BIOS', () => {
    const domain = "<domain type='kvm'><os firmware='efi'><type arch='x86_64' machine='pc-q35-7.2'>hvm</type></os></domain>";
    expect(bootTarget(record([{ name: 'domain', mediaType: 'application/xml', data: domain }]), {})).toEqual({ machine: 'q35', firmware: 'uefi', machineFrom: 'libvirt domain XML', firmwareFrom: 'libvirt domain XML' });
    const i440fx = "<domain type='kvm'><os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type><boot dev='hd'/></os></domain>";
    expect(bootTarget(record([{ name: 'domain', mediaType: 'application/xml', data: i440fx }]), {})).toMatchObject({ machine: 'pc', firmware: 'bios' });
    const ovf = '<ovf:Envelope><Content><BiosType>3</BiosType><CustomEmulatedMachine>pc-q35-rhel8.6.0</CustomEmulatedMachine></Content></ovf:Envelope>';
    expect(bootTarget(record([{ name: 'ovf', mediaType: 'application/ovf+xml', data: ovf }]), {})).toEqual({ machine: 'q35', firmware: 'uefi', machineFrom: 'oVirt OVF', firmwareFrom: 'oVirt OVF' });
    expect(bootTarget(record([{ name: 'ovf', mediaType: 'application/ovf+xml', data: '<BiosType>1</BiosType>' }]), { firmware: 'uefi' })).toEqual({ machine: 'pc', firmware: 'uefi', machineFrom: 'oVirt OVF', firmwareFrom: 'option' });
    expect(bootTarget(record([]), {})).toEqual({ machine: 'q35', firmware: 'bios', machineFrom: 'default', firmwareFrom: 'default' });
  });

  /** What the command lines below share: a BIOS q35 with one CPU, its files in one run folder. */
  const BASE_SPEC = { machine: 'q35', firmware: 'bios', cpus: 1, consoleFile: '/run/engine/vms/r/console.log', qmpSocket: '/run/engine/vms/r/qmp.sock', logFile: '/run/engine/vms/r/qemu.log' } as const;

  test('the QEMU command line: no network, no defaults, no reboot, NBD disks in order, the agent port', () => {
    const args = qemuArgs({
      ...BASE_SPEC,
      memoryBytes: 512 * 1024 * 1024,
      accelerator: 'kvm',
      disks: [
        { kind: 'nbd', socket: '/run/engine/vms/r/nbd.sock', exportName: 'os disk', readOnly: false },
        { kind: 'file', path: '/var/tmp/data.qcow2', format: 'qcow2', readOnly: true },
      ],
      serialPorts: [{ name: 'org.qemu.guest_agent.0', socket: '/run/engine/vms/r/qga.sock' }],
    });
    const joined = args.join(' ');
    for (const expected of ['-nodefaults', '-nic none', '-display none', '-no-reboot', '-machine q35,graphics=off', '-accel kvm -cpu host', '-m 512M', '-serial chardev:console0', '-qmp unix:/run/engine/vms/r/qmp.sock,server=on,wait=off']) expect(joined).toContain(expected);
    const blockdevs = args.flatMap((a, i) => (args[i - 1] === '-blockdev' ? [JSON.parse(a) as unknown] : []));
    expect(blockdevs).toEqual([
      { driver: 'raw', 'node-name': 'disk0', 'read-only': false, file: { driver: 'nbd', server: { type: 'unix', path: '/run/engine/vms/r/nbd.sock' }, export: 'os disk' } },
      { driver: 'qcow2', 'node-name': 'disk1', 'read-only': true, file: { driver: 'file', filename: '/var/tmp/data.qcow2' } },
    ]);
    expect(joined).toContain('-device virtio-blk-pci,drive=disk0,bootindex=1 ');
    expect(joined).toContain('-device virtserialport,bus=vser0.0,chardev=port0,name=org.qemu.guest_agent.0');
    expect(joined).toContain('-chardev socket,id=port0,path=/run/engine/vms/r/qga.sock,server=on,wait=off ');
  });

  test("the appliance's command line: TCG, a kernel (no boot order on the disks), serial numbers, a port the engine listens on", () => {
    const args = qemuArgs({
      ...BASE_SPEC,
      memoryBytes: 256 * 1024 * 1024,
      accelerator: 'tcg',
      disks: [{ kind: 'nbd', socket: '/run/engine/vms/r/nbd.sock', exportName: 'vda', readOnly: true, serial: 'd0' }],
      kernel: { path: '/a/vmlinuz', initrd: '/a/initrd', append: 'console=ttyS0' },
      serialPorts: [{ name: 'org.engine.files.0', socket: '/run/engine/vms/r/agent.sock', qemuConnects: true }],
    });
    const joined = `${args.join(' ')} `;
    expect(joined).toContain('-accel tcg -m 256M ');
    expect(joined).not.toContain('-cpu');
    expect(joined).toContain('-device virtio-blk-pci,drive=disk0,serial=d0 ');
    expect(joined).toContain('-chardev socket,id=port0,path=/run/engine/vms/r/agent.sock -device');
    expect(joined).toContain('-kernel /a/vmlinuz -initrd /a/initrd -append console=ttyS0 ');
  });
});
