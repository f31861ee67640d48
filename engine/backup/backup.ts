/**
 * A backup of one or more disks into one backup record, committed in the order SPEC.md requires:
 * data packs durable and indexed → map pages durable and indexed → backup record (the commit point) →
 * only then the changed-block-tracking bookkeeping (old bitmaps removed).
 */
import { hostname } from 'node:os';
import { randomBytes } from 'node:crypto';
import { basename } from 'node:path';
import { Repository } from '../../repo-format/repository.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { checkLocalPath } from '../../repo-format/local-path.js';
import { adoptName, checkName, displayText } from '../../repo-format/names.js';
import { type BackupRecord, type BackupType, type Consistency, NO_QUIESCE, type DiskCbt, type DiskRecord, type RecordAttachment } from '../../repo-format/backup-record.js';
import { jobPool, type BlockPool, type PoolLender } from '../pipeline/block-pool.js';
import { backupDisk, type BackupDiskContext, type DiskProgress } from '../pipeline/backup-disk.js';
import { FileSource } from '../sources/file-source.js';
import { NO_EARLIER_BACKUP, type CbtDiskJob, type CbtSession, type ChainArgs, type DeferredCbtDiskJob, type RequestedMode } from '../cbt/chain.js';
import { InterruptedError, SourceUnreadableError, withRemedies } from '../errors.js';
import { Interruption } from '../host/interrupt.js';
import { MAX_DISK_SIZE } from '../../repo-format/constants.js';
import { ENGINE_VERSION } from '../version.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import { diskSpec, type BackupDisk, type BackupFrom, type ChainPolicy } from './request.js';
import type { ImageInfo } from '../cbt/qcow2-bitmaps.js';
import type { DomainLook } from '../cbt/libvirt-domain.js';

export type { CbtProvision, CbtSession, ChainArgs, RequestedMode } from '../cbt/chain.js';
export type { BackupDisk, BackupFrom, ChainPolicy } from './request.js';

/**
 * Opens the repository a backup writes to. A passphrase given for a plain repository is refused
 * (ENGINE_NOT_ENCRYPTED) rather than ignored: the caller expects encryption, and the config that says
 * otherwise may have been rewritten (SPEC.md, section 18.5).
 */
export function openBackupRepository(
  repo: string,
  passphrase: Passphrase | undefined,
  access: 'read' | 'exclusive',
  options: { onNotice?: ((message: string) => void) | undefined; signal?: AbortSignal | undefined } = {},
): Promise<Repository> {
  const interruption = new Interruption(options.signal, 'backup');
  // useReserve: false: a backup adds data, and would only fill the space set aside for prune and gc.
  return Repository.open(repo, {
    access,
    command: 'backup',
    passphrase,
    requireEncryption: passphrase !== undefined,
    useReserve: false,
    onNotice: options.onNotice,
    checkInterrupted: () => interruption.check(),
    manyWriters: true,
    signal: options.signal,
  });
}

export interface BackupOptions {
  repo: string;
  /** The passphrase of an encrypted repository. */
  passphrase?: Passphrase | undefined;
  /** The disks to read. */
  from: BackupFrom;
  /** The backup's name; a chain continues from the newest backup of the same name. Default: the disk's file name (or the names joined by "+"), the domain's name. */
  name?: string | undefined;
  /** Documents kept with the backup (e.g. the VM's OVF). */
  attachments?: RecordAttachment[] | undefined;
  /**
   * The guest's consistency at the backup's point in time (SPEC.md 9), recorded as given. A function when only
   * the provider learns it (an oVirt backup started inside `provide`): asked when the record is written.
   */
  consistency?: Consistency | (() => Consistency | undefined) | undefined;
  /** How the chains continue; default `auto`: incremental where a valid chain exists, full otherwise. */
  chain?: ChainPolicy | undefined;
  workers?: number | undefined;
  /** The server's shared worker pool (shared-pool.ts): the backup's pipeline runs on a lease of it, not a pool of its own. */
  sharedPool?: PoolLender | undefined;
  signal?: AbortSignal | undefined;
  onProgress?: ((progress: DiskProgress & { diskIndex: number; diskCount: number }) => void) | undefined;
  onNotice?: ((message: string) => void) | undefined;
}

export interface BackupResult {
  record: BackupRecord;
}

