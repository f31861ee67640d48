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
import { stat } from 'node:fs/promises';
import { join } from 'node:path';
import { Journal, type JournalEntry } from '../../repo-format/journal.js';
import { Repository } from '../../repo-format/repository.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { backup, type BackupOptions, type BackupResult } from '../backup.js';
import { OvirtFaultError } from '../errors.js';
import { blockDeviceSize } from '../sources/device-size.js';
import { OvirtClient, type OvirtClientOptions } from './client.js';
import { attribute, child, children, text } from './xml.js';

export interface OvirtApplianceBackupOptions {
  repo: string;
  ovirt: OvirtClientOptions;
  vm: string;
  appliance: string;
  /** Where the appliance's disks appear by serial; /dev/disk/by-id on a real appliance. */
  deviceRoot?: string | undefined;
  /** Bounds on the waits (snapshot creation and removal, hot-plug). */
  timeoutMs?: number | undefined;
  pollMs?: number | undefined;
  workers?: number | undefined;
  signal?: AbortSignal | undefined;
  onProgress?: BackupOptions['onProgress'];
  onNotice?: ((message: string) => void) | undefined;
}

interface SnapshotDisk {
  id: string;
  alias: string;
  size: number;
}

export type Wait = { timeoutMs: number; intervalMs: number };

export async function vmIdByName(client: OvirtClient, name: string): Promise<string> {
  const found = children(child((await client.get('vms', { search: `name=${name}` })).xml, 'vms'), 'vm').filter((vm) => text(vm, 'name') === name);
  if (found.length !== 1) throw new InvalidArgumentError(found.length === 0 ? `oVirt has no VM named "${name}"` : `oVirt has ${found.length} VMs named "${name}"`);
  return attribute(found[0], 'id')!;
}

export function isNotFound(error: unknown): boolean {
  return error instanceof OvirtFaultError && error.status === 404;
}

async function deleteIfPresent(client: OvirtClient, path: string): Promise<void> {
  await client.delete(path).catch((error: unknown) => {
    if (!isNotFound(error)) throw error;
  });
}

/** The order cleanup undoes kinds in: what holds a resource goes before the resource. */
const UNDO_ORDER = ['attachment', 'transfer', 'backup', 'vm', 'snapshot', 'disk'];

/** Waits until `probe` sees a terminal state, or the entity is gone (404). */
async function settle(client: OvirtClient, what: string, path: string, root: string, done: (phase: string | undefined) => boolean, wait: Wait): Promise<void> {
  await client.waitFor(what, async () => {
    try {
      return done(text(child((await client.get(path)).xml, root), 'phase')) ? true : undefined;
    } catch (error) {
      if (isNotFound(error)) return true;
      throw error;
    }
  }, wait);
}

/** Removes what a journal entry names, idempotently (already gone is fine). */
export async function undo(client: OvirtClient, entry: JournalEntry, wait: Wait): Promise<void> {
  if (entry.kind === 'attachment') {
    await deleteIfPresent(client, `vms/${entry.vm}/diskattachments/${entry.disk}`);
  } else if (entry.kind === 'vm') {
    await deleteIfPresent(client, `vms/${entry.vm}`);
  } else if (entry.kind === 'disk') {
    await deleteIfPresent(client, `disks/${entry.disk}`);
  } else if (entry.kind === 'transfer') {
    await client.post(`imagetransfers/${entry.transfer}/cancel`, 'action', {}).catch((error: unknown) => {
      if (!isNotFound(error)) throw error;
    });
    await settle(client, `image transfer ${entry.transfer} to end`, `imagetransfers/${entry.transfer}`, 'image_transfer', (p) => p === undefined || p.startsWith('finished') || p.startsWith('cancelled'), wait);
  } else if (entry.kind === 'backup') {
    await client.post(`vms/${entry.vm}/backups/${entry.backup}/finalize`, 'action', {}).catch((error: unknown) => {
      if (!isNotFound(error)) throw error;
    });
    await settle(client, `backup ${entry.backup} to finish`, `vms/${entry.vm}/backups/${entry.backup}`, 'backup', (p) => p === 'succeeded' || p === 'failed', wait);
  } else if (entry.kind === 'snapshot' && !entry.snapshot) {
    // The run died between asking for the snapshot and learning its id: find it by its description.
    const list = children(child((await client.get(`vms/${entry.vm}/snapshots`)).xml, 'snapshots'), 'snapshot');
    for (const found of list.filter((s) => text(s, 'description') === entry.description)) {
      await undo(client, { ...entry, snapshot: attribute(found, 'id')! }, wait);
    }
  } else if (entry.kind === 'snapshot') {
    const path = `vms/${entry.vm}/snapshots/${entry.snapshot}`;
    // A snapshot still being created cannot be removed yet: wait for it to settle (or vanish) first.
    const settled = await client.waitFor(`snapshot ${entry.snapshot} to settle`, async () => {
      try {
        const status = text(child((await client.get(path)).xml, 'snapshot'), 'snapshot_status');
        return status === 'locked' ? undefined : 'present';
      } catch (error) {
        if (isNotFound(error)) return 'gone';
        throw error;
      }
    }, wait);
    if (settled === 'present') {
      await client.delete(path).catch((error: unknown) => {
        if (!isNotFound(error)) throw error;
      });
    }
    await client.waitFor(`snapshot ${entry.snapshot} to be removed`, async () => client.get(path).then(() => undefined, (error: unknown) => {
      if (isNotFound(error)) return true;
      throw error;
    }), wait);
  }
}

