/**
 * oVirt 4.4+ incremental backup API: `POST /vms/{id}/backups` (with `from_checkpoint_id` for an
 * incremental) → wait for phase `ready` → read `to_checkpoint_id` then (oVirt sets it only once the host
 * has the checkpoint: StartVmBackupCommand, HybridBackupCommand) → per disk `backup_mode` → for each disk
 * in turn, right before it is read, a download image transfer (format raw), read through ovirt-imageio
 * (zero extents skipped; for incremental disks only the dirty extents), finalized as soon as the disk is
 * read → finalize the backup → after the record is committed, delete the checkpoints no chain needs.
 *
 * A checkpoint the engine refuses, or any error of an incremental start (event 10791 surfaces so), or a
 * backup that fails before `ready`, is retried as a full backup, said in `modeReason`. From cluster level
 * 4.5 oVirt mixes full and incremental disks in one backup (per-disk `backup_mode`); below it, one disk
 * without a valid chain makes every disk a full read.
 */
import { Journal, type JournalEntry } from '../../repo-format/journal.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import type { BackupRecord } from '../../repo-format/backup-record.js';
import { backup, openBackupRepository, type BackupResult } from '../backup/backup.js';
import { chooseChain, settleChain, type CbtDiskJob, type CbtProvision, type Chain, type ChainArgs, type RequestedMode } from '../cbt/chain.js';
import { OvirtFaultError } from '../errors.js';
import type { BlockSource } from '../sources/source.js';
import { readCaFile, type OvirtClient } from './client.js';
import { ImageioSource } from './imageio-source.js';
import { cancelTransfer, finalizeTransfer, startTransfer } from './transfers.js';
import { deleteCheckpoint, endBackup, removeSnapshot, undo, withOvirt } from './cleanup.js';
import { atLeast, clusterOfVm, isNotFound, vmIdByName, waitOf, type OvirtBackupRunOptions, type OvirtCluster, type Wait } from './common.js';
import { BACKUP_SNAPSHOT_DESCRIPTION, BackupPhase, CheckpointState, DiskBackupMode, SnapshotStatus } from './vocabulary.js';
import { attribute, child, children, text } from './xml.js';
import { adoptName } from '../../repo-format/names.js';

export interface OvirtIncrementalBackupOptions extends OvirtBackupRunOptions {
  mode?: RequestedMode | undefined;
}

interface VmDisk {
  id: string;
  name: string;
  size: number;
}

/**
 * The VM's active disks. oVirt backs up plugged disks only (StartVmBackupCommand.allDisksPlugged refuses
 * the whole backup with 409 otherwise): an inactive disk is left out, said.
 */
async function vmDisks(client: OvirtClient, vmId: string, vmName: string, notice: (m: string) => void): Promise<VmDisk[]> {
  const attachments = children(child((await client.get(`vms/${vmId}/diskattachments`)).xml, 'disk_attachments'), 'disk_attachment');
  const disks: VmDisk[] = [];
  for (const attachment of attachments) {
    const id = attribute(child(attachment, 'disk'), 'id') ?? attribute(attachment, 'id')!;
    const disk = child((await client.get(`disks/${id}`)).xml, 'disk');
    const name = text(disk, 'alias') ?? text(disk, 'name') ?? id;
    if (text(attachment, 'active') !== 'true') {
      notice(`disk ${name} (${id}) is not active on VM ${vmName}: oVirt backs up active disks only, it is left out`);
      continue;
    }
    // Names from oVirt keep the name rule, or are recorded in a safe form (names.ts).
    disks.push({ id, name: adoptName(name, 'disk', `disk alias of disk ${id}`, notice), size: Number(text(disk, 'provisioned_size')) });
  }
  // Disk names must be unique in a backup: aliases when they are, ids otherwise.
  if (new Set(disks.map((d) => d.name)).size !== disks.length) for (const d of disks) d.name = d.id;
  return disks;
}

