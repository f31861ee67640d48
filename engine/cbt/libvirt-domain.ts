/**
 * Changed-block tracking for a running VM under libvirt (a plain KVM host; what oVirt 4.4+ does
 * underneath): libvirt checkpoints and pull-mode backups.
 *
 * One backup = one `virsh backup-begin` job over all the domain's disks, with a new checkpoint
 * `engine-<backup id>` created at job start (every disk, `checkpoint='bitmap'`). libvirt exports each disk,
 * frozen at that instant, over NBD on a Unix socket (export name = the disk's target, dirty bitmap context
 * `qemu:dirty-bitmap:backup-<target>` for incremental disks). The engine reads them, ends the job with
 * `virsh domjobabort`, and after the record is committed deletes the engine checkpoints no chain needs.
 * A failed backup deletes the checkpoint it created: it survives the abort, and a next incremental based on
 * it would miss the writes this backup never stored.
 */
import { chown, mkdtemp, rm, writeFile, chmod } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { withRemedies } from '../errors.js';
import { MUTABLE_FILE_MODE } from '../../repo-format/file-modes.js';
import { adoptName } from '../../repo-format/names.js';
import { NbdSource } from '../sources/nbd-source.js';
import { chooseChain, settleChain, type CbtDiskJob, type CbtSession, type ChainArgs } from './chain.js';
import { bitmapName, bitmapPrefix } from './qcow2-bitmaps.js';
import { runTool } from './run-tool.js';

/** libvirt creates bitmaps with qemu's default granularity for qcow2. */
const LIBVIRT_GRANULARITY = 64 * 1024;

export interface DomainDisk {
  target: string;
  source: string;
  size: number;
}

/** All disks of one pull-mode job: released (domjobabort) after the last one, finished after the commit. */
export type LibvirtSession = CbtSession & { disks: CbtDiskJob[] };

function virsh(args: string[]): Promise<string> {
  return runTool('virsh', ['-q', ...args]);
}

export async function domainDisks(domain: string): Promise<DomainDisk[]> {
  const disks: DomainDisk[] = [];
  for (const line of (await virsh(['domblklist', domain, '--details'])).split('\n')) {
    const [, device, target, source] = line.trim().split(/\s+/);
    if (device !== 'disk' || !target || !source || source === '-') continue;
    const info = await virsh(['domblkinfo', domain, target]);
    const capacity = /Capacity:\s+(\d+)/.exec(info);
    if (!capacity) throw new InvalidArgumentError(`cannot read the size of disk ${target} of domain ${domain}`);
    disks.push({ target, source, size: Number(capacity[1]) });
  }
  if (disks.length === 0) throw new InvalidArgumentError(`domain ${domain} has no disks to back up`);
  return disks;
}

async function checkpoints(domain: string): Promise<string[]> {
  return (await virsh(['checkpoint-list', domain, '--name'])).split('\n').map((l) => l.trim()).filter(Boolean);
}

function xmlEscape(text: string): string {
  return text.replace(/&/g, '&amp;').replace(/'/g, '&apos;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

/** A directory qemu (running as libvirt-qemu) can create its socket and scratch files in. */
async function runDirectory(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'engine-libvirt-'));
  const ids = await runTool('id', ['-u', 'libvirt-qemu']).then(
    async (uid) => ({ uid: Number(uid.trim()), gid: Number((await runTool('id', ['-g', 'libvirt-qemu'])).trim()) }),
    () => undefined,
  );
  if (ids) await chown(dir, ids.uid, ids.gid);
  // The one directory the engine creates that is not 0700: qemu, running as libvirt-qemu, creates the
  // socket and scratch files in it. Its group is libvirt-qemu's; other users stay out.
  await chmod(dir, 0o770);
  return dir;
}

/** What one libvirt backup will do, decided before anything changes in libvirt. */
interface DomainBackupPlan {
  domain: string;
  disks: DomainDisk[];
  /** The record's disk names (the chains' keys), one per disk. */
  names: string[];
  chains: ReturnType<typeof chooseChain>[];
  /** The checkpoint this backup creates: engine-<repository>-<backup id>. */
  checkpoint: string;
}

/** The pull-mode job's files, in a directory qemu can use; `socket` is where libvirt serves the disks. */
interface JobFiles {
  dir: string;
  socket: string;
  backupXml: string;
  checkpointXml: string;
}

export async function openLibvirtBackup(args: ChainArgs & { domain: string }): Promise<LibvirtSession> {
  const plan = await planDomainBackup(args);
  const files = await writeJobFiles(plan);
  const job = pullJob(plan.domain, files.dir);
  const deleteCheckpoint = async (): Promise<void> => {
    await virsh(['checkpoint-delete', plan.domain, plan.checkpoint]).catch(() => undefined);
  };
  try {
    await job.begin(files);
    const jobs = await openDiskJobs(plan, files.socket, job.sources, args);
    return {
      disks: jobs,
      release: job.release,
      finish: () => deleteUnneededCheckpoints(plan, jobs, args.repositoryId),
      rollback: deleteCheckpoint,
    };
  } catch (error) {
    await job.release();
    await deleteCheckpoint();
    throw error;
  }
}

