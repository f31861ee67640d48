/** The new domain of a live restore, made from a backup's `libvirt-domain` attachment (engine/restore/live-domain-xml.ts). */
import { expect, test } from 'vitest';
import { domainDiskTargets, liveDomainXml } from '../dist/engine/restore/live-domain-xml.js';

const ORIGINAL = `<domain type='kvm'>
  <name>web</name>
  <uuid>0d8fe80d-9f9b-448c-ac5d-50eb583b6317</uuid>
  <os firmware='efi'><type arch='x86_64' machine='pc-q35-7.2'>hvm</type><nvram>/var/lib/libvirt/qemu/nvram/web_VARS.fd</nvram></os>
  <devices>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='native'/>
      <source dev='/dev/vg/web-root'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
      <boot order='1'/>
    </disk>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web-data.qcow2'/>
      <backingStore type='file'><format type='qcow2'/><source file='/var/lib/libvirt/images/base.qcow2'/></backingStore>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'><source file='/iso/install.iso'/><target dev='sda' bus='sata'/></disk>
    <interface type='network'><mac address='52:54:00:12:34:56'/><source network='default'/></interface>
    <channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-3-web/org.qemu.guest_agent.0'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
  </devices>
</domain>
`;

test('new name; no uuid, MAC or NVRAM file; every disk a qcow2 at its new image, its backing chain dropped; the rest kept', () => {
  expect(domainDiskTargets(ORIGINAL)).toEqual(['vda', 'vdb']);
  const xml = liveDomainXml(ORIGINAL, "web-<live>", new Map([['vda', '/img/web-live-vda.qcow2'], ['vdb', '/img/web-live-vdb.qcow2']]));
  expect(xml).toContain('<name>web-&lt;live&gt;</name>');
  expect(xml).not.toMatch(/<uuid>|<mac\b|<nvram|web_VARS|\/dev\/vg\/web-root|web-data\.qcow2|base\.qcow2|domain-3-web/);
  expect(xml).toContain("<disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2' cache='none' io='native'/>\n      <source file='/img/web-live-vda.qcow2'/>");
  expect(xml).toContain("<source file='/img/web-live-vdb.qcow2'/>");
  expect(xml.match(/<backingStore/g)).toBeNull();
  expect(xml).toContain("<boot order='1'/>");
  expect(xml).toContain("<source file='/iso/install.iso'/>"); // not a disk of the backup: as it was
  expect(xml).toContain("<source mode='bind'/><target type='virtio' name='org.qemu.guest_agent.0'/>");
  expect(xml).toContain("<type arch='x86_64' machine='pc-q35-7.2'>hvm</type>");
});

test('a disk of the domain without a restored image, or an image for no disk, is refused', () => {
  expect(() => liveDomainXml(ORIGINAL, 'n', new Map([['vda', '/a.qcow2']]))).toThrow(/disk vdb of the backup's domain has no restored disk/);
  expect(() => liveDomainXml(ORIGINAL, 'n', new Map([['vda', '/a'], ['vdb', '/b'], ['vdc', '/c']]))).toThrow(/has no disk vdc/);
  expect(() => liveDomainXml('<nothing/>', 'n', new Map())).toThrow(/no <domain> definition/);
});