/** One disk to back up: a CBT job, or a plain source read whole (no CBT state), with its session if any. */
type DiskJob = Omit<CbtDiskJob, 'cbt'> & { cbt: DiskCbt | null; session?: CbtSession };
/** A disk of a provider that opens it only when its turn comes. */
type PendingDiskJob = DeferredCbtDiskJob & { session: CbtSession };
type Job = DiskJob | PendingDiskJob;

function isPending(job: Job): job is PendingDiskJob {
  return 'prepare' in job;
}

/** What the phases of one backup share. */
interface BackupRun {
  id: string;
  startTime: Date;
  requested: RequestedMode;
  options: BackupOptions;
  notice: (message: string) => void;
  /** Every disk opened so far, in the order they are read: released whatever happens. */
  jobs: Job[];
}

/**
 * A backup in phases: check the request (nothing opened) → refuse special files (before the lock) → open
 * the repository → open every disk and settle its chain (a plan of jobs) → read the disks through the
 * pipeline (data and map pages durable) → commit the record → finish the chains' bookkeeping.
 */
export async function backup(options: BackupOptions): Promise<BackupResult> {
  checkRequest(options);
  const run: BackupRun = { id: randomBytes(16).toString('hex'), startTime: new Date(), requested: options.chain?.mode ?? 'auto', options, notice: options.onNotice ?? (() => undefined), jobs: [] };
  let repo: Repository | undefined;
  let pool: BlockPool | undefined;
  let committed = false;
  try {
    await refuseSpecialFiles(options.from);
    const early = lookEarly(options.from);
    // A stale lock broken or an index rebuilt is said by the repository itself (notices.ts).
    repo = await openBackupRepository(options.repo, options.passphrase, 'exclusive', { onNotice: options.onNotice, signal: options.signal });
    const leftovers = await repo.removeTempFiles();
    if (leftovers > 0) run.notice(`removed ${leftovers} temporary files left by an interrupted writer`);
    const name = await openDisks(run, repo, early);
    pool = await jobPool(options.sharedPool, { blockSize: repo.blockSize, workers: options.workers, keys: repo.keys, compression: repo.compression, workBytes: workOf(run), signal: options.signal });
    const disks = await readDisks(run, repo, pool);
    const record = recordOf(run, name, repo.blockSize, disks);
    await commit(run, repo, record);
    committed = true;
    await finishSessions(run);
    return { record };
  } catch (error) {
    // An interruption met anywhere before the commit (a loop's check, a storage call the signal aborted) is
    // the backup's: said as such, with the signal, whatever part of it stopped.
    if (error instanceof InterruptedError && !committed) throw new Interruption(options.signal, 'backup').error();
    throw error;
  } finally {
    await release(run, committed);
    await pool?.close().catch(() => undefined);
    await repo?.close();
  }
}

/** What is read of the CBT sources while the repository opens: it changes nothing, and waits on other processes. */
interface EarlyLooks {
  /** `qemu-img info` of each image disk, by path. */
  images: Map<string, Promise<ImageInfo>>;
  /** virsh's look at the libvirt domain. */
  domain: Promise<DomainLook> | undefined;
}

/**
 * Starts the CBT sources' first questions (qemu-img info, virsh's state, disks and checkpoints) before the
 * repository is opened, so that the tools run while the lease is taken and the index cache opened (measured:
 * bench/fixed-costs.ts --phases). Read only; what changes an image or a domain (a bitmap, a checkpoint) still
 * comes after the repository is open. A failure is met where the answer is used, or not at all if the backup
 * fails before (the promise's rejection is handled here, not left unhandled).
 */
function lookEarly(from: BackupFrom): EarlyLooks {
  const quiet = <T>(promise: Promise<T>): Promise<T> => {
    promise.catch(() => undefined);
    return promise;
  };
  const images = new Map<string, Promise<ImageInfo>>();
  if (from.kind === 'disks') {
    for (const disk of from.disks) {
      if (disk.kind === 'image' && !images.has(disk.path)) images.set(disk.path, quiet(import('../cbt/qcow2-bitmaps.js').then((m) => m.imageInfo(disk.path))));
    }
  }
  const domain = from.kind === 'libvirt' ? quiet(import('../cbt/libvirt-domain.js').then((m) => m.lookAtDomain(from.domain))) : undefined;
  return { images, domain };
}

