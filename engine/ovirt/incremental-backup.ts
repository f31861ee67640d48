/**
 * oVirt 4.4+ incremental backup API: `POST /vms/{id}/backups` (with `from_checkpoint_id` for an
 * incremental) → wait for phase `ready` → read `to_checkpoint_id` then (oVirt sets it only once the host
 * has the checkpoint: StartVmBackupCommand, HybridBackupCommand) → per disk `backup_mode` → for each disk
 * in turn, right before it is read, a download image transfer (format raw), read through ovirt-imageio
 * (zero extents skipped; for incremental disks only the dirty extents), finalized as soon as the disk is
 * read → finalize the backup → after the record is committed, delete the checkpoints no chain needs.
 * In the code, the same phases in order: planChains → BackupSession.startReady → prepareDisk (per disk)
 * → release → finish (checkpoint retention), or rollback.
 *
 * A checkpoint the engine refuses, or any error of an incremental start (event 10791 surfaces so), or a
 * backup that fails before `ready` (the host could not start it), is retried as a full backup, said in
 * `modeReason`. From cluster level
 * 4.5 oVirt mixes full and incremental disks in one backup (per-disk `backup_mode`); below it, one disk
 * without a valid chain makes every disk a full read.
 *
 * With --quiesce (quiesce.ts): a live backup is asked with `require_consistency`, a hybrid one (cluster 4.7+)
 * started with the guest frozen through freezefilesystems; the record's consistency says what happened.
 */
import type { JournalEntry } from '../../repo-format/journal.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import type { BackupRecord } from '../../repo-format/backup-record.js';
import { backup, openBackupRepository, type BackupResult } from '../backup/backup.js';
import { chooseChain, settleChain, type CbtDiskJob, type CbtProvision, type Chain, type ChainArgs, type RequestedMode } from '../cbt/chain.js';
import { OvirtFaultError } from '../errors.js';
import type { BlockSource } from '../sources/source.js';
import { readCaFile, type OvirtClient, type OvirtClientOptions } from './client.js';
import { ImageioSource } from './imageio-source.js';
import { cancelTransfer, finalizeTransfer, startTransfer } from './transfers.js';
import { deleteCheckpoint, endBackup, removeSnapshot, RunJournal, undo, withOvirt } from './cleanup.js';
import { atLeast, clusterOfVm, isNotFound, vmIdByName, waitOf, type OvirtBackupRunOptions, type OvirtCluster, type Wait } from './common.js';
import { BACKUP_SNAPSHOT_DESCRIPTION, BackupPhase, CheckpointState, DiskBackupMode, SnapshotStatus, VmStatus } from './vocabulary.js';
import { backupDiskModes, backupList, backupOf, checkpointList, createdId, diskAttachmentList, diskOf, snapshotList, vmOf, type CheckpointSummary } from './answers.js';
import { adoptName } from '../../repo-format/names.js';
import type { Consistency } from '../../repo-format/backup-record.js';
import { QuiesceFailedError } from '../errors.js';
import { consistencyIgnored, freezeFailure, frozenAround, LIVE_BACKUP_FROZEN, liveBackupUnfrozen, liveBackupUnproven, newestEvent, NO_QUIESCE, notRunning, type OvirtQuiesceMode, type QuiesceTarget } from './quiesce.js';

