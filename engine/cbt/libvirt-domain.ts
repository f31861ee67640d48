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
 *
 * The record keeps the domain's definition (`libvirt-domain`, its secrets removed): what a boot test or a restore
 * recreates the VM from (its machine type, firmware, boot order).
 */
import { randomBytes } from 'node:crypto';
import { chown, mkdtemp, readFile, rm, writeFile, chmod } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { RecordAttachment } from '../../repo-format/backup-record.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { withRemedies } from '../errors.js';
import { MUTABLE_FILE_MODE } from '../../repo-format/file-modes.js';
import { adoptName } from '../../repo-format/names.js';
import { NbdSource } from '../sources/nbd-source.js';
import { chooseChain, settleChain, type CbtDiskJob, type CbtSession, type ChainArgs } from './chain.js';
import { bitmapName, bitmapPrefix } from './qcow2-bitmaps.js';
import { runTool, runToolOutput, ToolError } from './run-tool.js';
import { quiesced, type QuiesceRequest } from './guest-quiesce.js';

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

/**
 * One word of a virsh command line: every character but the plainest escaped (virsh's own parser takes `\x` as x;
 * whole code points, so that no escape falls inside a character). Exported for its test.
 */
export function virshWord(word: string): string {
  return word.replace(/[^A-Za-z0-9_./:@-]/gu, (c) => `\\${c}`);
}

/**
 * Several virsh commands in one virsh process (one start of virsh and one connection to libvirtd instead of one
 * each: ~40-250 ms of wall time apiece on a loaded host), their outputs apart. virsh runs every command of a batch
 * and exits 0 even when some failed: a failure shows only as `error:` on stderr, which becomes the ToolError here
 * unless `tolerate` (the caller then reads `errors`).
 */
async function virshBatch(commands: string[][], options: { tolerate?: boolean } = {}): Promise<{ outputs: string[]; errors: string }> {
  const marker = `@@engine-${randomBytes(6).toString('hex')}@@`;
  const line = commands.map((command) => command.map(virshWord).join(' ')).join(` ; echo ${marker} ; `);
  const { stdout, stderr } = await runToolOutput('virsh', ['-q', line]);
  // Said as the commands, without the markers.
  const shown = ['-q', commands.map((command) => command.join(' ')).join(' ; ')];
  const errors = stderr.split('\n').filter((l) => l.startsWith('error:')).join(' ').trim();
  if (errors && !options.tolerate) throw new ToolError('virsh', shown, errors);
  const outputs = stdout.split(marker);
  if (outputs.length !== commands.length) throw new ToolError('virsh', shown, errors || `it gave ${outputs.length} outputs for ${commands.length} commands`);
  return { outputs, errors };
}

/** The disks of `virsh domblklist --details` (files and block devices with a source; no CD-ROM) and their sizes from `domblkinfo --all`. */
function domainDisks(domain: string, blockList: string, blockInfo: string): DomainDisk[] {
  const capacities = new Map<string, string>();
  for (const line of blockInfo.split('\n')) {
    const [target, capacity] = line.trim().split(/\s+/);
    if (target && capacity) capacities.set(target, capacity);
  }
  const disks: DomainDisk[] = [];
  for (const line of blockList.split('\n')) {
    const [, device, target, source] = line.trim().split(/\s+/);
    if (device !== 'disk' || !target || !source || source === '-') continue;
    const capacity = capacities.get(target);
    if (capacity === undefined || !/^\d+$/.test(capacity)) throw new InvalidArgumentError(`cannot read the size of disk ${target} of domain ${domain}`);
    disks.push({ target, source, size: Number(capacity) });
  }
  if (disks.length === 0) throw new InvalidArgumentError(`domain ${domain} has no disks to back up`);
  return disks;
}

function checkpointNames(list: string): string[] {
  return list.split('\n').map((l) => l.trim()).filter(Boolean);
}

function xmlEscape(text: string): string {
  return text.replace(/&/g, '&amp;').replace(/'/g, '&apos;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}

/** libvirt-qemu's uid and gid: from /etc/passwd (no process), else `id` (a user from another name service). */
async function qemuUser(): Promise<{ uid: number; gid: number } | undefined> {
  const entry = (await readFile('/etc/passwd', 'utf8').catch(() => '')).split('\n').find((line) => line.startsWith('libvirt-qemu:'));
  const [, , uid, gid] = entry?.split(':') ?? [];
  if (uid && gid && /^\d+$/.test(uid) && /^\d+$/.test(gid)) return { uid: Number(uid), gid: Number(gid) };
  return runTool('id', ['-u', 'libvirt-qemu']).then(
    async (found) => ({ uid: Number(found.trim()), gid: Number((await runTool('id', ['-g', 'libvirt-qemu'])).trim()) }),
    () => undefined,
  );
}

/** A directory qemu (running as libvirt-qemu) can create its socket and scratch files in. */
async function runDirectory(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), 'engine-libvirt-'));
  const ids = await qemuUser();
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
  /** The domain's checkpoints before this backup, oldest first (checkpoint-list). */
  existing: string[];
  /** Its definition (dumpxml --inactive), as virsh gave it. */
  definition: string;
}

