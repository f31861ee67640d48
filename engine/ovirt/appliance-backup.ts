/**
 * The seed's disk-attachment backup flow (oVirt 4.x), run inside the backup appliance VM:
 * snapshot the VM (persist_memorystate=false, a recognisable description) → wait for snapshot_status=ok →
 * save the OVF (All-Content) → list the snapshot's disks → attach each disk snapshot to the appliance
 * (active=true) → find its device by serial (/dev/disk/by-id/virtio-<first 20 characters of the disk id>,
 * checked against the disk's size; logical_name as fallback) → back the devices up through the pipeline →
 * detach → remove the snapshot and wait until it is gone.
 *
 * Every resource is written to a journal in the repository before it is created and removed from it once
 * gone, so that `engine ovirt cleanup` — and the next run, automatically — removes what a crash left.
 */
import { Journal, type JournalEntry } from '../../repo-format/journal.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { backup, openBackupRepository, type BackupResult } from '../backup/backup.js';
import { OvirtFaultError } from '../errors.js';
import { undoCreated, withOvirt } from './cleanup.js';
import { findDevice, isNotFound, requireRunning, vmIdByName, waitOf, type OvirtBackupRunOptions, type OvirtDisk } from './common.js';
import { SnapshotStatus } from './vocabulary.js';
import { attribute, child, children, text } from './xml.js';
import { adoptName } from '../../repo-format/names.js';

export interface OvirtApplianceBackupOptions extends OvirtBackupRunOptions {
  appliance: string;
  /** Where the appliance's disks appear by serial; /dev/disk/by-id on a real appliance. */
  deviceRoot?: string | undefined;
}

export async function ovirtApplianceBackup(options: OvirtApplianceBackupOptions): Promise<BackupResult> {
  const notice = options.onNotice ?? (() => undefined);
  const wait = waitOf(options);
  await openBackupRepository(options.repo, options.passphrase, 'read'); // a clear error before anything is created
  return withOvirt(options.repo, options.ovirt, wait, notice, async (client) => {
    const vmId = await vmIdByName(client, options.vm);
    const applianceId = await vmIdByName(client, options.appliance);
    if (vmId === applianceId) throw new InvalidArgumentError('the VM to back up cannot be the backup appliance itself');
    await requireRunning(client, applianceId, options.appliance);
    const journal = await Journal.create(options.repo, { flow: 'ovirt-disk-attachment', vm: vmId, correlation: client.correlation });
    const created: JournalEntry[] = [];
    try {
      // Journaled before it exists (by its unique description), then by id: no crash leaves it unlisted.
      const description = `engine backup ${client.correlation} ${new Date().toISOString()}`;
      const pending: JournalEntry = { kind: 'snapshot', vm: vmId, snapshot: '', description };
      await journal.add(pending);
      created.push(pending);
      const snapshot = child((await client.post(`vms/${vmId}/snapshots`, 'snapshot', { description, persist_memorystate: false })).xml, 'snapshot');
      const snapshotId = attribute(snapshot, 'id');
      if (!snapshotId) throw new OvirtFaultError(`POST vms/${vmId}/snapshots`, 200, 'no snapshot id in the answer', '');
      const snapshotEntry: JournalEntry = { kind: 'snapshot', vm: vmId, snapshot: snapshotId, description };
      await journal.add(snapshotEntry);
      await journal.remove((e) => e === pending);
      created.splice(created.indexOf(pending), 1, snapshotEntry);
      const snapshotPath = `vms/${vmId}/snapshots/${snapshotId}`;
      await client.waitFor(`snapshot ${snapshotId} of ${options.vm} to be created`, async () => {
        try {
          return text(child((await client.get(snapshotPath)).xml, 'snapshot'), 'snapshot_status') === SnapshotStatus.ok ? true : undefined;
        } catch (error) {
          if (isNotFound(error)) throw new OvirtFaultError(`snapshot of ${options.vm}`, 404, 'snapshot creation failed', 'the engine dropped the snapshot (see its events, USER_CREATE_SNAPSHOT_FINISHED_FAILURE)');
          throw error;
        }
      }, wait);

      const full = child((await client.get(snapshotPath, undefined, { 'All-Content': 'true' })).xml, 'snapshot');
      const ovf = text(child(child(full, 'initialization'), 'configuration'), 'data');
      if (!ovf) throw new OvirtFaultError(`GET ${snapshotPath}`, 200, 'the snapshot has no OVF configuration', '');
      const disks: OvirtDisk[] = children(child((await client.get(`${snapshotPath}/disks`)).xml, 'disks'), 'disk').map((d) => ({
        id: attribute(d, 'id')!,
        alias: text(d, 'alias') ?? attribute(d, 'id')!,
        size: Number(text(d, 'provisioned_size')),
      }));
      if (disks.length === 0) throw new InvalidArgumentError(`VM ${options.vm} has no disks in its snapshot`);

      const devices: string[] = [];
      for (const disk of disks) {
        const entry: JournalEntry = { kind: 'attachment', vm: applianceId, disk: disk.id };
        await journal.add(entry);
        created.push(entry);
        await client.post(`vms/${applianceId}/diskattachments`, 'disk_attachment', {
          disk: { '@_id': disk.id, snapshot: { '@_id': snapshotId } },
          interface: 'virtio',
          bootable: false,
          active: true,
        });
        devices.push(await findDevice(client, applianceId, disk, options.deviceRoot ?? '/dev/disk/by-id', wait));
      }

      // Names from oVirt keep the name rule, or are recorded in a safe form (names.ts).
      const aliases = disks.map((d) => adoptName(d.alias, 'disk', `disk alias of VM ${options.vm}`, notice));
      const names = new Set(aliases).size === aliases.length ? aliases : disks.map((d) => d.id);
      const result = await backup({
        repo: options.repo,
        passphrase: options.passphrase,
        from: { kind: 'disks', disks: devices.map((path, i) => ({ kind: 'raw', path, name: names[i]! })) },
        name: adoptName(options.vm, 'backup', 'the VM name', notice),
        chain: { mode: 'full' },
        workers: options.workers,
        signal: options.signal,
        onProgress: options.onProgress,
        onNotice: options.onNotice,
        attachments: [
          { name: 'ovf', mediaType: 'application/ovf+xml', data: ovf },
          { name: 'ovirt-vm', mediaType: 'application/json', data: JSON.stringify({ vmId, vmName: options.vm, snapshotId, disks }) },
        ],
      });
      return result;
    } finally {
      // Detach, then remove the snapshot, whatever happened.
      await undoCreated(client, journal, created, wait, notice);
    }
  });
}