export interface OvirtIncrementalBackupOptions extends OvirtBackupRunOptions {
  mode?: RequestedMode | undefined;
  /** Quiesce the guest at the backup's point in time (quiesce.ts: require_consistency, or a freeze around a hybrid backup's snapshot). */
  quiesce?: OvirtQuiesceMode | undefined;
  /** How long the guest may stay frozen (quiesce.ts); default freezeTimeoutMs(). */
  freezeTimeoutMs?: number | undefined;
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
  const attachments = await client.read(`vms/${vmId}/diskattachments`, diskAttachmentList);
  const disks: VmDisk[] = [];
  for (const attachment of attachments) {
    const id = attachment.diskId;
    const disk = await client.read(`disks/${id}`, (xml, what) => diskOf(xml, what, id));
    if (!attachment.active) {
      notice(`disk ${disk.alias} (${id}) is not active on VM ${vmName}: oVirt backs up active disks only, it is left out`);
      continue;
    }
    // Names from oVirt keep the name rule, or are recorded in a safe form (names.ts).
    disks.push({ id, name: adoptName(disk.alias, 'disk', `disk alias of disk ${id}`, notice), size: disk.size });
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
  const backups = await client.read(`vms/${vmId}/backups`, backupList);
  if (backups.some((b) => b.phase !== BackupPhase.succeeded && b.phase !== BackupPhase.failed)) return;
  const snapshots = await client.read(`vms/${vmId}/snapshots`, snapshotList);
  for (const s of snapshots.filter((s) => s.description === BACKUP_SNAPSHOT_DESCRIPTION && s.status === SnapshotStatus.ok)) {
    notice(`removing snapshot ${s.id} ("${BACKUP_SNAPSHOT_DESCRIPTION}") left by an earlier backup (event 10813)`);
    await removeSnapshot(client, vmId, s.id, wait);
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
    const { ovf, status } = await client.read(`vms/${vmId}`, vmOf, { all_content: 'true' });
    const outcome: { consistency?: Consistency } = {};
    const vm: QuiesceTarget = { id: vmId, name: options.vm, status };
    return backup({
      repo: options.repo,
      passphrase: options.passphrase,
      name: adoptName(options.vm, 'backup', 'the VM name', notice),
      chain: { mode: options.mode ?? 'auto' },
      consistency: () => outcome.consistency,
      workers: options.workers,
      sharedPool: options.sharedPool,
      signal: options.signal,
      onProgress: options.onProgress,
      onNotice: options.onNotice,
      attachments: [
        ...(ovf ? [{ name: 'ovf', mediaType: 'application/ovf+xml', data: ovf }] : []),
        { name: 'ovirt-vm', mediaType: 'application/json', data: JSON.stringify({ vmId, vmName: options.vm, disks: disks.map((d) => ({ id: d.id, alias: d.name, size: d.size })) }) },
      ],
      from: { kind: 'provider', provide: (args) => openOvirtBackup({ client, vmId, cluster, disks, args, wait, repo: options.repo, ca, notice, vm, quiesce: options.quiesce, freezeTimeoutMs: options.freezeTimeoutMs, ovirt: options.ovirt, outcome }) },
    });
  });
}

/** What one backup run works with, from the start of the oVirt backup to its end. */
interface BackupRun {
  client: OvirtClient;
  vmId: string;
  cluster: OvirtCluster;
  disks: VmDisk[];
  args: ChainArgs;
  wait: Wait;
  repo: string;
  ca: Buffer | undefined;
  notice: (m: string) => void;
  vm: QuiesceTarget;
  quiesce: OvirtQuiesceMode | undefined;
  freezeTimeoutMs: number | undefined;
  /** The connection, for the thaw watchdog of a frozen hybrid backup (quiesce.ts). */
  ovirt: OvirtClientOptions;
  /** The consistency the backup that became ready had (set by BackupSession.start). */
  outcome: { consistency?: Consistency };
}

/** A backup as oVirt started it: ready, failed, or gone before it was ready. */
interface StartedBackup {
  id: string;
  phase: string;
  /** The checkpoint this backup created (to_checkpoint_id once `ready`); undefined when oVirt made none. */
  checkpoint: string | undefined;
  from: string | null;
}