/** The pull-mode job's files, in a directory qemu can use; `socket` is where libvirt serves the disks. */
interface JobFiles {
  dir: string;
  socket: string;
  backupXml: string;
  checkpointXml: string;
}

/** What virsh says of a domain before its backup: its state, disks, their sizes, its checkpoints and its definition (one virsh). */
export interface DomainLook {
  state: string;
  blockList: string;
  blockInfo: string;
  checkpointList: string;
  /** `dumpxml --inactive`, as virsh gave it (secrets still to be removed: withoutSecrets). */
  definition: string;
  errors: string;
}

export async function lookAtDomain(domain: string): Promise<DomainLook> {
  // The definition the domain starts from next (--inactive), not the live one: that is what a restored VM is
  // defined from. The live XML adds what this run of QEMU was given (aliases, an autoport's port, seclabels,
  // hot-plugged devices not made persistent), none of which a new VM should take; the machine type (expanded
  // at define: `pc` → `pc-i440fx-7.2`), firmware and boot order do not change while the domain runs. A transient
  // domain has no other definition: libvirt gives its live one. No --security-info:
  // libvirt leaves out graphics passwords and cookies itself; withoutSecrets removes them again.
  const { outputs, errors } = await virshBatch(
    [['domstate', domain], ['domblklist', domain, '--details'], ['domblkinfo', domain, '--all'], ['checkpoint-list', domain, '--name'], ['dumpxml', domain, '--inactive']],
    { tolerate: true },
  );
  const [state, blockList, blockInfo, checkpointList, definition] = outputs as [string, string, string, string, string];
  return { state: state.trim(), blockList, blockInfo, checkpointList, definition, errors };
}

/**
 * A domain XML without its secrets, to be kept in the repository: every `passwd` attribute (VNC, SPICE and RDP
 * passwords, and `passwdValidTo` with them) and `<cookies>` (an HTTP disk's session cookies) removed. What stays
 * names secrets without holding them: `<secret usage=… uuid=…>` of iSCSI, RBD and LUKS auth, `<auth username=…>`.
 * virsh already leaves these out without --security-info; this holds when it does not (another libvirt, a
 * definition given some other way). Exported for its test.
 */
