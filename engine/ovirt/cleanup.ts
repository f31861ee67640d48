/**
 * Undoing what a journal names (SPEC.md 12.1): detach attachments, cancel transfers, finalize backups,
 * delete checkpoints, remove VMs, snapshots and disks, each idempotently (already gone is fine).
 */
import { Journal, type JournalEntry } from '../../repo-format/journal.js';
import { Repository } from '../../repo-format/repository.js';
import { OvirtFaultError } from '../errors.js';
import { OvirtClient, type OvirtClientOptions } from './client.js';
import { isNotFound, type Wait } from './common.js';
import { cancelTransfer } from './transfers.js';
import { BACKUP_SNAPSHOT_DESCRIPTION, BackupPhase, SnapshotStatus } from './vocabulary.js';
import { backupPhase, snapshotList, snapshotOf } from './answers.js';

async function deleteIfPresent(client: OvirtClient, path: string): Promise<void> {
  await client.delete(path).catch((error: unknown) => {
    if (!isNotFound(error)) throw error;
  });
}

/** Polls until GET `path` answers 404. */
async function waitGone(client: OvirtClient, what: string, path: string, wait: Wait): Promise<void> {
  await client.waitFor(what, async () => client.get(path).then(() => undefined, (error: unknown) => {
    if (isNotFound(error)) return true;
    throw error;
  }), wait);
}

/**
 * The order cleanup undoes kinds in: a frozen guest is thawed first (its writes are held); then what holds a
 * resource goes before the resource.
 */
const UNDO_ORDER = ['freeze', 'attachment', 'transfer', 'backup', 'checkpoint', 'vm', 'snapshot', 'disk'];

const backupDone = (phase: string | undefined): boolean => phase === BackupPhase.succeeded || phase === BackupPhase.failed;

/** The backup's phase, or undefined once oVirt has purged it (404). */
async function currentPhase(client: OvirtClient, vm: string, backup: string): Promise<string | undefined | 'gone'> {
  try {
    return await client.read(`vms/${vm}/backups/${backup}`, backupPhase);
  } catch (error) {
    if (isNotFound(error)) return 'gone';
    throw error;
  }
}

/**
 * Finalizes a backup and waits until it has succeeded, failed or been purged. oVirt refuses to stop a
 * backup that is already finalizing or finished, and answers a premature stop (before `ready`) with an
 * error although it does stop it (StopVmBackupCommand): a 400 is fine when the backup is, or then goes,
 * past `ready`. A 409 (a transfer still ending) is retried by the client.
 */
export async function finalizeBackup(client: OvirtClient, vm: string, backup: string, wait: Wait): Promise<void> {
  try {
    await client.post(`vms/${vm}/backups/${backup}/finalize`, 'action', {});
  } catch (error) {
    if (isNotFound(error)) return;
    if (!(error instanceof OvirtFaultError && error.status === 400)) throw error;
    const phase = await currentPhase(client, vm, backup);
    if (phase !== 'gone' && phase !== BackupPhase.finalizing && !backupDone(phase)) throw error;
  }
  await client.waitFor(`backup ${backup} to finish`, async () => {
    const phase = await currentPhase(client, vm, backup);
    return phase === 'gone' || backupDone(phase) ? true : undefined;
  }, wait);
}

/** Removes a snapshot and waits until it is gone; a locked one (being created or merged) is waited for first. */
export async function removeSnapshot(client: OvirtClient, vm: string, snapshot: string, wait: Wait): Promise<void> {
  const path = `vms/${vm}/snapshots/${snapshot}`;
  const settled = await client.waitFor(`snapshot ${snapshot} to settle`, async () => {
    try {
      const { status } = await client.read(path, snapshotOf);
      return status === SnapshotStatus.locked ? undefined : 'present';
    } catch (error) {
      if (isNotFound(error)) return 'gone';
      throw error;
    }
  }, wait);
  if (settled === 'present') await deleteIfPresent(client, path);
  await waitGone(client, `snapshot ${snapshot} to be removed`, path, wait);
}