/** A backup that is ready to be read: how each disk is read, after what oVirt decided. */
interface ReadyBackup {
  id: string;
  checkpoint: string | undefined;
  /** Each disk's chain (a refused incremental made every disk full). */
  chains: Chain[];
  /** backup_mode per disk id (types/Disk.java; from cluster level 4.5). */
  modes: Map<string, string>;
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

/** Every chain made a full read, saying why (a full one keeps its own reason). */
function allFull(chains: Chain[], why: (chain: Chain) => string | null): Chain[] {
  return chains.map((c) => ({ mode: 'full', reason: c.mode === 'full' ? c.reason : why(c), base: null, parent: null, previous: null }));
}

/**
 * Phase 1, the plan: each disk's chain, against the checkpoints oVirt still has. oVirt reads every disk of
 * a backup against one checkpoint; from cluster level 4.5 a disk the checkpoint does not cover is read in
 * full beside incremental ones (StartVmBackupCommand.getBackupModeForDisk), below it such a mix is refused
 * (ACTION_TYPE_FAILED_MIXED_INCREMENTAL_AND_FULL_BACKUP_NOT_SUPPORTED).
 */
function planChains(run: BackupRun, checkpoints: CheckpointSummary[]): Chain[] {
  const baseProblem = (base: string): string | null => {
    const found = checkpoints.find((c) => c.id === base);
    if (!found) return `checkpoint ${base} no longer exists in oVirt`;
    return found.state === CheckpointState.invalid ? `checkpoint ${base} is invalid in oVirt` : null;
  };
  const chains = run.disks.map((d) => chooseChain(d.name, run.args.requested, { size: d.size, baseProblem, addedDisk: true }, run.args.history));
  const incremental = chains.filter((c) => c.mode !== 'full');
  if (new Set(incremental.map((c) => c.base)).size > 1) {
    return allFull(chains, () => 'the disks continue chains from different checkpoints, and oVirt reads a backup against one');
  }
  if (incremental.length > 0 && incremental.length < chains.length && !atLeast(run.cluster.version, 4, 5)) {
    return allFull(chains, () => `oVirt below cluster level 4.5 (cluster ${run.cluster.name} is ${run.cluster.version.join('.')}) cannot mix full and incremental disks in one backup, and another disk of the VM needs a full backup`);
  }
  return chains;
}

async function openOvirtBackup(run: BackupRun): Promise<CbtProvision> {
  const chains = planChains(run, await run.client.read(`vms/${run.vmId}/checkpoints`, checkpointList));
  const session = new BackupSession(run, await RunJournal.create(run.repo, { flow: 'ovirt-backup-api', vm: run.vmId }));
  return session.provision(await session.startReady(chains));
}

/**
 * One oVirt backup from its start to its end, every resource journaled as it is created and forgotten as
 * it goes: the backup (and its hybrid snapshot), its checkpoint, and each disk's image transfer.
 */
class BackupSession {
  private backupEntry: JournalEntry | undefined;
  private checkpointEntry: JournalEntry | undefined;
  /** Transfers open now (at most one: each disk's is finalized once the disk is read). */
  private readonly open = new Map<string, JournalEntry>();
  private readonly prepared: CbtDiskJob[] = [];
  private released = false;
  /** Why the guest could not be frozen for this run's live backup (`try`): later starts do not ask again. */
  private unfrozen: string | undefined;

  constructor(
    private readonly run: BackupRun,
    private readonly journal: RunJournal,
  ) {}

