/**
 * The seed's disk-attachment backup flow (oVirt 4.x), run inside the backup appliance VM:
 * snapshot the VM (persist_memorystate=false, a recognisable description) → wait for snapshot_status=ok →
 * save the OVF (All-Content) → list the snapshot's disks → attach each disk snapshot to the appliance
 * (active=true) → find its device by serial (/dev/disk/by-id/virtio-<first 20 characters of the disk id>,
 * checked against the disk's size; logical_name as fallback) → back the devices up through the pipeline →
 * detach → remove the snapshot and wait until it is gone. With --quiesce the snapshot is asked for and waited
 * for with the guest's file systems frozen through the VM's freezefilesystems action (quiesce.ts says why
 * that, and not the snapshot, is where oVirt answers whether the guest froze).
 *
 * Every resource is written to a journal in the repository before it is created and removed from it once
 * gone, so that `engine ovirt cleanup` — and the next run, automatically — removes what a crash left.
 * In the code, the phases in order: takeSnapshot → readSnapshot → attachDisks → backup → undoAll.
 */
import type { JournalEntry } from '../../repo-format/journal.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { backup, openBackupRepository, type BackupResult } from '../backup/backup.js';
import { OvirtFaultError } from '../errors.js';
import type { OvirtClient } from './client.js';
import { RunJournal, withOvirt } from './cleanup.js';
import { findDevice, isNotFound, requireRunning, vmIdByName, waitOf, type OvirtBackupRunOptions, type OvirtDisk, type Wait } from './common.js';
import { SnapshotStatus } from './vocabulary.js';
import { createdId, diskList, snapshotOf, vmOf } from './answers.js';
import { frozenAround, NO_QUIESCE, type OvirtQuiesceMode } from './quiesce.js';
import { adoptName } from '../../repo-format/names.js';

export interface OvirtApplianceBackupOptions extends OvirtBackupRunOptions {
  appliance: string;
  /** Where the appliance's disks appear by serial; /dev/disk/by-id on a real appliance. */
  deviceRoot?: string | undefined;
  /** Freeze the guest's file systems around the snapshot (quiesce.ts); default: not asked. */
  quiesce?: OvirtQuiesceMode | undefined;
  /** How long the guest may stay frozen (quiesce.ts); default freezeTimeoutMs(). */
  freezeTimeoutMs?: number | undefined;
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
    const journal = await RunJournal.create(options.repo, { flow: 'ovirt-disk-attachment', vm: vmId, correlation: client.correlation });
    try {
      const take = (): Promise<TakenSnapshot> => takeSnapshot(client, journal, vmId, options.vm, wait);
      const { value: snapshot, consistency } = options.quiesce
        ? await frozenAround(client, journal, { id: vmId, name: options.vm, status: (await client.read(`vms/${vmId}`, vmOf)).status }, { mode: options.quiesce, ovirt: options.ovirt, freezeTimeoutMs: options.freezeTimeoutMs }, take, notice)
        : { value: await take(), consistency: NO_QUIESCE };
      const { ovf, disks } = await readSnapshot(client, snapshot, options.vm);
      const devices = await attachDisks(client, journal, { applianceId, snapshotId: snapshot.id, disks, deviceRoot: options.deviceRoot ?? '/dev/disk/by-id' }, wait);
      // Names from oVirt keep the name rule, or are recorded in a safe form (names.ts).
      const aliases = disks.map((d) => adoptName(d.alias, 'disk', `disk alias of VM ${options.vm}`, notice));
      const names = new Set(aliases).size === aliases.length ? aliases : disks.map((d) => d.id);
      const snapshotId = snapshot.id;
      const result = await backup({
        repo: options.repo,
        passphrase: options.passphrase,
        from: { kind: 'disks', disks: devices.map((path, i) => ({ kind: 'raw', path, name: names[i]! })) },
        name: adoptName(options.vm, 'backup', 'the VM name', notice),
        chain: { mode: 'full' },
        consistency,
        workers: options.workers,
        sharedPool: options.sharedPool,
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
      await journal.undoAll(client, wait, notice);
    }
  });
}

interface TakenSnapshot {
  id: string;
  /** Its API path, vms/{vm}/snapshots/{id}. */
  path: string;
}

/**
 * Phase 1: the snapshot, journaled before it exists (by its unique description), then by id, so that no
 * crash leaves it unlisted; waited for until oVirt has made it.
 */
async function takeSnapshot(client: OvirtClient, journal: RunJournal, vmId: string, vmName: string, wait: Wait): Promise<TakenSnapshot> {
  const description = `engine backup ${client.correlation} ${new Date().toISOString()}`;
  const pending = await journal.track({ kind: 'snapshot', vm: vmId, snapshot: '', description });
  const what = `POST vms/${vmId}/snapshots`;
  const id = createdId((await client.post(`vms/${vmId}/snapshots`, 'snapshot', { description, persist_memorystate: false })).xml, 'snapshot', what, 'snapshot');
  await journal.replace(pending, { kind: 'snapshot', vm: vmId, snapshot: id, description });
  const path = `vms/${vmId}/snapshots/${id}`;
  await client.waitFor(`snapshot ${id} of ${vmName} to be created`, async () => {
    try {
      return (await client.read(path, snapshotOf)).status === SnapshotStatus.ok ? true : undefined;
    } catch (error) {
      if (isNotFound(error)) throw new OvirtFaultError(`snapshot of ${vmName}`, 404, 'snapshot creation failed', 'the engine dropped the snapshot (see its events, USER_CREATE_SNAPSHOT_FINISHED_FAILURE)');
      throw error;
    }
  }, wait);
  return { id, path };
}

/** Phase 2: what the snapshot holds: the VM's OVF (All-Content) and its disks. */
async function readSnapshot(client: OvirtClient, snapshot: TakenSnapshot, vmName: string): Promise<{ ovf: string; disks: OvirtDisk[] }> {
  const { ovf } = await client.read(snapshot.path, snapshotOf, undefined, { 'All-Content': 'true' });
  if (!ovf) throw new OvirtFaultError(`GET ${snapshot.path}`, 200, 'the snapshot has no OVF configuration', '');
  const disks: OvirtDisk[] = (await client.read(`${snapshot.path}/disks`, diskList)).map(({ id, alias, size }) => ({ id, alias, size }));
  if (disks.length === 0) throw new InvalidArgumentError(`VM ${vmName} has no disks in its snapshot`);
  return { ovf, disks };
}

/** Phase 3: each disk snapshot attached to the appliance (journaled first), and its device found there. */
async function attachDisks(
  client: OvirtClient,
  journal: RunJournal,
  to: { applianceId: string; snapshotId: string; disks: OvirtDisk[]; deviceRoot: string },
  wait: Wait,
): Promise<string[]> {
  const devices: string[] = [];
  for (const disk of to.disks) {
    const entry: JournalEntry = { kind: 'attachment', vm: to.applianceId, disk: disk.id };
    await journal.track(entry);
    await client.post(`vms/${to.applianceId}/diskattachments`, 'disk_attachment', {
      disk: { '@_id': disk.id, snapshot: { '@_id': to.snapshotId } },
      interface: 'virtio',
      bootable: false,
      active: true,
    });
    devices.push(await findDevice(client, to.applianceId, disk, to.deviceRoot, wait));
  }
  return devices;
}