/**
 * Removes "Auto-generated for Backup VM" snapshots no backup uses any more: a hybrid backup's snapshot
 * that oVirt failed to remove (event 10813) or that outlived a crash. Only when no backup of the VM is
 * running: a running hybrid backup reads from its snapshot.
 */
async function removeLeftoverBackupSnapshots(client: OvirtClient, vmId: string, wait: Wait, notice: (m: string) => void): Promise<void> {
  const backups = children(child((await client.get(`vms/${vmId}/backups`)).xml, 'backups'), 'backup');
  if (backups.some((b) => text(b, 'phase') !== BackupPhase.succeeded && text(b, 'phase') !== BackupPhase.failed)) return;
  const snapshots = children(child((await client.get(`vms/${vmId}/snapshots`)).xml, 'snapshots'), 'snapshot');
  for (const s of snapshots.filter((s) => text(s, 'description') === BACKUP_SNAPSHOT_DESCRIPTION && text(s, 'snapshot_status') === SnapshotStatus.ok)) {
    notice(`removing snapshot ${attribute(s, 'id')} ("${BACKUP_SNAPSHOT_DESCRIPTION}") left by an earlier backup (event 10813)`);
    await removeSnapshot(client, vmId, attribute(s, 'id')!, wait);
  }
}

export async function ovirtIncrementalBackup(options: OvirtIncrementalBackupOptions): Promise<BackupResult> {
  const notice = options.onNotice ?? (() => undefined);
  const wait = waitOf(options);
  await openBackupRepository(options.repo, options.passphrase, 'read'); // a clear error before anything is created
  const ca = options.ovirt.caFile ? await readCaFile(options.ovirt.caFile) : undefined;
  return withOvirt(options.repo, options.ovirt, wait, notice, async (client) => {
    const vmId = await vmIdByName(client, options.vm);
    const cluster = await clusterOfVm(client, vmId);
    await removeLeftoverBackupSnapshots(client, vmId, wait, notice);
    const disks = await vmDisks(client, vmId, options.vm, notice);
    if (disks.length === 0) throw new InvalidArgumentError(`VM ${options.vm} has no active disk to back up`);
    const ovf = text(child(child(child((await client.get(`vms/${vmId}`, { all_content: 'true' })).xml, 'vm'), 'initialization'), 'configuration'), 'data');
    return backup({
      repo: options.repo,
      passphrase: options.passphrase,
      name: adoptName(options.vm, 'backup', 'the VM name', notice),
      chain: { mode: options.mode ?? 'auto' },
      workers: options.workers,
      signal: options.signal,
      onProgress: options.onProgress,
      onNotice: options.onNotice,
      attachments: [
        ...(ovf ? [{ name: 'ovf', mediaType: 'application/ovf+xml', data: ovf }] : []),
        { name: 'ovirt-vm', mediaType: 'application/json', data: JSON.stringify({ vmId, vmName: options.vm, disks: disks.map((d) => ({ id: d.id, alias: d.name, size: d.size })) }) },
      ],
      from: { kind: 'provider', provide: (args) => openOvirtBackup({ client, vmId, cluster, disks, args, wait, repo: options.repo, ca, notice }) },
    });
  });
}

interface StartedBackup {
  id: string;
  phase: string;
  /** The checkpoint this backup created (to_checkpoint_id once `ready`); undefined when oVirt made none. */
  checkpoint: string | undefined;
  from: string | null;
}

/** The checkpoint ids this repository's backups of the VM recorded: the only ones it may delete. */
function recordedCheckpoints(history: BackupRecord[]): Set<string> {
  const ids = new Set<string>();
  for (const record of history) {
    for (const disk of record.disks) {
      if (!disk.cbt) continue;
      ids.add(disk.cbt.checkpoint);
      ids.add(disk.cbt.chainCheckpoint);
    }
  }
  return ids;
}