  /**
   * Phase 2: the backup started and ready, its checkpoint learnt. A refused checkpoint (400), or the start
   * itself failing (a checkpoint redefinition that fails is an error of the POST: event 10791, the chain
   * removed), or an incremental that fails before `ready`: a full backup is what oVirt asks for.
   */
  async startReady(planned: Chain[]): Promise<ReadyBackup> {
    const { client, vmId } = this.run;
    let chains = planned;
    const base = chains.find((c) => c.mode !== 'full')?.base ?? null;
    let started: StartedBackup;
    let modes: Map<string, string>;
    try {
      try {
        started = await this.start(base);
      } catch (error) {
        if (!(base && error instanceof OvirtFaultError && (error.status === 400 || error.status >= 500))) throw error;
        await this.abandon();
        chains = allFull(chains, () => `oVirt refused the incremental backup: ${error.message}`);
        started = await this.start(null);
      }
      if (started.phase !== BackupPhase.ready && base && started.from !== null) {
        // oVirt accepted it, then the host could not start it (StartVmBackupCommand in STARTING: e.g. libvirt
        // finds the checkpoint's bitmap missing or inconsistent; event 10792); event 10791 fails the POST instead.
        const how = started.phase === 'gone' ? 'it vanished' : `phase ${started.phase}`;
        await this.abandon();
        chains = allFull(chains, () => `oVirt failed the incremental backup from checkpoint ${base} before it was ready (${how}; oVirt's events say why): a full backup instead`);
        started = await this.start(null);
      }
      if (started.phase !== BackupPhase.ready) {
        throw new OvirtFaultError(`backup of VM ${vmId}`, 200, started.phase === 'gone' ? 'the backup vanished before it was ready' : `the backup ended in phase ${started.phase}`, 'see the engine events for the reason');
      }
      // Below cluster level 4.5 there is no backup_mode: a started incremental backup is incremental for
      // every disk, since oVirt refuses a mix.
      const from = started.from;
      const reported = await client.read(`vms/${vmId}/backups/${started.id}/disks`, backupDiskModes);
      modes = new Map([...reported].map(([id, mode]) => [id, mode ?? (from ? DiskBackupMode.incremental : DiskBackupMode.full)]));
    } catch (error) {
      await this.abandon().catch(() => undefined);
      await this.journal.clear();
      throw error;
    }
    if (started.checkpoint) this.checkpointEntry = await this.journal.track({ kind: 'checkpoint', vm: vmId, checkpoint: started.checkpoint });
    else this.run.notice('oVirt created no checkpoint for this backup (no qcow2 disk): every disk is read in full and no chain is kept');
    return { id: started.id, checkpoint: started.checkpoint, chains, modes };
  }

  /**
   * Starts a backup, quiesced as asked (quiesce.ts), and waits for `ready` (or failed, or gone); the
   * consistency it got goes to the run's outcome. A live backup whose freeze failed under
   * `require_consistency` (the engine's event says so) fails the run (`required`) or is started again
   * without it (`try`); any other failure is the caller's to judge.
   */
  private async start(from: string | null): Promise<StartedBackup> {
    const { client, vmId, vm, quiesce, notice, outcome } = this.run;
    const down = quiesce ? notRunning(vm, quiesce, notice) : NO_QUIESCE;
    if (!quiesce || down) {
      outcome.consistency = down;
      return this.post(from, false);
    }
    // HybridBackupCommand from cluster level 4.7 (UseHybridBackup, 0000_config.sql): a snapshot, frozen around.
    if (atLeast(this.run.cluster.version, 4, 7)) {
      const { value, consistency } = await frozenAround(client, this.journal, vm, { mode: quiesce, ovirt: this.run.ovirt, freezeTimeoutMs: this.run.freezeTimeoutMs }, () => this.post(from, false), notice);
      outcome.consistency = consistency;
      return value;
    }
    if (this.unfrozen) {
      outcome.consistency = liveBackupUnfrozen(this.unfrozen);
      return this.post(from, false);
    }
    const ignored = await consistencyIgnored(client);
    if (ignored) {
      if (quiesce === 'required') throw new QuiesceFailedError(vm.name, ignored);
      notice(`VM ${vm.name} could not be quiesced (${ignored}): backing it up crash-consistent`);
      outcome.consistency = liveBackupUnproven(ignored);
      return this.post(from, false);
    }
    const since = await newestEvent(client);
    const started = await this.post(from, true);
    if (started.phase === BackupPhase.ready) {
      // VDSM freezes only a running guest: a VM that went down (or paused) meanwhile proves nothing.
      const { status } = await client.read(`vms/${vmId}`, vmOf);
      if (status === VmStatus.up) {
        outcome.consistency = LIVE_BACKUP_FROZEN;
        return started;
      }
      const why = `the VM was ${status ?? 'in no known state'}, not up, when its backup became ready: nothing says its guest was frozen`;
      if (quiesce === 'required') {
        await this.abandon();
        throw new QuiesceFailedError(vm.name, why);
      }
      notice(`VM ${vm.name}: ${why}; the backup is crash-consistent`);
      outcome.consistency = liveBackupUnproven(why);
      return started;
    }
    const why = await freezeFailure(client, vmId, since);
    if (!why) return started;
    await this.abandon();
    if (quiesce === 'required') throw new QuiesceFailedError(vm.name, why);
    notice(`VM ${vm.name} could not be quiesced (${why}): backing it up crash-consistent`);
    this.unfrozen = why;
    outcome.consistency = liveBackupUnfrozen(why);
    return this.post(from, false);
  }