/** Phase 1: the domain's state, disks and checkpoints, and each disk's chain. Changes nothing. */
async function planDomainBackup(args: ChainArgs & { domain: string }): Promise<DomainBackupPlan> {
  const { domain } = args;
  const state = (await virsh(['domstate', domain])).trim();
  if (state !== 'running' && state !== 'paused') {
    throw new InvalidArgumentError(`domain ${domain} is ${state}: a libvirt backup needs a running VM`, withRemedies({ domain }, { kind: 'disk-kind', use: 'image' }));
  }
  const disks = await domainDisks(domain);
  const existing = new Set(await checkpoints(domain));
  const checkpointProblem = (base: string): string | null => (existing.has(base) ? null : `checkpoint ${base} no longer exists in libvirt`);
  // The record's disk name (and the chain's key): the target, or its safe form (names.ts); libvirt keeps the target.
  const names = disks.map((disk) => adoptName(disk.target, 'disk', `disk target of domain ${domain}`, args.onNotice ?? (() => undefined)));
  const chains = disks.map((disk, i) => chooseChain(names[i]!, args.requested, { size: disk.size, baseProblem: checkpointProblem, addedDisk: true }, args.history));
  return { domain, disks, names, chains, checkpoint: bitmapName(args.repositoryId, args.backupId) };
}

/** Phase 2: the backup and checkpoint definitions libvirt's backup-begin takes. */
async function writeJobFiles(plan: DomainBackupPlan): Promise<JobFiles> {
  const dir = await runDirectory();
  const socket = join(dir, 'backup.sock');
  const diskXml = plan.disks
    .map((disk, i) => {
      const chain = plan.chains[i]!;
      const mode = chain.base ? `backupmode='incremental' incremental='${xmlEscape(chain.base)}'` : `backupmode='full'`;
      return `<disk name='${xmlEscape(disk.target)}' backup='yes' type='file' ${mode}><scratch file='${xmlEscape(join(dir, `scratch-${disk.target}.qcow2`))}'/></disk>`;
    })
    .join('');
  const backupXml = join(dir, 'backup.xml');
  const checkpointXml = join(dir, 'checkpoint.xml');
  await writeFile(backupXml, `<domainbackup mode='pull'><server transport='unix' socket='${xmlEscape(socket)}'/><disks>${diskXml}</disks></domainbackup>`, { mode: MUTABLE_FILE_MODE });
  await writeFile(
    checkpointXml,
    `<domaincheckpoint><name>${xmlEscape(plan.checkpoint)}</name><disks>${plan.disks.map((d) => `<disk name='${xmlEscape(d.target)}' checkpoint='bitmap'/>`).join('')}</disks></domaincheckpoint>`,
    { mode: MUTABLE_FILE_MODE },
  );
  return { dir, socket, backupXml, checkpointXml };
}

/** Phase 3: the pull-mode job, and its release: the NBD sources closed, the job aborted, its files removed. */
function pullJob(domain: string, dir: string): { sources: NbdSource[]; begin: (files: JobFiles) => Promise<void>; release: () => Promise<void> } {
  let started = false;
  const sources: NbdSource[] = [];
  return {
    sources,
    begin: async (files) => {
      await virsh(['backup-begin', domain, files.backupXml, files.checkpointXml]);
      started = true;
    },
    release: async () => {
      for (const source of sources) await source.dispose();
      if (started) {
        started = false;
        await virsh(['domjobabort', domain]).catch(() => undefined);
        // libvirt tears the job down after domjobabort returns; its scratch files must outlive that.
        for (let i = 0; i < 100; i += 1) {
          const info = await virsh(['domjobinfo', domain]).catch(() => '');
          if (!/Job type:\s+(Unbounded|Bounded)/.test(info)) break;
          await new Promise((resolve) => setTimeout(resolve, 100));
        }
      }
      await rm(dir, { recursive: true, force: true });
    },
  };
}

/** Phase 4: each disk's export opened and its chain settled against what the export says. */
async function openDiskJobs(plan: DomainBackupPlan, socket: string, sources: NbdSource[], args: ChainArgs): Promise<CbtDiskJob[]> {
  const jobs: CbtDiskJob[] = [];
  for (const [i, disk] of plan.disks.entries()) {
    const chosen = plan.chains[i]!;
    const source = await NbdSource.open(`nbd+unix:///${encodeURIComponent(disk.target)}?socket=${socket}`, {
      dirtyContext: chosen.base ? `qemu:dirty-bitmap:backup-${disk.target}` : undefined,
      description: { kind: 'libvirt-disk', path: `${plan.domain}:${disk.target} (${disk.source})` },
    });
    sources.push(source);
    const { chain, cbt, plan: diskPlan } = await settleChain({
      chain: chosen,
      source,
      dirty: () => source.dirtyExtents(),
      what: 'checkpoint',
      checkpoint: plan.checkpoint,
      backupId: args.backupId,
      granularity: LIBVIRT_GRANULARITY,
      loadPage: args.loadPage,
      blockSize: args.blockSize,
      blockId: args.blockId,
      available: args.available,
    });
    jobs.push({ name: plan.names[i]!, source, plan: diskPlan, mode: chain.mode, modeReason: chain.reason, parent: chain.parent?.record.id ?? null, cbt });
  }
  return jobs;
}

/** After the commit: the engine's checkpoints no chain needs any more are deleted, newest first. */
async function deleteUnneededCheckpoints(plan: DomainBackupPlan, jobs: CbtDiskJob[], repositoryId: string): Promise<void> {
  const keep = new Set([plan.checkpoint, ...jobs.flatMap((j) => (j.cbt ? [j.cbt.chainCheckpoint] : []))]);
  // Newest first: deleting a checkpoint merges its bitmap into its parent checkpoint's.
  for (const name of (await checkpoints(plan.domain)).reverse()) {
    if (name.startsWith(bitmapPrefix(repositoryId)) && !keep.has(name)) await virsh(['checkpoint-delete', plan.domain, name]);
  }
}