async function openOvirtBackup(run: {
  client: OvirtClient;
  vmId: string;
  cluster: OvirtCluster;
  disks: VmDisk[];
  args: ChainArgs;
  wait: Wait;
  repo: string;
  ca: Buffer | undefined;
  notice: (m: string) => void;
}): Promise<CbtProvision> {
  const { client, vmId, disks, args, wait, notice } = run;
  const checkpoints = children(child((await client.get(`vms/${vmId}/checkpoints`)).xml, 'checkpoints'), 'checkpoint').map((c) => ({ id: attribute(c, 'id')!, state: text(c, 'state') ?? CheckpointState.created }));
  const baseProblem = (base: string): string | null => {
    const found = checkpoints.find((c) => c.id === base);
    if (!found) return `checkpoint ${base} no longer exists in oVirt`;
    return found.state === CheckpointState.invalid ? `checkpoint ${base} is invalid in oVirt` : null;
  };
  let chains = disks.map((d) => chooseChain(d.name, args.requested, { size: d.size, baseProblem, addedDisk: true }, args.history));
  const allFull = (why: (chain: Chain) => string | null): void => {
    chains = chains.map((c) => ({ mode: 'full', reason: c.mode === 'full' ? c.reason : why(c), base: null, parent: null, previous: null }));
  };
  // oVirt reads every disk of a backup against one checkpoint; from cluster level 4.5 a disk the checkpoint
  // does not cover is read in full beside incremental ones (StartVmBackupCommand.getBackupModeForDisk),
  // below it such a mix is refused (ACTION_TYPE_FAILED_MIXED_INCREMENTAL_AND_FULL_BACKUP_NOT_SUPPORTED).
  const incremental = chains.filter((c) => c.mode !== 'full');
  if (new Set(incremental.map((c) => c.base)).size > 1) {
    allFull(() => 'the disks continue chains from different checkpoints, and oVirt reads a backup against one');
  } else if (incremental.length > 0 && incremental.length < chains.length && !atLeast(run.cluster.version, 4, 5)) {
    allFull(() => `oVirt below cluster level 4.5 (cluster ${run.cluster.name} is ${run.cluster.version.join('.')}) cannot mix full and incremental disks in one backup, and another disk of the VM needs a full backup`);
  }

  const journal = await Journal.create(run.repo, { flow: 'ovirt-backup-api', vm: vmId });
  const track = async (entry: JournalEntry): Promise<JournalEntry> => {
    await journal.add(entry);
    return entry;
  };
  const forget = (entry: JournalEntry): Promise<void> => journal.remove((e) => e === entry);

  let backupEntry: JournalEntry | undefined;
  /** Starts a backup and waits for `ready` (or failed, or gone); reads to_checkpoint_id once ready. */
  const start = async (from: string | null): Promise<StartedBackup> => {
    const answer = child(
      (await client.post(`vms/${vmId}/backups`, 'backup', {
        ...(from ? { from_checkpoint_id: from } : {}),
        disks: { disk: disks.map((d) => ({ '@_id': d.id })) },
      })).xml,
      'backup',
    );
    const id = attribute(answer, 'id');
    if (!id) throw new OvirtFaultError(`POST vms/${vmId}/backups`, 200, 'the answer names no backup id', '');
    backupEntry = await track({ kind: 'backup', vm: vmId, backup: id });
    let current = answer;
    const phase = await client.waitFor(`backup ${id} to be ready`, async () => {
      try {
        current = child((await client.get(`vms/${vmId}/backups/${id}`)).xml, 'backup');
      } catch (error) {
        if (!isNotFound(error)) throw error;
        return 'gone';
      }
      // A hybrid backup names its snapshot from the start: journal it, so that a crash cannot leak it.
      const snapshot = attribute(child(current, 'snapshot'), 'id');
      if (snapshot && backupEntry && backupEntry.snapshot !== snapshot) {
        const updated = { ...backupEntry, snapshot };
        await track(updated);
        await forget(backupEntry);
        backupEntry = updated;
      }
      const now = text(current, 'phase');
      return now === BackupPhase.ready || now === BackupPhase.failed ? now : undefined;
    }, wait);
    const checkpoint = phase === 'gone' ? undefined : text(current, 'to_checkpoint_id');
    return { id, phase, checkpoint, from };
  };
  /** A backup that did not become ready: finalized (if oVirt still knows it) and forgotten. */
  const abandon = async (): Promise<void> => {
    if (!backupEntry) return;
    await undo(client, backupEntry, wait, notice);
    await forget(backupEntry);
    backupEntry = undefined;
  };

  let started: StartedBackup;
  let modes: Map<string, string>;
  const base = chains.find((c) => c.mode !== 'full')?.base ?? null;
  try {
    try {
      started = await start(base);
    } catch (error) {
      // A refused checkpoint (400), or the start itself failing (a checkpoint redefinition that fails is an
      // error of the POST: event 10791, the chain removed): a full backup is what oVirt asks for.
      if (!(base && error instanceof OvirtFaultError && (error.status === 400 || error.status >= 500))) throw error;
      await abandon();
      allFull(() => `oVirt refused the incremental backup: ${error.message}`);
      started = await start(null);
    }
    if (started.phase !== BackupPhase.ready && base && started.from !== null) {
      await abandon();
      allFull(() => 'oVirt failed the incremental backup (event 10791: a full backup is needed)');
      started = await start(null);
    }
    if (started.phase !== BackupPhase.ready) {
      throw new OvirtFaultError(`backup of VM ${vmId}`, 200, started.phase === 'gone' ? 'the backup vanished before it was ready' : `the backup ended in phase ${started.phase}`, 'see the engine events for the reason');
    }
    // backup_mode, per disk (types/Disk.java; set from cluster level 4.5). Below it a started incremental
    // backup is incremental for every disk, since oVirt refuses a mix.
    const from = started.from;
    modes = new Map(
      children(child((await client.get(`vms/${vmId}/backups/${started.id}/disks`)).xml, 'disks'), 'disk').map((d) => [attribute(d, 'id')!, text(d, 'backup_mode') ?? (from ? DiskBackupMode.incremental : DiskBackupMode.full)]),
    );
  } catch (error) {
    await abandon().catch(() => undefined);
    await journal.remove(() => true);
    throw error;
  }
  const backupId = started.id;
  const checkpointEntry = started.checkpoint ? await track({ kind: 'checkpoint', vm: vmId, checkpoint: started.checkpoint }) : undefined;
  if (!started.checkpoint) notice('oVirt created no checkpoint for this backup (no qcow2 disk): every disk is read in full and no chain is kept');

  /** Transfers open now (at most one: each disk's is finalized once the disk is read). */
  const open = new Map<string, JournalEntry>();
  const closeTransfer = async (id: string, disk: string, how: 'finalize' | 'cancel'): Promise<void> => {
    const entry = open.get(id);
    if (!entry) return;
    if (how === 'finalize') await finalizeTransfer(client, { id, disk, direction: 'download' }, wait);
    else await cancelTransfer(client, id, wait);
    open.delete(id);
    await forget(entry);
  };

  /** One disk, read through its own transfer, opened right before the read (a transfer must not sit idle). */
  const prepare = async (disk: VmDisk, i: number): Promise<CbtDiskJob> => {
    let chain = chains[i]!;
    if (chain.mode !== 'full' && modes.get(disk.id) !== DiskBackupMode.incremental) {
      chain = { mode: 'full', reason: 'oVirt backs this disk up in full (backup_mode full)', base: null, parent: null, previous: null };
    }
    const transfer = await startTransfer(client, { disk: disk.id, backup: backupId, direction: 'download' }, async (id) => {
      open.set(id, await track({ kind: 'transfer', transfer: id }));
    }, wait);
    const imageio = await ImageioSource.open(transfer, disk.size, { name: disk.name, description: { kind: 'ovirt-imageio', path: `${vmId}/${disk.id}` }, ca: run.ca });
    if (imageio.viaProxy) notice(`disk ${disk.name}: the host's imageio (transfer_url) cannot be reached, reading through the engine's proxy (proxy_url)`);
    const source: BlockSource = {
      size: imageio.size,
      description: imageio.description,
      defaultName: imageio.defaultName,
      read: (target, offset) => imageio.read(target, offset),
      extents: () => imageio.extents(),
      close: async () => {
        await imageio.close();
        await closeTransfer(transfer.id, disk.id, 'finalize');
      },
      dispose: () => imageio.dispose(),
    };
    if (!started.checkpoint) {
      return { name: disk.name, source, plan: undefined, mode: 'full', modeReason: chain.mode === 'full' ? chain.reason : 'oVirt created no checkpoint', parent: null, cbt: null };
    }
    const settled = await settleChain({
      chain,
      source,
      dirty: () => imageio.dirtyExtents(),
      what: 'checkpoint',
      checkpoint: started.checkpoint,
      backupId: args.backupId,
      granularity: 65536,
      loadPage: args.loadPage,
      blockSize: args.blockSize,
      blockId: args.blockId,
      available: args.available,
    });
    return { name: disk.name, source, plan: settled.plan, mode: settled.chain.mode, modeReason: settled.chain.reason, parent: settled.chain.parent?.record.id ?? null, cbt: settled.cbt };
  };
  const prepared: CbtDiskJob[] = [];

  let released = false;
  const release = async (): Promise<void> => {
    if (released) return;
    released = true;
    // Transfers first: oVirt refuses to finalize a backup with a transfer that has not finished. A download
    // can always be finalized; one that cannot is cancelled.
    for (const [id] of open) {
      await closeTransfer(id, '', 'finalize').catch(() => closeTransfer(id, '', 'cancel'));
    }
    if (backupEntry) {
      await endBackup(client, backupEntry, wait, notice);
      await forget(backupEntry);
    }
  };
  return {
    disks: disks.map((disk, i) => ({
      name: disk.name,
      prepare: async () => {
        const job = await prepare(disk, i);
        prepared.push(job);
        return job;
      },
    })),
    release,
    finish: async () => {
      if (checkpointEntry) await forget(checkpointEntry);
      await journal.remove(() => true);
      // Checkpoint retention: keep the new checkpoint and each chain's full checkpoint (differentials read
      // against it); delete, oldest first, every other checkpoint this repository recorded. Another
      // product's checkpoints are not ours to delete (SITE incremental-backup.md: several backup products).
      const keep = new Set([started.checkpoint, ...prepared.flatMap((j) => (j.cbt ? [j.cbt.chainCheckpoint] : []))]);
      const ours = recordedCheckpoints(args.history);
      const now = children(child((await client.get(`vms/${vmId}/checkpoints`)).xml, 'checkpoints'), 'checkpoint').map((c) => attribute(c, 'id')!);
      for (const id of now) if (ours.has(id) && !keep.has(id)) await deleteCheckpoint(client, vmId, id, wait);
    },
    rollback: async () => {
      await release().catch((error: unknown) => notice(`could not end oVirt backup ${backupId}: ${(error as Error).message}`));
      // Nothing records this backup's checkpoint: it would only sit in every volume as one more bitmap.
      if (checkpointEntry) {
        await deleteCheckpoint(client, vmId, checkpointEntry.checkpoint!, wait)
          .then(() => forget(checkpointEntry))
          .catch((error: unknown) => notice(`could not delete checkpoint ${checkpointEntry.checkpoint}: ${(error as Error).message}; \`engine ovirt cleanup\` or the next run will`));
      }
      if (journal.entries.length === 0) await journal.remove(() => true);
    },
  };
}
