/**
 * The libvirt domain definition a `backup --libvirt` keeps (SPEC.md 9, 11.2): its secrets removed before it is
 * stored, everything else byte for byte, and what `verify --boot` reads its machine type and firmware from
 * (14.5). The real domain's definition, through virsh, is test/cbt-libvirt.test.ts's.
 */
import { expect, test } from 'vitest';
import { domainAttachment, withoutSecrets } from '../dist/engine/cbt/libvirt-domain.js';
import { bootTarget } from '../dist/engine/verify/boot-target.js';
import type { BackupRecord } from '../dist/repo-format/backup-record.js';

/** A definition as `virsh dumpxml --security-info` would give it: every kind of secret libvirt writes in one. */
const withSecrets = `<domain type='kvm'>
  <name>vm42</name>
  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <auth username='libvirt'>
        <secret type='ceph' usage='client.libvirt secret'/>
      </auth>
      <source protocol='rbd' name='pool/vm42'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='network' device='cdrom'>
      <source protocol='https' name='/isos/boot.iso'>
        <host name='images.example' port='443'/>
        <cookies>
          <cookie name='session'>0123456789abcdef</cookie>
        </cookies>
      </source>
      <target dev='sda' bus='sata'/>
    </disk>
    <graphics type='vnc' port='-1' autoport='yes' passwd='vnc-secret'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    <graphics type="spice" passwd="spice&apos;s secret" passwdValidTo="2026-12-31T00:00:00" autoport="yes"/>
  </devices>
</domain>
`;

const stripped = `<domain type='kvm'>
  <name>vm42</name>
  <os firmware='efi'>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <auth username='libvirt'>
        <secret type='ceph' usage='client.libvirt secret'/>
      </auth>
      <source protocol='rbd' name='pool/vm42'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='network' device='cdrom'>
      <source protocol='https' name='/isos/boot.iso'>
        <host name='images.example' port='443'/>
      </source>
      <target dev='sda' bus='sata'/>
    </disk>
    <graphics type='vnc' port='-1' autoport='yes'>
      <listen type='address' address='127.0.0.1'/>
    </graphics>
    <graphics type="spice" autoport="yes"/>
  </devices>
</domain>
`;

test('graphics passwords and HTTP cookies are removed; the secrets auth only names, and all else, stay byte for byte', () => {
  expect(withoutSecrets(withSecrets)).toBe(stripped);
  const kept = domainAttachment(withSecrets);
  expect(kept).toEqual({ name: 'libvirt-domain', mediaType: 'application/xml', data: stripped });
  for (const secret of ['vnc-secret', 'spice&apos;s secret', '0123456789abcdef', 'passwd', 'cookie']) expect(kept.data).not.toContain(secret);
  // A definition without secrets is kept as it is.
  expect(withoutSecrets(stripped)).toBe(stripped);
});

test("verify --boot takes the kept definition's machine family and firmware", () => {
  const record = { attachments: [domainAttachment(withSecrets)] } as BackupRecord;
  expect(bootTarget(record, {})).toEqual({ machine: 'q35', firmware: 'uefi', machineFrom: 'libvirt domain XML', firmwareFrom: 'libvirt domain XML' });
});