/** Undoes every entry of every journal in the repository: attachments first, then snapshots. */
export async function cleanupJournals(repo: string, client: OvirtClient, wait: Wait, notice: (m: string) => void): Promise<number> {
  let removed = 0;
  for (const journal of await Journal.list(repo)) {
    const ordered = [...journal.entries].sort((a, b) => UNDO_ORDER.indexOf(a.kind) - UNDO_ORDER.indexOf(b.kind));
    for (const entry of ordered) {
      await undo(client, entry, wait);
      await journal.remove((e) => e === entry);
      notice(`removed leftover ${entry.kind} ${entry.snapshot || entry.transfer || entry.backup || entry.disk || entry.vm} of an interrupted run`);
      removed += 1;
    }
    await journal.remove(() => true);
  }
  return removed;
}

/** Size of a block device (sysfs) or a file (the simulator's nbdfuse files); -1 if it is not there. */
async function deviceSize(path: string): Promise<number> {
  const info = await stat(path).catch(() => undefined);
  if (!info) return -1;
  if (info.isBlockDevice()) return blockDeviceSize(info.rdev).catch(() => -1);
  return info.isFile() ? info.size : -1;
}

/**
 * The attached disk inside the appliance: /dev/disk/by-id/virtio-<first 20 characters of the disk id>
 * (the virtio serial oVirt sets), checked against the disk's size; the guest agent's logical_name is the
 * fallback. Polled: hot-plug takes a moment.
 */
export async function findDevice(client: OvirtClient, applianceId: string, disk: SnapshotDisk, deviceRoot: string, wait: Wait): Promise<string> {
  const byId = join(deviceRoot, `virtio-${disk.id.slice(0, 20)}`);
  return client.waitFor(`disk ${disk.id} to appear in the appliance`, async () => {
    const size = await deviceSize(byId);
    if (size === disk.size) return byId;
    const attachment = child((await client.get(`vms/${applianceId}/diskattachments/${disk.id}`)).xml, 'disk_attachment');
    const logical = text(attachment, 'logical_name');
    if (logical && (await deviceSize(logical)) === disk.size) return logical;
    if (size > 0) throw new InvalidArgumentError(`${byId} holds ${size} bytes, disk ${disk.id} has ${disk.size}: not the disk that was attached`);
    return undefined;
  }, wait);
}

export async function ovirtApplianceBackup(options: OvirtApplianceBackupOptions): Promise<BackupResult> {
  const notice = options.onNotice ?? (() => undefined);
  const wait = { timeoutMs: options.timeoutMs ?? 600_000, intervalMs: options.pollMs ?? 1000 };
  await Repository.open(options.repo, { access: 'read' }); // a clear error before anything is created
  const client = new OvirtClient(options.ovirt);
  await client.login();
  await cleanupJournals(options.repo, client, wait, notice);
  const vmId = await vmIdByName(client, options.vm);
  const applianceId = await vmIdByName(client, options.appliance);
  if (vmId === applianceId) throw new InvalidArgumentError('the VM to back up cannot be the backup appliance itself');
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
        return text(child((await client.get(snapshotPath)).xml, 'snapshot'), 'snapshot_status') === 'ok' ? true : undefined;
      } catch (error) {
        if (isNotFound(error)) throw new OvirtFaultError(`snapshot of ${options.vm}`, 404, 'snapshot creation failed', 'the engine dropped the snapshot (see its events, USER_CREATE_SNAPSHOT_FINISHED_FAILURE)');
        throw error;
      }
    }, wait);

    const full = child((await client.get(snapshotPath, undefined, { 'All-Content': 'true' })).xml, 'snapshot');
    const ovf = text(child(child(full, 'initialization'), 'configuration'), 'data');
    if (!ovf) throw new OvirtFaultError(`GET ${snapshotPath}`, 200, 'the snapshot has no OVF configuration', '');
    const disks: SnapshotDisk[] = children(child((await client.get(`${snapshotPath}/disks`)).xml, 'disks'), 'disk').map((d) => ({
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

    const aliases = disks.map((d) => d.alias);
    const names = new Set(aliases).size === aliases.length ? aliases : disks.map((d) => d.id);
    const result = await backup({
      repo: options.repo,
      sources: devices,
      diskNames: names,
      name: options.vm,
      mode: 'full',
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
    // Detach, then remove the snapshot, whatever happened; each undone resource leaves the journal.
    for (const entry of [...created].reverse()) {
      try {
        await undo(client, entry, wait);
        await journal.remove((e) => e === entry);
      } catch (error) {
        notice(`could not remove ${entry.kind} (${(error as Error).message}); \`engine ovirt cleanup\` or the next run will`);
      }
    }
    if (journal.entries.length === 0) await journal.remove(() => true);
  }
}

export async function ovirtCleanup(options: { repo: string; ovirt: OvirtClientOptions; onNotice?: (m: string) => void }): Promise<number> {
  const client = new OvirtClient(options.ovirt);
  await client.login();
  return cleanupJournals(options.repo, client, { timeoutMs: 600_000, intervalMs: 1000 }, options.onNotice ?? (() => undefined));
}