  /** POSTs a backup (with require_consistency when asked) and waits for `ready` (or failed, or gone); reads to_checkpoint_id once ready. */
  private async post(from: string | null, requireConsistency: boolean): Promise<StartedBackup> {
    const { client, vmId, disks, wait } = this.run;
    const what = `POST vms/${vmId}/backups`;
    const body = { ...(from ? { from_checkpoint_id: from } : {}), disks: { disk: disks.map((d) => ({ '@_id': d.id })) } };
    const answer = (await client.post(`vms/${vmId}/backups`, 'backup', body, requireConsistency ? { require_consistency: 'true' } : undefined)).xml;
    const id = createdId(answer, 'backup', what, 'backup');
    this.backupEntry = await this.journal.track({ kind: 'backup', vm: vmId, backup: id });
    let current = backupOf(answer, what);
    const phase = await client.waitFor(`backup ${id} to be ready`, async () => {
      try {
        current = await client.read(`vms/${vmId}/backups/${id}`, backupOf);
      } catch (error) {
        if (!isNotFound(error)) throw error;
        return 'gone';
      }
      // A hybrid backup names its snapshot from the start: journal it, so that a crash cannot leak it.
      const snapshot = current.snapshotId;
      if (snapshot && this.backupEntry && this.backupEntry.snapshot !== snapshot) {
        this.backupEntry = await this.journal.replace(this.backupEntry, { ...this.backupEntry, snapshot });
      }
      return current.phase === BackupPhase.ready || current.phase === BackupPhase.failed ? current.phase : undefined;
    }, wait);
    const checkpoint = phase === 'gone' ? undefined : current.toCheckpoint;
    return { id, phase, checkpoint, from };
  }

  /** A backup that did not become ready: finalized (if oVirt still knows it) and forgotten. */
  private async abandon(): Promise<void> {
    if (!this.backupEntry) return;
    await undo(this.run.client, this.backupEntry, this.run.wait, this.run.notice);
    await this.journal.forget(this.backupEntry);
    this.backupEntry = undefined;
  }

  /** What the backup pipeline drives: the disks (each prepared in turn), then release, finish or rollback. */
  provision(ready: ReadyBackup): CbtProvision {
    return {
      disks: this.run.disks.map((disk, i) => ({
        name: disk.name,
        prepare: async () => {
          const job = await this.prepareDisk(ready, disk, ready.chains[i]!);
          this.prepared.push(job);
          return job;
        },
      })),
      release: () => this.release(),
      finish: () => this.finish(ready),
      rollback: () => this.rollback(ready),
    };
  }

  /** Phase 3, per disk: its own transfer, opened right before the read (a transfer must not sit idle). */
  private async prepareDisk(ready: ReadyBackup, disk: VmDisk, planned: Chain): Promise<CbtDiskJob> {
    const { client, vmId, args } = this.run;
    let chain = planned;
    if (chain.mode !== 'full' && ready.modes.get(disk.id) !== DiskBackupMode.incremental) {
      chain = { mode: 'full', reason: 'oVirt backs this disk up in full (backup_mode full)', base: null, parent: null, previous: null };
    }
    const transfer = await startTransfer(client, { disk: disk.id, backup: ready.id, direction: 'download' }, async (id) => {
      this.open.set(id, await this.journal.track({ kind: 'transfer', transfer: id }));
    }, this.run.wait);
    const imageio = await ImageioSource.open(transfer, disk.size, { name: disk.name, description: { kind: 'ovirt-imageio', path: `${vmId}/${disk.id}` }, ca: this.run.ca });
    if (imageio.viaProxy) this.run.notice(`disk ${disk.name}: the host's imageio (transfer_url) cannot be reached, reading through the engine's proxy (proxy_url)`);
    const source: BlockSource = {
      size: imageio.size,
      description: imageio.description,
      defaultName: imageio.defaultName,
      read: (target, offset) => imageio.read(target, offset),
      extents: () => imageio.extents(),
      close: async () => {
        await imageio.close();
        await this.closeTransfer(transfer.id, disk.id, 'finalize');
      },
      dispose: () => imageio.dispose(),
    };
    if (!ready.checkpoint) {
      return { name: disk.name, source, plan: undefined, mode: 'full', modeReason: chain.mode === 'full' ? chain.reason : 'oVirt created no checkpoint', parent: null, cbt: null };
    }
    const settled = await settleChain({
      chain,
      source,
      dirty: () => imageio.dirtyExtents(),
      what: 'checkpoint',
      checkpoint: ready.checkpoint,
      backupId: args.backupId,
      granularity: 65536,
      loadPage: args.loadPage,
      blockSize: args.blockSize,
      blockId: args.blockId,
      available: args.available,
    });
    return { name: disk.name, source, plan: settled.plan, mode: settled.chain.mode, modeReason: settled.chain.reason, parent: settled.chain.parent?.record.id ?? null, cbt: settled.cbt };
  }

