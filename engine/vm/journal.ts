/**
 * What a run that starts VMs left behind when it was killed (-9, a crash, the host's OOM killer): each run
 * works in a private folder of its own, `<run dir>/vms/<run id>/` ($ENGINE_RUN_DIR, /run/engine by
 * default), holding its sockets, the console file and `state.json`: who runs it (pid and process identity,
 * process.ts) and, as soon as each exists, the QEMU process it started and what it holds in a repository
 * (a reader registration, a version-3 lease). The overlays need no entry: they are unlinked while open
 * (serve/overlay.ts) and go with the process. Every new run (`verify --boot`, `files`: one folder for all)
 * first cleans up after the dead ones: stops their QEMU if it still runs (it dies with the engine,
 * pdeathsig in qemu.ts, but the kernel cannot arm that before QEMU's own setpriv runs: an engine killed in
 * that instant leaves it; stopped only while the pid is still that process), lets go of their registration
 * or lease, and removes their folder. A live run's folder is never touched.
 */
import { randomBytes } from 'node:crypto';
import { readdir, readFile, rename, rm, unlink, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { ensurePrivateDirectory, createPrivateDirectory, MUTABLE_FILE_MODE } from '../../repo-format/file-modes.js';
import { isProcessAlive, processIdentity } from '../../repo-format/process-alive.js';
import { removeDeadProcessLease } from '../../repo-format/v3/dead-lease.js';
import { stopProcess } from '../host/process.js';

export interface VmRunState {
  version: 1;
  runId: string;
  /** What the run is (`verify --boot`, `files ls`), for a person reading the folder. */
  purpose: string;
  created: string;
  owner: { pid: number; identity: string | undefined };
  vm: { pid: number; identity: string | undefined } | null;
  /** The repository the run reads, and what it holds there while it runs. */
  repo: string | null;
  readerToken: string | null;
  lease: string | null;
}

export interface CleanedRun {
  runId: string;
  purpose: string;
  /** Whether a VM of the dead run was still running (and was stopped). */
  stoppedVm: boolean;
}

/** What a run says of a dead run it cleaned up after (on stderr: `verify --boot`'s log, `files`' notices). */
export function cleanedNotice(run: CleanedRun): string {
  return `cleaned up after run ${run.runId} (${run.purpose}), which was killed${run.stoppedVm ? ': stopped its VM' : ''}`;
}

export function runDirOf(runDir?: string): string {
  return runDir ?? process.env.ENGINE_RUN_DIR ?? '/run/engine';
}

export class VmRunJournal {
  private constructor(
    readonly dir: string,
    private readonly state: VmRunState,
  ) {}

  /** A new run's folder and journal; the dead runs' leftovers are cleaned up first (returned, for a notice). */
  static async begin(purpose: string, options: { runDir?: string | undefined; repo?: string | undefined } = {}): Promise<{ journal: VmRunJournal; cleaned: CleanedRun[] }> {
    const root = join(runDirOf(options.runDir), 'vms');
    await ensurePrivateDirectory(runDirOf(options.runDir));
    await ensurePrivateDirectory(root);
    const cleaned = await cleanDeadRuns(root);
    const runId = `${new Date().toISOString().replace(/[-:.]/g, '').slice(0, 15)}-${randomBytes(4).toString('hex')}`;
    const dir = join(root, runId);
    await createPrivateDirectory(dir);
    const state: VmRunState = { version: 1, runId, purpose, created: new Date().toISOString(), owner: { pid: process.pid, identity: processIdentity(process.pid) }, vm: null, repo: options.repo ?? null, readerToken: null, lease: null };
    const journal = new VmRunJournal(dir, state);
    await journal.save();
    return { journal, cleaned };
  }

  get runId(): string {
    return this.state.runId;
  }

  async update(change: Partial<Pick<VmRunState, 'vm' | 'readerToken' | 'lease'>>): Promise<void> {
    Object.assign(this.state, change);
    await this.save();
  }

  /** The run is over and everything it started is gone: its folder goes too. */
  async end(): Promise<void> {
    await rm(this.dir, { recursive: true, force: true });
  }

  private async save(): Promise<void> {
    const path = join(this.dir, 'state.json');
    await writeFile(`${path}.tmp`, `${JSON.stringify(this.state, null, 2)}\n`, { mode: MUTABLE_FILE_MODE });
    await rename(`${path}.tmp`, path);
  }
}

/** Whether the run that wrote `state` is over: its pid runs nothing, or another process (a reused pid). */
function ownerDead(state: VmRunState): boolean {
  if (state.owner.pid === process.pid) return false;
  if (!isProcessAlive(state.owner.pid)) return true;
  const now = processIdentity(state.owner.pid);
  return state.owner.identity !== undefined && now !== undefined && now !== state.owner.identity;
}

/**
 * The dead runs' leftovers cleaned up now, not at the next run's start: for a command that ends what another
 * process ran (`engine umount` of a `mount --vm` whose process was killed).
 */
export function cleanUpDeadVmRuns(options: { runDir?: string | undefined } = {}): Promise<CleanedRun[]> {
  return cleanDeadRuns(join(runDirOf(options.runDir), 'vms'));
}

async function cleanDeadRuns(root: string): Promise<CleanedRun[]> {
  const cleaned: CleanedRun[] = [];
  for (const name of await readdir(root).catch(() => [] as string[])) {
    const dir = join(root, name);
    const text = await readFile(join(dir, 'state.json'), 'utf8').catch(() => undefined);
    let state: VmRunState | undefined;
    try {
      state = text === undefined ? undefined : (JSON.parse(text) as VmRunState);
    } catch {
      state = undefined;
    }
    // A folder without a readable journal: a run killed between creating its folder and its first save
    // (nothing started yet), or not ours; left alone unless it is plainly a run's.
    if (!state || state.version !== 1 || typeof state.owner?.pid !== 'number') {
      if (/^\d{8}T\d{6}-[0-9a-f]{8}$/.test(name) && text === undefined) await rm(dir, { recursive: true, force: true });
      continue;
    }
    if (!ownerDead(state)) continue;
    let stoppedVm = false;
    if (state.vm) stoppedVm = await stopProcess(state.vm.pid, 2000, state.vm.identity ?? 'unknown').catch(() => false);
    if (state.repo !== null && state.readerToken && /^[0-9a-f]{16}$/.test(state.readerToken)) await unlink(join(state.repo, 'readers', `${state.readerToken}.json`)).catch(() => undefined);
    if (state.repo !== null && state.lease && /^leases\/[0-9a-f]{32}\.json$/.test(state.lease)) await removeDeadProcessLease(state.repo, state.lease).catch(() => undefined);
    await rm(dir, { recursive: true, force: true });
    cleaned.push({ runId: state.runId, purpose: state.purpose, stoppedVm });
  }
  return cleaned;
}
