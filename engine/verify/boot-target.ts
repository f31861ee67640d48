/**
 * The machine type and firmware a backup's guest was made for, from what the backup kept of its VM: a
 * libvirt domain XML (`<type machine='pc-q35-7.2'>`, `<os firmware='efi'>` or a `<loader>`), or an oVirt
 * OVF (`<BiosType>`: 1 i440fx + SeaBIOS, 2 q35 + SeaBIOS, 3 q35 + OVMF, 4 q35 + OVMF with secure boot; 0
 * is the cluster's default, which the OVF does not say; `<CustomEmulatedMachine>`). A versioned machine
 * type of another QEMU build (`pc-q35-rhel8.6.0`) is not known to this one: its family (q35 or pc) is
 * what runs. Options given win; what nothing says is q35 with BIOS.
 */
import type { BackupRecord } from '../../repo-format/backup-record.js';

export interface BootTarget {
  machine: string;
  firmware: 'bios' | 'uefi';
  /** Where each came from: `option`, `libvirt domain XML`, `oVirt OVF`, or `default`. */
  machineFrom: string;
  firmwareFrom: string;
}

interface Recorded {
  machine?: string;
  firmware?: 'bios' | 'uefi';
  from: string;
}

function fromDomainXml(xml: string): Recorded {
  const recorded: Recorded = { from: 'libvirt domain XML' };
  const type = /<type\b[^>]*\bmachine=['"]([^'"]+)['"]/.exec(xml);
  if (type) recorded.machine = type[1]!;
  if (/<os\b[^>]*\bfirmware=['"]efi['"]/.test(xml) || /<loader\b[^>]*>[^<]*(OVMF|edk2|\.fd)/i.test(xml)) recorded.firmware = 'uefi';
  else if (/<os\b/.test(xml)) recorded.firmware = 'bios';
  return recorded;
}

function fromOvf(ovf: string): Recorded {
  const recorded: Recorded = { from: 'oVirt OVF' };
  const bios = /<BiosType>\s*(\d+)\s*<\/BiosType>/.exec(ovf)?.[1];
  if (bios === '1') Object.assign(recorded, { machine: 'pc', firmware: 'bios' });
  if (bios === '2') Object.assign(recorded, { machine: 'q35', firmware: 'bios' });
  if (bios === '3' || bios === '4') Object.assign(recorded, { machine: 'q35', firmware: 'uefi' });
  const custom = /<CustomEmulatedMachine>\s*([^<\s]+)\s*<\/CustomEmulatedMachine>/.exec(ovf)?.[1];
  if (custom) recorded.machine = custom;
  return recorded;
}

/** The machine family QEMU knows under a recorded type: `q35` or `pc`; a plain family name stays. */
export function machineFamily(recorded: string): string {
  if (/q35/i.test(recorded)) return 'q35';
  if (/^(pc|i440fx)/i.test(recorded)) return 'pc';
  return recorded;
}

export function bootTarget(record: BackupRecord, options: { machine?: string | undefined; firmware?: 'bios' | 'uefi' | undefined }): BootTarget {
  let recorded: Recorded = { from: 'default' };
  for (const attachment of record.attachments) {
    if (attachment.name === 'ovf' || attachment.mediaType === 'application/ovf+xml') recorded = fromOvf(attachment.data);
    else if (/<domain\b/.test(attachment.data) && /xml/.test(attachment.mediaType)) recorded = fromDomainXml(attachment.data);
  }
  const machine = options.machine ?? (recorded.machine ? machineFamily(recorded.machine) : 'q35');
  const firmware = options.firmware ?? recorded.firmware ?? 'bios';
  return {
    machine,
    firmware,
    machineFrom: options.machine !== undefined ? 'option' : recorded.machine ? recorded.from : 'default',
    firmwareFrom: options.firmware !== undefined ? 'option' : recorded.firmware ? recorded.from : 'default',
  };
}
