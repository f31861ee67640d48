/**
 * The OVF of a VM in the shape oVirt writes it, and the few things the simulator reads back from one.
 *
 * Sources (oVirt/ovirt-engine @ 0111fc63036bca662aa6275a8ad16282cccf86bf):
 * - backend/manager/modules/utils/src/main/java/org/ovirt/engine/core/utils/ovf/OvfOvirtWriter.java
 *   `writeDisk`: a `<Disk>` of the DiskSection per disk, `ovf:diskId` = the image (volume) id,
 *   `ovf:fileRef` = "<disk id>/<image id>" (OvfParser.createImageFile), `ovf:size` in GiB,
 *   `ovf:disk-interface` = the Java enum name (VirtIO, VirtIO_SCSI, IDE, SATA, SPAPR_VSCSI),
 *   `ovf:boot`, `ovf:disk-alias`; `writeFile`: `<File ovf:href="<disk id>/<image id>" ovf:id="<image id>">`;
 *   `writeOS`: the VM id is the `ovf:id` of the OperatingSystemSection.
 * - OvfWriter.java `writeGeneralData`: `<Name>` first in the VirtualSystem content.
 * - OvfReader.java `initGeneralDiskAttributes`: a disk without `ovf:disk-interface` is IDE.
 */

export interface OvfDisk {
  diskId: string;
  imageId: string;
  alias: string;
  size: number;
  /** oVirt's Java enum name: VirtIO, VirtIO_SCSI, IDE, SATA, SPAPR_VSCSI. */
  diskInterface: string;
  boot: boolean;
}

function escape(value: string): string {
  return value.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

export function writeOvf(vm: { id: string; name: string }, disks: OvfDisk[]): string {
  const gib = (bytes: number): number => Math.ceil(bytes / 2 ** 30);
  const files = disks.map((d) => `<File ovf:href="${d.diskId}/${d.imageId}" ovf:id="${d.imageId}" ovf:size="${d.size}" ovf:description="" ovf:disk_storage_type="IMAGE" ovf:cinder_volume_type=""></File>`).join('');
  const diskItems = disks
    .map(
      (d) =>
        `<Disk ovf:diskId="${d.imageId}" ovf:size="${gib(d.size)}" ovf:actual_size="${gib(d.size)}" ovf:vm_snapshot_id="" ovf:parentRef="" ovf:fileRef="${d.diskId}/${d.imageId}" ` +
        `ovf:format="http://www.gnome.org/~markmc/qcow-image-format.html" ovf:volume-format="COW" ovf:volume-type="Sparse" ovf:disk-interface="${d.diskInterface}" ` +
        `ovf:read-only="false" ovf:shareable="false" ovf:boot="${d.boot}" ovf:pass-discard="false" ovf:incremental-backup="true" ovf:disk-alias="${escape(d.alias)}" ovf:disk-description="" ovf:wipe-after-delete="false"></Disk>`,
    )
    .join('');
  return (
    `<?xml version='1.0' encoding='UTF-8'?><ovf:Envelope xmlns:ovf="http://schemas.dmtf.org/ovf/envelope/1/" xmlns:rasd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData" ` +
    `xmlns:vssd="http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_VirtualSystemSettingData" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" ovf:version="4.5.0.0">` +
    `<References>${files}</References><NetworkSection><Info>List of networks</Info></NetworkSection>` +
    `<Section xsi:type="ovf:DiskSection_Type"><Info>List of Virtual Disks</Info>${diskItems}</Section>` +
    `<Content ovf:id="out" xsi:type="ovf:VirtualSystem_Type"><Name>${escape(vm.name)}</Name><Description></Description><TemplateId>00000000-0000-0000-0000-000000000000</TemplateId>` +
    `<Section ovf:id="${vm.id}" ovf:required="false" xsi:type="ovf:OperatingSystemSection_Type"><Info>Guest Operating System</Info><Description>other_linux</Description></Section>` +
    `</Content></ovf:Envelope>`
  );
}

function attr(element: string, name: string): string | undefined {
  return new RegExp(`\\s${name}="([^"]*)"`).exec(element)?.[1];
}

/** The VM id, name and disks an OVF names (what ImportVmFromConfiguration takes from it). */
export function readOvf(ovf: string): { vmId: string | undefined; name: string | undefined; disks: { diskId: string; diskInterface: string; boot: boolean }[] } {
  const vmId = /<Section ovf:id="([^"]+)"[^>]*xsi:type="ovf:OperatingSystemSection_Type"/.exec(ovf)?.[1];
  const name = /<Content [^>]*>\s*<Name>([^<]*)<\/Name>/.exec(ovf)?.[1];
  const disks = [...ovf.matchAll(/<Disk\s[^>]*>/g)].map((m) => ({
    diskId: (attr(m[0], 'ovf:fileRef') ?? '').split('/')[0]!,
    diskInterface: attr(m[0], 'ovf:disk-interface') || 'IDE',
    boot: attr(m[0], 'ovf:boot') === 'true',
  }));
  return { vmId, name, disks };
}
