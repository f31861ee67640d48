/**
 * Restore of an oVirt backup through the backup appliance:
 * create each disk (same format and size; optionally the original disk ids, so that the OVF import
 * attaches them by itself) → attach it to the appliance → write the restore point onto it (zero blocks
 * skipped: a new disk reads as zeros) → flush → detach → create the VM from the saved OVF with overrides
 * (name, cluster) → attach the disks the import did not.
 * Or: one disk of the backup into a new disk of an existing VM.
 *
 * Everything created is journaled; a failed restore removes what it created (disks, attachments, the new
 * VM), and `engine ovirt cleanup` finishes that after a crash.
 */
import { readFile } from 'node:fs/promises';
import { Journal, type JournalEntry } from '../../repo-format/journal.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import type { BackupRecord, DiskRecord } from '../../repo-format/backup-record.js';
import { showBackup } from '../catalogue.js';
import { restore } from '../restore/restore.js';
import { OvirtClient, type OvirtClientOptions } from './client.js';
import { attribute, child, children, text } from './xml.js';
import { ImageioTarget } from './imageio-target.js';
import { finalizeTransfer, startTransfer } from './transfers.js';
import { OvirtFaultError } from '../errors.js';
import { connectAndCleanUp, undo } from './cleanup.js';
import { findDevice, isNotFound, vmIdByName, type OvirtDisk, type Wait } from './common.js';

export interface OvirtRestoreOptions {
  repo: string;
  /** The passphrase of an encrypted repository. */
  passphrase?: string | undefined;
  ovirt: OvirtClientOptions;
  backupId: string;
  /** Write the disks through this backup appliance (attach, write the device, detach)… */
  appliance?: string | undefined;
  /** …or upload them through imageio transfers ('transfer'). */
  via?: 'appliance' | 'transfer' | undefined;
  /** A new VM from the backup's OVF… */
  newVm?: string | undefined;
  cluster?: string | undefined;
  /** …or one disk into a new disk of an existing VM. */
  toVm?: string | undefined;
  disk?: string | undefined;
  storageDomain?: string | undefined;
  keepDiskIds?: boolean | undefined;
  deviceRoot?: string | undefined;
  timeoutMs?: number | undefined;
  pollMs?: number | undefined;
  /** SIGINT/SIGTERM: the restore of a disk stops (ENGINE_INTERRUPTED), and what this run created in oVirt is removed. */
  signal?: AbortSignal | undefined;
  onNotice?: ((message: string) => void) | undefined;
}

export interface OvirtRestoreResult {
  backup: string;
  vm: { id: string; name: string };
  disks: { name: string; id: string; size: number }[];
}

function ovirtMetadata(record: BackupRecord): { ovf: string; disks: OvirtDisk[] } {
  const ovf = record.attachments.find((a) => a.name === 'ovf')?.data;
  const meta = record.attachments.find((a) => a.name === 'ovirt-vm')?.data;
  if (!ovf || !meta) throw new InvalidArgumentError(`backup ${record.id} was not made from oVirt: it keeps no OVF`);
  return { ovf, disks: (JSON.parse(meta) as { disks: OvirtDisk[] }).disks };
}

async function storageDomainId(client: OvirtClient, name: string | undefined): Promise<string> {
  const domains = children(child((await client.get('storagedomains')).xml, 'storage_domains'), 'storage_domain');
  const found = domains.find((d) => (name ? text(d, 'name') === name : text(d, 'type') === 'data'));
  if (!found) throw new InvalidArgumentError(name ? `oVirt has no storage domain named "${name}"` : 'oVirt has no data storage domain');
  return attribute(found, 'id')!;
}