/**
 * At most the bytes the disks give the workers: an incremental's touched blocks (CbtDiskJob.workBytes), else all of
 * each disk, holes included; unknown while a provider's disk is not yet open.
 */
function workOf(run: BackupRun): number | undefined {
  let bytes = 0;
  for (const job of run.jobs) {
    if (isPending(job)) return undefined;
    bytes += job.workBytes ?? job.source.size;
  }
  return bytes;
}

/** Before anything is opened or locked: names keep the name rule (names.ts), and a URL is never taken for a relative path. */
function checkRequest(options: BackupOptions): void {
  if (options.name !== undefined) checkName(options.name, 'backup', 'backup name');
  const from = options.from;
  if (from.kind !== 'disks') return;
  if (from.disks.length === 0) throw new InvalidArgumentError('no disk given: the list of disks to back up is empty');
  for (const disk of from.disks) {
    if (disk.name !== undefined) checkName(disk.name, 'disk', 'disk name');
    if (disk.kind !== 'nbd') checkLocalPath(disk.path, `${disk.kind} disk`);
  }
}

/** Before the lock: a FIFO or a socket would hang open() (and hold the lock meanwhile); refuse it now. */
async function refuseSpecialFiles(from: BackupFrom): Promise<void> {
  if (from.kind !== 'disks') return;
  for (const disk of from.disks) if (disk.kind !== 'nbd') await FileSource.check(disk.path);
}

/**
 * Opens every disk before anything is written (a missing disk fails the run with nothing written): the
 * sources read whole, then, once every disk has its name, the images and the provider's disks with their
 * chains. Returns the backup's name.
 */
async function openDisks(run: BackupRun, repo: Repository, early: EarlyLooks): Promise<string> {
  const from = run.options.from;
  const disks = from.kind === 'disks' ? from.disks : [];
  const jobs: DiskJob[] = [];
  for (const [i, disk] of disks.entries()) if (disk.kind !== 'image') jobs[i] = await openWholeDisk(run, disk);
  const names = diskNames(disks, jobs, run.notice);
  jobs.forEach((job, i) => (job.name = names[i]!));
  const name = backupName(run, names);
  // The chain of a disk continues from the newest backup of the same name that has it; an image's from
  // the newest backup whose checkpoint bitmap the image holds, whatever its name (image-disk.ts).
  const everything = disks.some((d) => d.kind === 'image') || from.kind !== 'disks' ? (await repo.listBackups()).backups.reverse() : [];
  const args: ChainArgs = { backupId: run.id, requested: run.requested, history: everything.filter((r) => r.name === name), repositoryId: repo.config.id, loadPage: repo.loadPage, blockSize: repo.blockSize, blockId: repo.blobId, available: (ids) => repo.available(ids), onNotice: run.notice };
  for (const [i, disk] of disks.entries()) {
    if (disk.kind !== 'image') continue;
    const { openImageDisk } = await import('../cbt/image-disk.js');
    const session = await openImageDisk({ ...args, history: everything, image: disk.path, name: names[i]!, backupName: name, info: early.images.get(disk.path) });
    jobs[i] = { name: session.name, source: session.source, plan: session.plan, mode: session.mode, modeReason: session.modeReason, parent: session.parent, cbt: session.cbt, workBytes: session.workBytes, session };
    run.jobs.push(jobs[i]);
  }
  run.jobs.splice(0, run.jobs.length, ...jobs);
  const provide = from.kind === 'libvirt' ? async (chain: ChainArgs) => (await import('../cbt/libvirt-domain.js')).openLibvirtBackup({ domain: from.domain, look: early.domain, quiesce: from.quiesce, ...chain }) : from.kind === 'provider' ? from.provide : undefined;
  if (provide) {
    const session = await provide(args);
    for (const disk of session.disks) run.jobs.push({ ...disk, session });
  }
  const ready = run.jobs.filter((job): job is DiskJob => !isPending(job));
  for (const job of ready) refuseImpossibleSize(job);
  for (const job of ready) noticeFullRead(run, job);
  return name;
}

/**
 * A source read whole: no changed-block tracking, so an incremental asked for is a full read, said. The NBD
 * client (node:net, node:tls), like the qcow2 and libvirt sessions above, is loaded only when a disk needs it:
 * a backup of a file does not pay its start-up.
 */