/**
 * Removes a hybrid backup's snapshot if it outlived its backup: oVirt removes it while finalizing, but a
 * failed removal leaves it behind with a succeeded backup (event 10813, VM_BACKUP_SNAPSHOT_POSSIBLE_LEFTOVER;
 * HybridBackupCommand.endWithFailure).
 */
async function removeLeftoverBackupSnapshot(client: OvirtClient, vm: string, snapshot: string, wait: Wait, notice: (m: string) => void): Promise<void> {
  try {
    await client.get(`vms/${vm}/snapshots/${snapshot}`);
  } catch (error) {
    if (isNotFound(error)) return;
    throw error;
  }
  notice(`removing snapshot ${snapshot} ("${BACKUP_SNAPSHOT_DESCRIPTION}") that oVirt left after the backup (event 10813)`);
  await removeSnapshot(client, vm, snapshot, wait);
}

/** Ends a journaled backup: finalized, and its hybrid snapshot removed if oVirt left it. */
export async function endBackup(client: OvirtClient, entry: JournalEntry, wait: Wait, notice: (m: string) => void): Promise<void> {
  await finalizeBackup(client, entry.vm!, entry.backup!, wait);
  if (entry.snapshot) await removeLeftoverBackupSnapshot(client, entry.vm!, entry.snapshot, wait, notice);
}

/** Deletes a checkpoint and waits until it is gone (DeleteVmCheckpointCommand runs on after the answer). */
export async function deleteCheckpoint(client: OvirtClient, vm: string, checkpoint: string, wait: Wait): Promise<void> {
  const path = `vms/${vm}/checkpoints/${checkpoint}`;
  await deleteIfPresent(client, path);
  await waitGone(client, `checkpoint ${checkpoint} to be removed`, path, wait);
}

/** Removes what a journal entry names, idempotently (already gone is fine). */
export async function undo(client: OvirtClient, entry: JournalEntry, wait: Wait, notice: (m: string) => void = () => undefined): Promise<void> {
  if (entry.kind === 'attachment') {
    await deleteIfPresent(client, `vms/${entry.vm}/diskattachments/${entry.disk}`);
  } else if (entry.kind === 'vm') {
    await deleteIfPresent(client, `vms/${entry.vm}`);
  } else if (entry.kind === 'disk') {
    await deleteIfPresent(client, `disks/${entry.disk}`);
  } else if (entry.kind === 'transfer') {
    await cancelTransfer(client, entry.transfer!, wait);
  } else if (entry.kind === 'backup') {
    await endBackup(client, entry, wait, notice);
  } else if (entry.kind === 'checkpoint') {
    await deleteCheckpoint(client, entry.vm!, entry.checkpoint!, wait);
  } else if (entry.kind === 'snapshot' && !entry.snapshot) {
    // The run died between asking for the snapshot and learning its id: find it by its description.
    const list = await client.read(`vms/${entry.vm}/snapshots`, snapshotList);
    for (const found of list.filter((s) => s.description === entry.description)) {
      await undo(client, { ...entry, snapshot: found.id }, wait, notice);
    }
  } else if (entry.kind === 'snapshot') {
    await removeSnapshot(client, entry.vm!, entry.snapshot, wait);
  } else if (entry.kind === 'freeze') {
    // A run killed while the guest was frozen (quiesce.ts): thawed. A VM no longer up or gone has nothing frozen.
    await client.post(`vms/${entry.vm}/thawfilesystems`, 'action', {}).catch((error: unknown) => {
      if (!(error instanceof OvirtFaultError && (error.status === 404 || error.status === 409))) throw error;
    });
  }
}

/**
 * Undoes what a run created, newest first. Each undone resource leaves the journal; one that cannot be undone
 * stays in it, said, for `engine ovirt cleanup` or the next run.
 */
export async function undoCreated(client: OvirtClient, journal: Journal, created: readonly JournalEntry[], wait: Wait, notice: (m: string) => void): Promise<void> {
  for (const entry of [...created].reverse()) {
    try {
      await undo(client, entry, wait, notice);
      await journal.remove((e) => e === entry);
    } catch (error) {
      notice(`could not remove ${entry.kind} (${(error as Error).message}); \`engine ovirt cleanup\` or the next run will`);
    }
  }
  if (journal.entries.length === 0) await journal.remove(() => true);
}

