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
import { isNbdUri } from '../nbd/uri.js';
import { type BackupRecord, type BackupType, type DiskCbt, type DiskRecord, type RecordAttachment } from '../../repo-format/backup-record.js';
import { BlockPool } from '../pipeline/block-pool.js';
import { backupDisk, type DiskProgress } from '../pipeline/backup-disk.js';
import { openSource } from '../sources/open-source.js';
import { FileSource } from '../sources/file-source.js';
import { openImageDisk } from '../cbt/image-disk.js';
import { NO_EARLIER_BACKUP, type CbtDiskJob, type CbtProvision, type CbtSession, type ChainArgs, type DeferredCbtDiskJob, type RequestedMode } from '../cbt/chain.js';
import { openLibvirtBackup } from '../cbt/libvirt-domain.js';
import { InterruptedError, SourceUnreadableError } from '../errors.js';
import { Interruption } from '../host/interrupt.js';
import { MAX_DISK_SIZE } from '../../repo-format/constants.js';
import { ENGINE_VERSION } from '../version.js';
import type { Passphrase } from '../../repo-format/passphrase.js';

export type { CbtProvision, CbtSession, ChainArgs, RequestedMode } from '../cbt/chain.js';

export interface BackupOptions {
  repo: string;
  /** The passphrase of an encrypted repository. */
  passphrase?: Passphrase | undefined;
  /** Raw images, block devices or NBD URIs (nbd://host/export, nbd+unix:///export?socket=PATH): read whole. */
  sources?: string[] | undefined;
  /** qcow2 images of a stopped VM: the engine manages their dirty bitmaps (incremental, differential). */
  images?: string[] | undefined;
  /** A running libvirt domain: all its disks, through checkpoints and a pull-mode backup. */
  libvirt?: string | undefined;
  /**
   * Disks prepared by a flow of its own (e.g. oVirt's backup API), given what it needs to decide each
   * disk's chain. Its session is released after its last disk, finished after the commit, rolled back on
   * failure. A deferred disk is prepared (its source opened, its chain settled) right before it is read.
   */
  provider?: ((args: ChainArgs) => Promise<CbtProvision>) | undefined;
  /** Disk names, one per source then one per image; default: each file name (or NBD export name). */
  diskNames?: string[] | undefined;
  name?: string | undefined;
  /** Documents kept with the backup (e.g. the VM's OVF). */
  attachments?: RecordAttachment[] | undefined;
  /** Default 'auto': incremental where a valid chain exists, full otherwise. */
  mode?: RequestedMode | undefined;
  workers?: number | undefined;
  signal?: AbortSignal | undefined;
  onProgress?: ((progress: DiskProgress & { diskIndex: number; diskCount: number }) => void) | undefined;
  onNotice?: ((message: string) => void) | undefined;
}

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
  });
}

export interface BackupResult {
  record: BackupRecord;
}

function checkDistinct(names: string[]): void {
  const seen = new Set<string>();
  for (const name of names) {
    if (seen.has(name)) throw new InvalidArgumentError(`two disks are named "${displayText(name, 64)}": give distinct --disk-name values`);
    seen.add(name);
  }
}

/** One disk to back up: a CBT job, or a plain source read whole (no CBT state), with its session if any. */
type DiskJob = Omit<CbtDiskJob, 'cbt'> & { cbt: DiskCbt | null; session?: CbtSession };
/** A disk of a provider that opens it only when its turn comes. */
type PendingDiskJob = DeferredCbtDiskJob & { session: CbtSession };

function isPending(job: DiskJob | PendingDiskJob): job is PendingDiskJob {
  return 'prepare' in job;
}

function backupType(disks: DiskRecord[]): BackupType {
  if (disks.some((d) => d.mode === 'differential')) return 'differential';
  if (disks.some((d) => d.mode === 'incremental')) return 'incremental';
  return 'full';
}