async function openWholeDisk(run: BackupRun, disk: Extract<BackupDisk, { kind: 'raw' | 'nbd' }>): Promise<DiskJob> {
  const source = disk.kind === 'nbd' ? await (await import('../sources/nbd-source.js')).NbdSource.open(disk.uri) : await FileSource.open(disk.path);
  const noCbt = run.requested === 'incremental' || run.requested === 'differential' ? 'this source has no changed-block tracking (a qcow2 image has, backed up as an image disk)' : null;
  const job: DiskJob = { name: source.defaultName, source, plan: undefined, mode: 'full', modeReason: noCbt, parent: null, cbt: null };
  run.jobs.push(job);
  return job;
}

/**
 * Each disk's name: the one given, else its source's (a file name, an NBD export name), mapped to a safe one
 * with a notice when it breaks the rule (before any chain is looked up by it); two disks may not share one.
 */
function diskNames(disks: readonly BackupDisk[], opened: readonly DiskJob[], notice: (message: string) => void): string[] {
  const names = disks.map((disk, i) => {
    if (disk.name !== undefined) return disk.name;
    if (disk.kind === 'image') return adoptName(basename(disk.path), 'disk', `the file name of image ${disk.path}`, notice);
    return adoptName(opened[i]!.name, 'disk', `the name of source ${diskSpec(disk)}`, notice);
  });
  const seen = new Set<string>();
  for (const name of names) {
    if (seen.has(name)) throw new InvalidArgumentError(`two disks are named "${displayText(name, 64)}"`, withRemedies({ disk: name }, { kind: 'name-disks' }));
    seen.add(name);
  }
  return names;
}

function backupName(run: BackupRun, names: string[]): string {
  const { options, notice } = run;
  if (options.name !== undefined) return options.name;
  const from = options.from;
  if (from.kind === 'libvirt') return adoptName(from.domain, 'backup', 'the domain name', notice);
  const disks = from.kind === 'disks' ? from.disks : [];
  return adoptName(disks.length === 1 ? basename(diskSpec(disks[0]!)) : names.join('+'), 'backup', 'the default backup name', notice);
}

/** A size no record may hold (SPEC 9) is refused before anything is read: readers would call the backup damaged. */
function refuseImpossibleSize(job: DiskJob): void {
  if (job.source.size > MAX_DISK_SIZE) throw new SourceUnreadableError(job.source.description.path, `it reports ${job.source.size} bytes, more than the ${MAX_DISK_SIZE} (1 PiB) a backed-up disk may have`);
}

/**
 * A chain that cannot continue is said at once (the run will take longer than usual); a first backup is a
 * full read as expected, and the result says why once.
 */
function noticeFullRead(run: BackupRun, job: DiskJob): void {
  if (job.cbt && job.modeReason && run.requested !== 'full' && !job.modeReason.startsWith(NO_EARLIER_BACKUP)) run.notice(`disk ${job.name}: full read: ${job.modeReason}`);
}

/** Reads every disk in turn through the pipeline; the data and map pages are durable when it returns. */
async function readDisks(run: BackupRun, repo: Repository, pool: BlockPool): Promise<DiskRecord[]> {
  const dataWriter = repo.createBlobWriter();
  const metaWriter = repo.createBlobWriter();
  const disks: DiskRecord[] = [];
  try {
    for (let i = 0; i < run.jobs.length; i += 1) disks.push(await readDisk(run, i, { repo, pool, dataWriter, metaWriter }));
    if (run.options.signal?.aborted) throw new InterruptedError('backup');
    await dataWriter.flush();
    await metaWriter.flush();
  } catch (error) {
    await dataWriter.abort();
    await metaWriter.abort();
    throw error;
  }
  return disks;
}