export function withoutSecrets(xml: string): string {
  return xml
    .replace(/\s+passwd(?:ValidTo)?\s*=\s*(?:'[^']*'|"[^"]*")/gu, '')
    .replace(/[ \t]*<cookies\b[^>]*\/>\n?|[ \t]*<cookies\b[^>]*>[\s\S]*?<\/cookies\s*>\n?/gu, '');
}

/** The record's attachment for a domain's definition (SPEC.md 9): `libvirt-domain`, `application/xml`, secrets removed. */
export function domainAttachment(definition: string): RecordAttachment {
  return { name: 'libvirt-domain', mediaType: 'application/xml', data: withoutSecrets(definition) };
}

/** `look`: lookAtDomain, started while the repository opened (backup.ts). */
export async function openLibvirtBackup(args: ChainArgs & { domain: string; look?: Promise<DomainLook> | undefined; quiesce?: QuiesceRequest | undefined }): Promise<LibvirtSession> {
  // The job's directory is made while virsh answers.
  const directory = runDirectory();
  const plan = await planDomainBackup(args).catch(async (error: unknown) => {
    await directory.then((dir) => rm(dir, { recursive: true, force: true }), () => undefined);
    throw error;
  });
  const files = await writeJobFiles(plan, await directory);
  const job = pullJob(plan.domain, files.dir);
  const deleteCheckpoint = async (): Promise<void> => {
    await virsh(['checkpoint-delete', plan.domain, plan.checkpoint]).catch(() => undefined);
  };
  try {
    // Frozen around backup-begin only: the export is frozen in time once it returns, and is read after the thaw.
    const consistency = await quiesced(plan.domain, args.quiesce, () => job.begin(files), args.onNotice ?? (() => undefined));
    const jobs = await openDiskJobs(plan, files.socket, job.sources, args);
    return {
      consistency,
      attachments: [domainAttachment(plan.definition)],
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

/** Phase 1: the domain's state, disks, checkpoints and definition (one virsh), and each disk's chain. Changes nothing. */
async function planDomainBackup(args: ChainArgs & { domain: string; look?: Promise<DomainLook> | undefined }): Promise<DomainBackupPlan> {
  const { domain } = args;
  const { state, blockList, blockInfo, checkpointList, definition, errors } = await (args.look ?? lookAtDomain(domain));
  // No state: no such domain (or no libvirtd): virsh's own words.
  if (!state) throw new ToolError('virsh', ['-q', 'domstate', domain], errors || 'it gave no state');
  if (state !== 'running' && state !== 'paused') {
    throw new InvalidArgumentError(`domain ${domain} is ${state}: a libvirt backup needs a running VM`, withRemedies({ domain }, { kind: 'disk-kind', use: 'image' }));
  }
  if (errors) throw new ToolError('virsh', ['-q', 'domblklist', domain], errors);
  const disks = domainDisks(domain, blockList, blockInfo);
  const listed = checkpointNames(checkpointList);
  const existing = new Set(listed);
  const checkpointProblem = (base: string): string | null => (existing.has(base) ? null : `checkpoint ${base} no longer exists in libvirt`);
  // The record's disk name (and the chain's key): the target, or its safe form (names.ts); libvirt keeps the target.
  const names = disks.map((disk) => adoptName(disk.target, 'disk', `disk target of domain ${domain}`, args.onNotice ?? (() => undefined)));
  const chains = disks.map((disk, i) => chooseChain(names[i]!, args.requested, { size: disk.size, baseProblem: checkpointProblem, addedDisk: true }, args.history));
  if (!/<domain\b/u.test(definition)) throw new ToolError('virsh', ['-q', 'dumpxml', domain, '--inactive'], 'it gave no domain XML');
  return { domain, disks, names, chains, checkpoint: bitmapName(args.repositoryId, args.backupId), existing: listed, definition: definition.trim() + '\n' };
}

/** Phase 2: the backup and checkpoint definitions libvirt's backup-begin takes, in the job's directory. */
async function writeJobFiles(plan: DomainBackupPlan, dir: string): Promise<JobFiles> {
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

/** How long a released job's end is waited for before its scratch files are removed anyway. */
const JOB_END_WAIT_MS = 10_000;

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
        // libvirt tears the job down after domjobabort returns; its scratch files must outlive that. The abort and
        // the first look at the job in one virsh; then a look 20 ms after each, each a virsh of its own, until
        // JOB_END_WAIT_MS have passed on the monotonic clock (a count of looks would add each virsh's own time).
        const deadline = performance.now() + JOB_END_WAIT_MS;
        let info = await virshBatch([['domjobabort', domain], ['domjobinfo', domain]], { tolerate: true }).then(({ outputs }) => outputs[1]!, () => '');
        while (/Job type:\s+(Unbounded|Bounded)/.test(info) && performance.now() < deadline) {
          await new Promise((resolve) => setTimeout(resolve, 20));
          info = await virsh(['domjobinfo', domain]).catch(() => '');
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
    const { chain, cbt, plan: diskPlan, workBytes } = await settleChain({
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
      countWork: true,
    });
    jobs.push({ name: plan.names[i]!, source, plan: diskPlan, mode: chain.mode, modeReason: chain.reason, parent: chain.parent?.record.id ?? null, cbt, workBytes });
  }
  return jobs;
}

/**
 * After the commit: the engine's checkpoints no chain needs any more are deleted, newest first, in one virsh. The
 * list is the one taken before the backup (no second checkpoint-list): a checkpoint another backup created since is
 * that backup's to keep or delete.
 */
async function deleteUnneededCheckpoints(plan: DomainBackupPlan, jobs: CbtDiskJob[], repositoryId: string): Promise<void> {
  const keep = new Set([plan.checkpoint, ...jobs.flatMap((j) => (j.cbt ? [j.cbt.chainCheckpoint] : []))]);
  // Newest first: deleting a checkpoint merges its bitmap into its parent checkpoint's.
  const unneeded = [...plan.existing].reverse().filter((name) => name.startsWith(bitmapPrefix(repositoryId)) && !keep.has(name));
  if (unneeded.length > 0) await virshBatch(unneeded.map((name) => ['checkpoint-delete', plan.domain, name]));
}