export async function backup(options: BackupOptions): Promise<BackupResult> {
  const plainSpecs = options.sources ?? [];
  const imagePaths = options.images ?? [];
  if (options.libvirt !== undefined && plainSpecs.length + imagePaths.length > 0) {
    throw new InvalidArgumentError('--libvirt backs up all disks of the domain: do not combine it with --source or --image');
  }
  if (options.libvirt !== undefined && options.diskNames && options.diskNames.length > 0) {
    throw new InvalidArgumentError('--libvirt names each disk after its target (vda, sdb…): --disk-name does not apply');
  }
  const diskCount = plainSpecs.length + imagePaths.length;
  // Names the user gives must keep the name rule (names.ts): refused before anything is opened.
  for (const name of options.diskNames ?? []) checkName(name, 'disk', '--disk-name');
  if (options.name !== undefined) checkName(options.name, 'backup', '--name');
  if (diskCount === 0 && options.libvirt === undefined && options.provider === undefined) throw new InvalidArgumentError('no disk given: name at least one --source or --image, or --libvirt DOMAIN');
  if (options.diskNames && options.diskNames.length > 0 && options.diskNames.length !== diskCount) {
    throw new InvalidArgumentError(`${options.diskNames.length} disk names for ${diskCount} disks: give one --disk-name per --source and --image, in that order`);
  }
  // Before anything is opened or locked: a URL is never taken for a relative path.
  for (const spec of plainSpecs) if (!isNbdUri(spec)) checkLocalPath(spec, '--source', 'nbd:// and nbd+unix:// URIs');
  for (const path of imagePaths) checkLocalPath(path, '--image');
  const requested = options.mode ?? 'auto';
  const startTime = new Date();
  const id = randomBytes(16).toString('hex');
  const jobs: (DiskJob | PendingDiskJob)[] = [];
  let repo: Repository | undefined;
  let pool: BlockPool | undefined;
  let committed = false;
  try {
    // Before the lock: a FIFO or a socket would hang open() (and hold the lock meanwhile); refuse it now.
    for (const path of [...plainSpecs.filter((spec) => !isNbdUri(spec)), ...imagePaths]) await FileSource.check(path);
    // A stale lock broken or an index rebuilt is said by the repository itself (notices.ts).
    repo = await openBackupRepository(options.repo, options.passphrase, 'exclusive', { onNotice: options.onNotice, signal: options.signal });
    const notice = options.onNotice ?? (() => undefined);
    const leftovers = await repo.removeTempFiles();
    if (leftovers > 0) notice(`removed ${leftovers} temporary files left by an interrupted writer`);

    // Open every disk before writing anything: a missing disk fails the run with nothing written.
    const noCbt = requested === 'incremental' || requested === 'differential' ? 'this source has no changed-block tracking (use --image for qcow2)' : null;
    for (const spec of plainSpecs) {
      const source = await openSource(spec);
      jobs.push({ name: source.defaultName, source, plan: undefined, mode: 'full', modeReason: noCbt, parent: null, cbt: null });
    }
    // Names from outside (file names, NBD export names, a domain name) are mapped to safe ones when they
    // break the rule, with a notice, before any chain is looked up by them.
    const names =
      options.diskNames && options.diskNames.length > 0
        ? options.diskNames
        : [...jobs.map((j, i) => adoptName(j.name, 'disk', `the name of --source ${plainSpecs[i]!}`, notice)), ...imagePaths.map((p) => adoptName(basename(p), 'disk', `the file name of --image ${p}`, notice))];
    checkDistinct(names);
    jobs.forEach((job, i) => (job.name = names[i]!));
    const name =
      options.name ??
      (options.libvirt !== undefined
        ? adoptName(options.libvirt, 'backup', 'the domain name', notice)
        : adoptName(diskCount === 1 ? basename(plainSpecs[0] ?? imagePaths[0]!) : names.join('+'), 'backup', 'the default backup name', notice));
    // The chain of a disk continues from the newest backup of the same name that has it; an image's from
    // the newest backup whose checkpoint bitmap the image holds, whatever its name (image-disk.ts).
    const everything = imagePaths.length > 0 || options.libvirt !== undefined || options.provider !== undefined ? (await repo.listBackups()).backups.reverse() : [];
    const history = everything.filter((r) => r.name === name);
    const chainArgs: ChainArgs = { backupId: id, requested, history, repositoryId: repo.config.id, loadPage: repo.loadPage, blockSize: repo.blockSize, blockId: repo.blobId, available: (ids) => repo!.available(ids), onNotice: notice };
    for (const [i, image] of imagePaths.entries()) {
      const session = await openImageDisk({ ...chainArgs, history: everything, image, name: names[plainSpecs.length + i]!, backupName: name });
      jobs.push({ name: session.name, source: session.source, plan: session.plan, mode: session.mode, modeReason: session.modeReason, parent: session.parent, cbt: session.cbt, session });
    }
    const provider = options.libvirt !== undefined ? (args: ChainArgs) => openLibvirtBackup({ domain: options.libvirt!, ...args }) : options.provider;
    if (provider) {
      const session = await provider(chainArgs);
      for (const disk of session.disks) jobs.push({ ...disk, session });
    }
    // A size no record may hold (SPEC 9) is refused before anything is read: readers would call the backup damaged.
    // A disk opened only when its turn comes (oVirt transfers) is checked then.
    const refuseImpossibleSize = (job: DiskJob): void => {
      if (job.source.size > MAX_DISK_SIZE) throw new SourceUnreadableError(job.source.description.path, `it reports ${job.source.size} bytes, more than the ${MAX_DISK_SIZE} (1 PiB) a backed-up disk may have`);
    };
    for (const job of jobs) if (!isPending(job)) refuseImpossibleSize(job);
    // A chain that cannot continue is said at once (the run will take longer than usual); a first backup is
    // a full read as expected, and the result says why once.
    const noticeFullRead = (job: DiskJob): void => {
      if (job.cbt && job.modeReason && requested !== 'full' && !job.modeReason.startsWith(NO_EARLIER_BACKUP)) notice(`disk ${job.name}: full read: ${job.modeReason}`);
    };
    for (const job of jobs) if (!isPending(job)) noticeFullRead(job);

    pool = new BlockPool({ blockSize: repo.blockSize, workers: options.workers, keys: repo.keys });
    const dataWriter = repo.createBlobWriter();
    const metaWriter = repo.createBlobWriter();
    const disks: DiskRecord[] = [];
    try {
      for (const [i, entry] of jobs.entries()) {
        let job: DiskJob;
        if (isPending(entry)) {
          job = { ...(await entry.prepare()), session: entry.session };
          jobs[i] = job;
          refuseImpossibleSize(job);
          noticeFullRead(job);
        } else {
          job = entry;
        }
        const disk = await backupDisk(
          job.source,
          job.name,
          {
            repo,
            pool,
            dataWriter,
            metaWriter,
            signal: options.signal,
            onProgress: options.onProgress && ((p) => options.onProgress!({ ...p, diskIndex: i, diskCount: jobs.length })),
          },
          job.plan,
        );
        await job.source.close();
        // A session (a libvirt job) may serve several disks: end it after its last one.
        if (job.session && !jobs.slice(i + 1).some((later) => later.session === job.session)) await job.session.release();
        disks.push({ ...disk, mode: job.mode, modeReason: job.modeReason, parent: job.parent, cbt: job.cbt });
      }
      if (options.signal?.aborted) throw new InterruptedError('backup');
      await dataWriter.flush();
      await metaWriter.flush();
    } catch (error) {
      await dataWriter.abort();
      await metaWriter.abort();
      throw error;
    }
    const record: BackupRecord = {
      version: 1,
      id,
      name,
      type: backupType(disks),
      parent: disks.find((d) => d.parent !== null)?.parent ?? null,
      startTime: startTime.toISOString(),
      endTime: new Date().toISOString(),
      hostname: hostname(),
      engineVersion: ENGINE_VERSION,
      blockSize: repo.blockSize,
      disks,
      attachments: options.attachments ?? [],
    };
    for (const warning of await repo.commitBackup(record)) notice(warning);
    committed = true;
    const lost = [...repo.packPresence.unavailable];
    if (lost.length > 0) {
      notice(
        `${lost.length === 1 ? 'pack' : 'packs'} ${lost.map(([pack, why]) => `${pack} (${why})`).join(', ')}: this backup did not trust the index entries naming ${lost.length === 1 ? 'it' : 'them'}, and stored again what it found there; engine verify names the older backups that lost data, engine repair drops the dead entries`,
      );
    }
    for (const session of new Set(jobs.map((j) => j.session))) {
      await session?.finish().catch((error: unknown) => notice(`could not remove old checkpoints: ${(error as Error).message}`));
    }
    return { record };
  } finally {
    for (const job of jobs) if (!isPending(job)) await job.source.dispose();
    for (const session of new Set(jobs.map((j) => j.session))) {
      await session?.release().catch(() => undefined);
      if (!committed) await session?.rollback();
    }
    await pool?.close().catch(() => undefined);
    await repo?.close();
  }
}