/** Disk `i`: prepared if its provider opens it only now, read, closed; its session released after its last disk. */
async function readDisk(run: BackupRun, i: number, writers: Omit<BackupDiskContext, 'signal' | 'onProgress'>): Promise<DiskRecord> {
  const entry = run.jobs[i]!;
  let job: DiskJob;
  if (isPending(entry)) {
    // Preparing a disk waits on its source (extents lists, the CBT audit's reads), which may stall: that wait
    // is interruptible, and a disk that gets prepared after the signal is disposed, not left open.
    const preparing = entry.prepare();
    try {
      job = { ...(await new Interruption(run.options.signal, 'backup').race(preparing)), session: entry.session };
    } catch (error) {
      void preparing.then((late) => late.source.dispose(), () => undefined);
      throw error;
    }
    run.jobs[i] = job;
    refuseImpossibleSize(job);
    noticeFullRead(run, job);
  } else {
    job = entry;
  }
  const { signal, onProgress } = run.options;
  const diskCount = run.jobs.length;
  const disk = await backupDisk(job.source, job.name, { ...writers, signal, onProgress: onProgress && ((p) => onProgress({ ...p, diskIndex: i, diskCount })) }, job.plan);
  await job.source.close();
  // A session (a libvirt job) may serve several disks: end it after its last one.
  if (job.session && !run.jobs.slice(i + 1).some((later) => later.session === job.session)) await job.session.release();
  return { ...disk, mode: job.mode, modeReason: job.modeReason, parent: job.parent, cbt: job.cbt };
}

function backupType(disks: DiskRecord[]): BackupType {
  if (disks.some((d) => d.mode === 'differential')) return 'differential';
  if (disks.some((d) => d.mode === 'incremental')) return 'incremental';
  return 'full';
}

function recordOf(run: BackupRun, name: string, blockSize: number, disks: DiskRecord[]): BackupRecord {
  return {
    version: 1,
    id: run.id,
    name,
    type: backupType(disks),
    parent: disks.find((d) => d.parent !== null)?.parent ?? null,
    startTime: run.startTime.toISOString(),
    endTime: new Date().toISOString(),
    hostname: hostname(),
    engineVersion: ENGINE_VERSION,
    blockSize,
    disks,
    attachments: [...(run.options.attachments ?? []), ...[...sessionsOf(run)].flatMap((session) => session?.attachments ?? [])],
    consistency: consistencyOf(run),
  };
}

/**
 * The backup's consistency (SPEC.md 9): what the caller established (the oVirt flows: a value, or a function read
 * when the record is written, since the flow learns it only once its backup is ready), else what the sessions
 * established (a libvirt job's quiesce; several sessions take the weakest), else crash: nothing was frozen.
 */
function consistencyOf(run: BackupRun): Consistency {
  const given = run.options.consistency;
  const established = typeof given === 'function' ? given() : given;
  if (established) return established;
  const levels: Consistency['level'][] = ['crash', 'filesystem', 'application'];
  let weakest: Consistency | undefined;
  for (const session of sessionsOf(run)) {
    const c = session?.consistency;
    if (c && (!weakest || levels.indexOf(c.level) < levels.indexOf(weakest.level))) weakest = c;
  }
  return weakest ?? NO_QUIESCE;
}

/** The commit point; then what the run found of lost packs is said. */
async function commit(run: BackupRun, repo: Repository, record: BackupRecord): Promise<void> {
  for (const warning of await repo.commitBackup(record)) run.notice(warning);
  const lost = [...repo.packPresence.unavailable];
  if (lost.length > 0) {
    run.notice(
      `${lost.length === 1 ? 'pack' : 'packs'} ${lost.map(([pack, why]) => `${pack} (${why})`).join(', ')}: this backup did not trust the index entries naming ${lost.length === 1 ? 'it' : 'them'}, and stored again what it found there; run engine verify to see which older backups lost data (a backup of their source heals them), then ${repo.manyWriters ? 'engine gc' : 'engine repair'} to drop the dead index entries`,
    );
  }
}

function sessionsOf(run: BackupRun): Set<CbtSession | undefined> {
  return new Set(run.jobs.map((j) => j.session));
}

/** Only after the commit: the chains' bookkeeping (old bitmaps and checkpoints removed). */
async function finishSessions(run: BackupRun): Promise<void> {
  for (const session of sessionsOf(run)) {
    await session?.finish().catch((error: unknown) => run.notice(`could not remove old checkpoints: ${(error as Error).message}`));
  }
}

/** Whatever happened: sources disposed, sessions released, and rolled back unless the backup was committed. */
async function release(run: BackupRun, committed: boolean): Promise<void> {
  for (const job of run.jobs) if (!isPending(job)) await job.source.dispose();
  for (const session of sessionsOf(run)) {
    await session?.release().catch(() => undefined);
    if (!committed) await session?.rollback();
  }
}