export async function ovirtRestoreVm(options: OvirtRestoreOptions): Promise<OvirtRestoreResult> {
  if ((options.newVm === undefined) === (options.toVm === undefined)) throw new InvalidArgumentError('restore to oVirt needs either --new-vm NAME or --to-vm NAME');
  if (options.toVm !== undefined && options.disk === undefined) throw new InvalidArgumentError('--to-vm restores one disk: name it with --disk');
  const notice = options.onNotice ?? (() => undefined);
  const wait: Wait = { timeoutMs: options.timeoutMs ?? 600_000, intervalMs: options.pollMs ?? 1000 };
  const record = await showBackup(options.repo, options.backupId, { passphrase: options.passphrase });
  const { ovf, disks: backedUp } = ovirtMetadata(record);
  const selected: { disk: DiskRecord; meta: OvirtDisk }[] = record.disks
    .filter((d) => options.disk === undefined || d.name === options.disk)
    .map((disk, i) => ({ disk, meta: backedUp.find((m) => m.alias === disk.name || m.id === disk.name) ?? backedUp[i]! }));
  if (selected.length === 0) throw new InvalidArgumentError(`backup ${record.id} has no disk "${options.disk}"`);

  const { client } = await connectAndCleanUp(options.repo, options.ovirt, wait, notice);
  const via = options.via ?? 'appliance';
  if (via === 'appliance' && !options.appliance) throw new InvalidArgumentError('restore through the appliance needs --appliance NAME (or --via transfer)');
  const applianceId = via === 'appliance' ? await vmIdByName(client, options.appliance!) : '';
  const targetVmId = options.toVm !== undefined ? await vmIdByName(client, options.toVm) : undefined;
  const domain = await storageDomainId(client, options.storageDomain);
  const journal = await Journal.create(options.repo, { flow: 'ovirt-restore', backup: record.id });
  const created: JournalEntry[] = [];
  const track = async (entry: JournalEntry): Promise<void> => {
    await journal.add(entry);
    created.push(entry);
  };
  const forget = async (entry: JournalEntry): Promise<void> => {
    await journal.remove((e) => e === entry);
    created.splice(created.indexOf(entry), 1);
  };
  let succeeded = false;
  try {
    const restored: OvirtRestoreResult['disks'] = [];
    for (const { disk, meta } of selected) {
      // 1. A new disk, same size, qcow2 ("cow"); with the original id if asked (the OVF import then finds it).
      const keepId = options.keepDiskIds === true && options.newVm !== undefined;
      const answer = child(
        (await client.post('disks', 'disk', {
          ...(keepId ? { '@_id': meta.id } : {}),
          name: disk.name,
          provisioned_size: disk.size,
          format: 'cow',
          storage_domains: { storage_domain: { '@_id': domain } },
        })).xml,
        'disk',
      );
      const diskId = attribute(answer, 'id')!;
      const diskEntry: JournalEntry = { kind: 'disk', disk: diskId };
      await track(diskEntry);
      await client.waitFor(`disk ${diskId} to be created`, async () => (text(child((await client.get(`disks/${diskId}`)).xml, 'disk'), 'status') === 'ok' ? true : undefined), wait);
      if (via === 'appliance') {
        // 2. Attach it to the appliance, writable, and find it by serial.
        const attachEntry: JournalEntry = { kind: 'attachment', vm: applianceId, disk: diskId };
        await track(attachEntry);
        await client.post(`vms/${applianceId}/diskattachments`, 'disk_attachment', { disk: { '@_id': diskId }, interface: 'virtio', bootable: false, active: true });
        const device = await findDevice(client, applianceId, { id: diskId, alias: disk.name, size: disk.size }, options.deviceRoot ?? '/dev/disk/by-id', wait);
        // 3. Write the restore point (a new disk reads as zeros: zero blocks are skipped), flushed by restore.
        await restore({ repo: options.repo, passphrase: options.passphrase, backupId: record.id, disk: disk.name, to: device, targetIsZeroed: true, signal: options.signal });
        // 4. Detach.
        await undo(client, attachEntry, wait);
        await forget(attachEntry);
      } else {
        // 2–4 through imageio: an upload transfer, written with PUTs, flushed, finalized.
        let transferEntry: JournalEntry | undefined;
        const { id: transferId, url } = await startTransfer(client, { disk: diskId, direction: 'upload' }, async (id) => {
          transferEntry = { kind: 'transfer', transfer: id };
          await track(transferEntry);
        }, wait);
        const ca = options.ovirt.caFile ? await readFile(options.ovirt.caFile) : undefined;
        await restore({ repo: options.repo, passphrase: options.passphrase, backupId: record.id, disk: disk.name, to: url, openTarget: async () => new ImageioTarget(new URL(url), ca), signal: options.signal });
        const phase = await finalizeTransfer(client, transferId, wait);
        if (phase !== 'finished_success') throw new OvirtFaultError(`image transfer ${transferId}`, 200, `the upload ended in phase ${phase}`, '');
        await forget(transferEntry!);
      }
      restored.push({ name: disk.name, id: diskId, size: disk.size });
    }

    // 5. The VM: from the OVF (with overrides), or the existing one.
    let vm: { id: string; name: string };
    if (options.newVm !== undefined) {
      const answer = child(
        (await client.post('vms', 'vm', {
          name: options.newVm,
          cluster: { name: options.cluster ?? 'Default' },
          initialization: { configuration: { type: 'ovf', data: ovf } },
        })).xml,
        'vm',
      );
      vm = { id: attribute(answer, 'id')!, name: options.newVm };
      await track({ kind: 'vm', vm: vm.id });
    } else {
      vm = { id: targetVmId!, name: options.toVm! };
    }
    // 6. Attach what the import did not (everything, unless the original disk ids were kept).
    const attached = new Set(children(child((await client.get(`vms/${vm.id}/diskattachments`)).xml, 'disk_attachments'), 'disk_attachment').map((a) => attribute(a, 'id')));
    for (const [i, disk] of restored.entries()) {
      if (attached.has(disk.id)) continue;
      await client.post(`vms/${vm.id}/diskattachments`, 'disk_attachment', {
        disk: { '@_id': disk.id },
        interface: 'virtio',
        bootable: options.newVm !== undefined && i === 0,
        active: true,
      });
    }
    succeeded = true;
    return { backup: record.id, vm, disks: restored };
  } finally {
    if (succeeded) {
      // The disks and the VM are the result: nothing to undo.
      await journal.remove(() => true);
    } else {
      // Undo in reverse: the new VM, then attachments, then disks.
      for (const entry of [...created].reverse()) {
        try {
          if (entry.kind === 'vm') await client.delete(`vms/${entry.vm}`).catch((error: unknown) => {
            if (!isNotFound(error)) throw error;
          });
          else await undo(client, entry, wait);
          await journal.remove((e) => e === entry);
        } catch (error) {
          notice(`could not remove ${entry.kind} (${(error as Error).message}); \`engine ovirt cleanup\` or the next run will`);
        }
      }
      if (journal.entries.length === 0) await journal.remove(() => true);
    }
  }
}
