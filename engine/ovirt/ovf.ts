/**
 * What a restore needs from a VM's OVF (oVirt's own dialect, the `initialization/configuration/data` of a
 * VM or snapshot): per disk, its interface and boot flag, so that restored disks are attached as the guest
 * had them — a guest installed on virtio-scsi, SATA or IDE may not boot from virtio-blk.
 *
 * In oVirt's OVF (ovirt-engine utils/ovf/OvfOvirtWriter.java `writeDisk`) each disk is a `<Disk>` of the
 * DiskSection whose `ovf:fileRef` is "<disk id>/<image id>" (`ovf:diskId` is the image id, not the disk's),
 * `ovf:disk-interface` the Java enum name (VirtIO, VirtIO_SCSI, IDE, SATA, SPAPR_VSCSI) and `ovf:boot`
 * "true" or "false". A disk without `ovf:disk-interface` is IDE (OvfReader.java `initGeneralDiskAttributes`).
 */
import { XMLParser } from 'fast-xml-parser';
import { DiskInterface, type DiskInterfaceValue } from './vocabulary.js';

export interface OvfDiskPlacement {
  diskId: string;
  interface: DiskInterfaceValue;
  bootable: boolean;
}

const OVF_INTERFACES: Record<string, DiskInterfaceValue> = {
  VirtIO: DiskInterface.virtio,
  VirtIO_SCSI: DiskInterface.virtioScsi,
  IDE: DiskInterface.ide,
  SATA: DiskInterface.sata,
  SPAPR_VSCSI: DiskInterface.spaprVscsi,
};

const parser = new XMLParser({ ignoreAttributes: false, attributeNamePrefix: '@_', parseTagValue: false, parseAttributeValue: false, removeNSPrefix: false });

type Node = Record<string, unknown>;
const list = (value: unknown): Node[] => (value === undefined ? [] : (Array.isArray(value) ? value : [value]).filter((v): v is Node => typeof v === 'object' && v !== null));

/** Every `<Disk>` of the OVF's disk section, keyed by disk id; an OVF that cannot be read gives none. */
export function ovfDiskPlacements(ovf: string): Map<string, OvfDiskPlacement> {
  const placements = new Map<string, OvfDiskPlacement>();
  let root: Node;
  try {
    root = parser.parse(ovf) as Node;
  } catch {
    return placements;
  }
  const envelope = list(root['ovf:Envelope'])[0];
  for (const section of list(envelope?.Section)) {
    if (section['@_xsi:type'] !== 'ovf:DiskSection_Type') continue;
    for (const disk of list(section.Disk)) {
      const fileRef = disk['@_ovf:fileRef'];
      if (typeof fileRef !== 'string' || !fileRef.includes('/')) continue;
      const diskId = fileRef.split('/')[0]!;
      const named = disk['@_ovf:disk-interface'];
      const diskInterface = typeof named === 'string' && named !== '' ? OVF_INTERFACES[named] : DiskInterface.ide;
      if (!diskInterface) continue;
      placements.set(diskId, { diskId, interface: diskInterface, bootable: disk['@_ovf:boot'] === 'true' });
    }
  }
  return placements;
}