  private async closeTransfer(id: string, disk: string, how: 'finalize' | 'cancel'): Promise<void> {
    const entry = this.open.get(id);
    if (!entry) return;
    if (how === 'finalize') await finalizeTransfer(this.run.client, { id, disk, direction: 'download' }, this.run.wait);
    else await cancelTransfer(this.run.client, id, this.run.wait);
    this.open.delete(id);
    await this.journal.forget(entry);
  }

  /**
   * Phase 4: transfers first (oVirt refuses to finalize a backup with a transfer that has not finished: a
   * download can always be finalized, one that cannot is cancelled), then the backup is finalized.
   */
  private async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    for (const [id] of this.open) {
      await this.closeTransfer(id, '', 'finalize').catch(() => this.closeTransfer(id, '', 'cancel'));
    }
    if (this.backupEntry) {
      await endBackup(this.run.client, this.backupEntry, this.run.wait, this.run.notice);
      await this.journal.forget(this.backupEntry);
    }
  }

  /**
   * Phase 5, after the record is committed: checkpoint retention. Keep the new checkpoint and each chain's
   * full checkpoint (differentials read against it); delete, oldest first, every other checkpoint this
   * repository recorded. Another product's checkpoints are not ours to delete (SITE
   * incremental-backup.md: several backup products).
   */
  private async finish(ready: ReadyBackup): Promise<void> {
    const { client, vmId, args, wait } = this.run;
    if (this.checkpointEntry) await this.journal.forget(this.checkpointEntry);
    await this.journal.clear();
    const keep = new Set([ready.checkpoint, ...this.prepared.flatMap((j) => (j.cbt ? [j.cbt.chainCheckpoint] : []))]);
    const ours = recordedCheckpoints(args.history);
    const now = (await client.read(`vms/${vmId}/checkpoints`, checkpointList)).map((c) => c.id);
    // One that oVirt cannot delete (a bitmap lost from a disk of a running VM) does not keep the others.
    for (const id of now) {
      if (!ours.has(id) || keep.has(id)) continue;
      await deleteCheckpoint(client, vmId, id, wait).catch((error: unknown) => this.run.notice(`could not delete old checkpoint ${id}: ${(error as Error).message}; the next run tries again`));
    }
  }

  /** The backup failed: release what it holds, and delete its checkpoint (nothing records it). */
  private async rollback(ready: ReadyBackup): Promise<void> {
    const { client, vmId, wait, notice } = this.run;
    await this.release().catch((error: unknown) => notice(`could not end oVirt backup ${ready.id}: ${(error as Error).message}`));
    // Nothing records this backup's checkpoint: it would only sit in every volume as one more bitmap.
    const entry = this.checkpointEntry;
    if (entry) {
      await deleteCheckpoint(client, vmId, entry.checkpoint!, wait)
        .then(() => this.journal.forget(entry))
        .catch((error: unknown) => notice(`could not delete checkpoint ${entry.checkpoint}: ${(error as Error).message}; \`engine ovirt cleanup\` or the next run will`));
    }
    if (this.journal.entries.length === 0) await this.journal.clear();
  }
}