/**
 * The journal of one run and what the run created, in order: `track` records a resource before (or as)
 * it is created, `forget` once it is gone, `replace` when it learns more about one (a snapshot's id),
 * `undoAll` removes what is left, newest first, `clear` ends a run that leaves its resources in place.
 */
export class RunJournal {
  private readonly created: JournalEntry[] = [];

  private constructor(private readonly journal: Journal) {}

  static async create(repo: string, context: Record<string, string>): Promise<RunJournal> {
    return new RunJournal(await Journal.create(await Repository.journalRoot(repo), context));
  }

  get entries(): readonly JournalEntry[] {
    return this.journal.entries;
  }

  async track(entry: JournalEntry): Promise<JournalEntry> {
    await this.journal.add(entry);
    this.created.push(entry);
    return entry;
  }

  async forget(entry: JournalEntry): Promise<void> {
    await this.journal.remove((e) => e === entry);
    const at = this.created.indexOf(entry);
    if (at >= 0) this.created.splice(at, 1);
  }

  /** `updated` takes `entry`'s place: recorded before the old entry goes, so a crash between leaves both. */
  async replace(entry: JournalEntry, updated: JournalEntry): Promise<JournalEntry> {
    await this.journal.add(updated);
    await this.journal.remove((e) => e === entry);
    const at = this.created.indexOf(entry);
    if (at >= 0) this.created.splice(at, 1, updated);
    else this.created.push(updated);
    return updated;
  }

  async clear(): Promise<void> {
    await this.journal.remove(() => true);
    this.created.length = 0;
  }

  async undoAll(client: OvirtClient, wait: Wait, notice: (m: string) => void): Promise<void> {
    await undoCreated(client, this.journal, this.created, wait, notice);
  }
}

/** Undoes every entry of every journal in the repository: attachments first, then snapshots. */
export async function cleanupJournals(repo: string, client: OvirtClient, wait: Wait, notice: (m: string) => void): Promise<number> {
  let removed = 0;
  for (const journal of await Journal.list(await Repository.journalRoot(repo))) {
    const ordered = [...journal.entries].sort((a, b) => UNDO_ORDER.indexOf(a.kind) - UNDO_ORDER.indexOf(b.kind));
    for (const entry of ordered) {
      await undo(client, entry, wait, notice);
      await journal.remove((e) => e === entry);
      notice(`${entry.kind === 'freeze' ? 'thawed' : 'removed'} leftover ${entry.kind} ${entry.snapshot || entry.transfer || entry.backup || entry.checkpoint || entry.disk || entry.vm} of an interrupted run`);
      removed += 1;
    }
    await journal.remove(() => true);
  }
  return removed;
}

/**
 * Every oVirt flow runs inside this: log in, undo what an interrupted run left behind (so that a flow never
 * works beside a previous run's snapshot, attachment or disk), run, and log out whatever happened — the SSO
 * token is revoked (sso-logout, as the SDK's Connection.close does) rather than left valid until it expires.
 */
export async function withOvirt<T>(repo: string, clientOptions: OvirtClientOptions, wait: Wait, notice: (m: string) => void, run: (client: OvirtClient, removed: number) => Promise<T>): Promise<T> {
  const client = new OvirtClient(clientOptions);
  await client.login();
  try {
    return await run(client, await cleanupJournals(repo, client, wait, notice));
  } finally {
    await client.logout().catch((error: unknown) => notice(`could not log out of oVirt: ${(error as Error).message}`));
  }
}

export async function ovirtCleanup(options: { repo: string; ovirt: OvirtClientOptions; onNotice?: (m: string) => void }): Promise<number> {
  return withOvirt(options.repo, options.ovirt, { timeoutMs: 600_000, intervalMs: 1000 }, options.onNotice ?? (() => undefined), async (_client, removed) => removed);
}
