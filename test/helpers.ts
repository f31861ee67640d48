/**
 * Shared test helpers: temporary directories, the real CLI as a child process, deterministic data,
 * byte comparison with the real `cmp`.
 */
import { expect } from 'vitest';
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, mkdtemp, open, readdir, readFile, rm, stat, statfs } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { SeededRandom, scanPack } from '../dist/engine/index.js';
import { FRAME_HEADER_SIZE, KIND_DATA } from '../dist/repo-format/constants.js';

export const ENGINE_BIN = fileURLToPath(new URL('../bin/engine.js', import.meta.url));

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

/** Runs `engine ARGS` as a separate process, exactly as a user would. */
export function runEngine(args: string[], options: { env?: Record<string, string>; cwd?: string } = {}): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      [ENGINE_BIN, ...args],
      { env: { ...process.env, ...options.env }, cwd: options.cwd, maxBuffer: 64 * 1024 * 1024 },
      (error, stdout, stderr) => {
        const code = error ? (typeof error.code === 'number' ? error.code : error.signal === 'SIGKILL' ? 137 : 1) : 0;
        resolve({ code, stdout, stderr });
      },
    );
  });
}

export function spawnEngine(args: string[], env: Record<string, string> = {}): ChildProcess {
  return spawn(process.execPath, [ENGINE_BIN, ...args], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
}

export function exitOf(child: ChildProcess): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  // The child may already have exited (its 'exit' event is then gone).
  if (child.exitCode !== null || child.signalCode !== null) return Promise.resolve({ code: child.exitCode, signal: child.signalCode });
  return new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal })));
}

let traces = 0;
/**
 * The engine with `args` under `strace -f -e trace=prctl` (which must start it; the engine's own failure is the
 * caller's to judge): its output, and how many worker_threads Workers the process started (Node names each one's
 * thread "WorkerThread" with prctl). The trace goes in `dir`.
 */
export async function countingWorkers(args: string[], env: Record<string, string>, dir: string): Promise<{ stdout: string; stderr: string; workers: number }> {
  const trace = join(dir, `strace-workers-${process.pid}-${++traces}`);
  const { stdout, stderr } = await new Promise<{ stdout: string; stderr: string }>((resolve, reject) =>
    execFile('strace', ['-f', '-qq', '-e', 'trace=prctl', '-o', trace, process.execPath, ENGINE_BIN, ...args], { env: { ...process.env, ...env } }, (error, out, err) =>
      error ? reject(new Error(`engine ${args[0]} under strace failed: ${err}`)) : resolve({ stdout: out, stderr: err }),
    ),
  );
  const names = [...(await readFile(trace, 'utf8')).matchAll(/PR_SET_NAME, "([^"]*)"/g)].map((match) => match[1]);
  await rm(trace);
  // The trace saw the threads at all: the main thread's name is set first.
  expect(names).toContain('MainThread');
  return { stdout, stderr, workers: names.filter((name) => name === 'WorkerThread').length };
}

/**
 * stderr without the progress lines a long command prints every 5 s when stderr is not a terminal (cli/progress.ts):
 * how many appear depends on the machine's speed, so a test that wants "no messages" must not count them.
 */
export function withoutProgress(stderr: string): string {
  return stderr
    .split('\n')
    .filter((line) => !/ \d+\.\d% (\S+ \S+\/s )?ETA (--:--|(\d+:)?\d{2}:\d{2})$/.test(line))
    .join('\n');
}

/**
 * stderr without the notice of an interrupted command whose clean-up outlasts its delay (cli/interrupt.ts:
 * "engine: SIGINT: stopping; releasing the lock …"): on a loaded machine it comes, rightly, before the final
 * line (never after it: test/interrupt.test.ts checks that and its wording), and tests of the final line drop it.
 */
export function withoutStopNotice(stderr: string): string {
  return stderr.replace(/^engine: (SIGINT|SIGTERM): stopping; [^\n]*\n/gm, '');
}

export async function tempDir(prefix = 'engine-test-'): Promise<{ path: string; cleanup: () => Promise<void> }> {
  const path = await mkdtemp(join(tmpdir(), prefix));
  return { path, cleanup: () => rm(path, { recursive: true, force: true }) };
}

/** Runs a system command; rejects with its stderr when it fails. */
export function sh(command: string, args: string[]): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(command, args, { maxBuffer: 64 * 1024 * 1024 }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${command} ${args.join(' ')} failed: ${stderr || error.message}`));
      else resolve(stdout);
    });
  });
}

/** Files from this size on are compared by `qemu-img compare` (see filesIdentical). */
const SPARSE_COMPARE_FROM = 256 * 1024 * 1024;

/**
 * Whether two files are identical byte for byte and of the same length. `cmp` reads every byte, holes
 * included: for two sparse 5 GiB files that is 10 GiB of zero-filled pages and 10-60 s of kernel time.
 * From SPARSE_COMPARE_FROM on, once the lengths are known to be equal, `qemu-img compare` on the two raw
 * files answers the same question: it finds the holes with SEEK_DATA and compares every other byte
 * (without -s, a hole and written zeros are equal content, as for cmp; a partial last sector is padded
 * with zeros in both files alike). -U: a running qemu may hold one of them open.
 */
export async function filesIdentical(a: string, b: string): Promise<boolean> {
  const [statA, statB] = await Promise.all([stat(a).catch(() => undefined), stat(b).catch(() => undefined)]);
  const bothFiles = statA !== undefined && statB !== undefined && statA.isFile() && statB.isFile();
  if (bothFiles && statA.size !== statB.size) return false;
  const sparse = bothFiles && statA.size >= SPARSE_COMPARE_FROM;
  const [command, args]: [string, string[]] = sparse ? ['qemu-img', ['compare', '-q', '-U', '-f', 'raw', '-F', 'raw', a, b]] : ['cmp', ['--silent', a, b]];
  return new Promise((resolve) => {
    execFile(command, args, (error) => resolve(error === null));
  });
}

/** Compares the first `length` bytes of two files with `cmp -n`. */
export async function prefixIdentical(a: string, b: string, length: number): Promise<boolean> {
  return new Promise((resolve) => {
    execFile('cmp', ['--silent', '-n', String(length), a, b], (error) => resolve(error === null));
  });
}

export async function sha256File(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path, { highWaterMark: 4 * 1024 * 1024 })) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

export type Fill = 'random' | 'zero' | 'text' | 'repeat';

/** Writes `length` bytes of one kind of content at `offset` (creating or extending the file). */
export async function writeRegion(path: string, offset: number, length: number, fill: Fill, seed = 'x'): Promise<void> {
  const handle = await open(path, 'a+').then(async (h) => {
    await h.close();
    return open(path, 'r+');
  });
  try {
    const random = new SeededRandom(`${seed}/${offset}`);
    const step = 4 * 1024 * 1024;
    const pattern = random.bytes(64 * 1024);
    for (let at = 0; at < length; at += step) {
      const n = Math.min(step, length - at);
      let data: Buffer;
      if (fill === 'random') data = random.bytes(n);
      else if (fill === 'zero') data = Buffer.alloc(n);
      else if (fill === 'repeat') data = Buffer.alloc(n, pattern);
      else data = Buffer.from(Array.from({ length: Math.ceil(n / 16) }, (_, i) => `line ${(offset + at) / 16 + i} ok\n`.padEnd(16, '.')).join('').slice(0, n), 'latin1');
      await handle.write(data, 0, n, offset + at);
    }
  } finally {
    await handle.close();
  }
}

/** Creates a sparse file of `size` bytes (all holes). */
export async function sparseFile(path: string, size: number): Promise<void> {
  const handle = await open(path, 'w');
  await handle.truncate(size);
  await handle.close();
}

/** Flips the bits `mask` of the byte at `at` of the file at `path`. */
export async function flipByte(path: string, at: number, mask = 0x10): Promise<void> {
  const handle = await open(path, 'r+');
  try {
    const byte = Buffer.alloc(1);
    await handle.read(byte, 0, 1, at);
    byte[0] = byte[0]! ^ mask;
    await handle.write(byte, 0, 1, at);
  } finally {
    await handle.close();
  }
}

/**
 * Damages the first data frame (packs in name order) of `repo`: one payload byte flipped, 1000 bytes into the
 * payload, so the frame's header and the pack's frame chain still parse and only its checksum disagrees.
 */
export async function damageFirstDataFrame(repo: string, encrypted = false): Promise<{ pack: string; offset: number }> {
  for (const sub of (await readdir(join(repo, 'packs'))).sort()) {
    for (const pack of (await readdir(join(repo, 'packs', sub))).sort()) {
      const frame = (await scanPack(repo, pack, encrypted)).frames.find((f) => f.header.kind === KIND_DATA);
      if (!frame) continue;
      await flipByte(join(repo, 'packs', sub, pack), frame.offset + FRAME_HEADER_SIZE + 1000);
      return { pack, offset: frame.offset };
    }
  }
  throw new Error(`no data frame in ${repo}`);
}

export function parseJson<T>(text: string): T {
  return JSON.parse(text) as T;
}

export interface BackupJson {
  id: string;
  type: string;
  name: string;
  blockSize: number;
  disks: { name: string; size: number; bytesRead: number; bytesNew: number; bytesStored: number; blocksNew: number; blocksZero: number; blocksDeduplicated: number; blocksUnchanged: number; blocksTotal: number; mode?: string; modeReason?: string; parent?: string | null; checkpoint?: string }[];
}

/**
 * `engine backup --repo REPO ARGS --json`, which must succeed; its record. `quiet`: it must print no message
 * either (the progress lines a long backup prints on a non-terminal aside).
 */
export async function backUp(repo: string, args: string[], options: { env?: Record<string, string>; quiet?: boolean } = {}): Promise<BackupJson> {
  const result = await runEngine(['backup', '--repo', repo, ...args, '--json'], { env: options.env });
  if (options.quiet) expect(withoutProgress(result.stderr)).toBe('');
  expect(result.code).toBe(0);
  return parseJson<BackupJson>(result.stdout);
}

/** `engine init REPO`, which must succeed. */
export async function initRepository(repo: string, args: string[] = []): Promise<void> {
  expect((await runEngine(['init', repo, ...args])).code).toBe(0);
}

/** A repository folder's config: its format version and id. */
export async function repositoryConfig(repo: string): Promise<{ version: number; id: string }> {
  return JSON.parse(await readFile(join(repo, 'config'), 'utf8')) as { version: number; id: string };
}

/**
 * This host's cache folder of a version-3 repository (SPEC.md 19.4: `$ENGINE_CACHE_DIR/<repository id>`;
 * the test run's ENGINE_CACHE_DIR unless a test gives its own), or undefined for versions 1 and 2.
 */
export async function hostCacheOf(repo: string, cacheDir = process.env.ENGINE_CACHE_DIR): Promise<string | undefined> {
  const config = await repositoryConfig(repo);
  if (config.version < 3) return undefined;
  if (cacheDir === undefined) throw new Error(`${repo} is of version 3 and ENGINE_CACHE_DIR is not set: its host cache folder is unknown`);
  return join(cacheDir, config.id);
}

/**
 * What a version-3 command left in this host's cache folder of `repo` beside the slots (LevelDB, kept for the
 * next process): a slot's temporary folder (`<slot>.tmp/`) goes with its process (SPEC.md 19.4); `journal/`
 * appears with an oVirt run's first journal.
 */
export async function hostCacheLeftovers(repo: string, cacheDir = process.env.ENGINE_CACHE_DIR): Promise<string[]> {
  const hostCache = await hostCacheOf(repo, cacheDir);
  if (hostCache === undefined) throw new Error(`${repo} is not of version 3: it has no host cache folder`);
  return (await readdir(hostCache)).filter((name) => !/^slot-\d+$/.test(name));
}

/**
 * Where the journals of oVirt runs into a repository folder are (SPEC.md 12.1): its `journal/` in versions 1
 * and 2, this host's cache folder of it in version 3 (19.4).
 */
export async function journalDir(repo: string, cacheDir = process.env.ENGINE_CACHE_DIR): Promise<string> {
  return join((await hostCacheOf(repo, cacheDir)) ?? repo, 'journal');
}

/** Waits until a child stopped itself (SIGSTOP at ENGINE_STOP_AT): state T in /proc. */
export async function stoppedItself(child: ChildProcess): Promise<void> {
  // No budget of its own: on a machine under load 20-50 a CLI takes tens of seconds to reach its point, and
  // the event (stopped, or exited) always comes; the test's timeout bounds the wait.
  for (;;) {
    const stat = await readFile(`/proc/${child.pid}/stat`, 'utf8').catch(() => '');
    if (stat.split(') ')[1]?.startsWith('T')) return;
    if (child.exitCode !== null || child.signalCode !== null) throw new Error(`the child exited (${child.exitCode ?? child.signalCode}) before stopping`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/**
 * Waits until `condition` holds, looking every `everyMs`. No budget of its own: any fixed one (2 s, 10 s, 30 s)
 * is too short on a CI machine under load 20-50, and the event always comes unless something is wrong, which
 * the test's timeout reports. With `child`, it fails at once, with the child's output, if the child exits first.
 */
export async function waitFor(what: string, condition: () => boolean | Promise<boolean>, options: { child?: ChildProcess; output?: () => string; everyMs?: number } = {}): Promise<void> {
  for (;;) {
    if (await condition()) return;
    const { child } = options;
    if (child && (child.exitCode !== null || child.signalCode !== null)) throw new Error(`${what}: the process exited (${child.exitCode ?? child.signalCode}) before: ${options.output?.() ?? ''}`);
    await new Promise((resolve) => setTimeout(resolve, options.everyMs ?? 25));
  }
}

/** Resumes a child stopped at ENGINE_STOP_AT, and again each time it stops there again (a later pack), until it exits. */
export async function continueUntilExit(child: ChildProcess): Promise<number> {
  const exited = exitOf(child);
  child.kill('SIGCONT');
  for (;;) {
    const settled = await Promise.race([exited.then(() => 'exited' as const), stoppedItself(child).then(() => 'stopped' as const, () => 'exited' as const)]);
    if (settled === 'exited') break;
    child.kill('SIGCONT');
  }
  return (await exited).code ?? -1;
}

/** Collects a child's stdout and stderr as they come. */
export function collectOutput(child: ChildProcess): { stderr: () => string; stdout: () => string } {
  let stderr = '';
  let stdout = '';
  child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  return { stderr: () => stderr, stdout: () => stdout };
}

/**
 * Sends `signals` to a child stopped at an ENGINE_STOP_AT point and lets it run until it exits: a point
 * reached once per item (a pack, prune's removal) may be reached again before the signal is seen, and each
 * such stop is continued.
 */
export async function signalUntilExit(child: ChildProcess, signals: NodeJS.Signals[] = ['SIGINT']): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  for (const signal of signals) child.kill(signal);
  child.kill('SIGCONT');
  const exited = exitOf(child);
  for (;;) {
    const settled = await Promise.race([exited.then(() => 'exited' as const), stoppedItself(child).then(() => 'stopped' as const, () => 'exited' as const)]);
    if (settled === 'exited') return exited;
    child.kill('SIGCONT');
  }
}

/** Resumes a child stopped by ENGINE_STOP_AT and returns its exit code and the JSON it printed. */
export async function resumedJson<T>(child: ChildProcess): Promise<{ code: number | null; json: T }> {
  let stdout = '';
  child.stdout!.on('data', (chunk: Buffer) => (stdout += chunk.toString()));
  child.kill('SIGCONT');
  const { code } = await exitOf(child);
  return { code, json: parseJson<T>(stdout) };
}

/**
 * A small tmpfs (a real filesystem that really fills up) and a filler file that takes all of its free
 * space but `leave` bytes; tmpfs allocates whole pages, deterministically, and keeps nothing in reserve.
 */
export class Tmpfs {
  private constructor(readonly path: string) {}

  static async mount(path: string, megabytes: number): Promise<Tmpfs> {
    await mkdir(path, { recursive: true });
    await sh('mount', ['-t', 'tmpfs', '-o', `size=${megabytes}m`, 'tmpfs', path]);
    return new Tmpfs(path);
  }

  get filler(): string {
    return join(this.path, 'filler');
  }

  async freeBytes(): Promise<number> {
    const stats = await statfs(this.path);
    return stats.bavail * stats.bsize;
  }

  /** Fills the filesystem until `leave` bytes are free (0: completely). */
  async fill(leave = 0): Promise<void> {
    await this.unfill();
    const size = (await this.freeBytes()) - leave;
    if (size > 0) await sh('fallocate', ['-l', String(size), this.filler]);
  }

  async unfill(): Promise<void> {
    await rm(this.filler, { force: true });
  }

  async unmount(): Promise<void> {
    await sh('umount', [this.path]).catch(() => undefined);
    await rm(this.path, { recursive: true, force: true }).catch(() => undefined);
  }
}

/**
 * Restores a backup (one disk with `disk`) through the CLI into a scratch file under `dir`, asserts a clean
 * exit and content byte-identical to `expected` (cmp), and removes the file.
 */
export async function expectRestoreIdentical(repo: string, id: string, expected: string, options: { dir: string; disk?: string; env?: Record<string, string> }): Promise<void> {
  const target = join(options.dir, `restore-${id.slice(0, 8)}-${options.disk ?? 'disk'}-${randomBytes(3).toString('hex')}.raw`);
  const result = await runEngine(['restore', '--repo', repo, id, ...(options.disk === undefined ? [] : ['--disk', options.disk]), '--to', target], { env: options.env });
  expect(withoutProgress(result.stderr)).toBe('');
  expect(result.code).toBe(0);
  expect(await filesIdentical(target, expected)).toBe(true);
  await rm(target, { force: true });
}

/**
 * Reads the export's bytes [offset, offset + out.length) into `out` through a copy-on-write overlay, block by block:
 * `out` holds the backup's bytes on entry, and every byte the overlay holds replaces them.
 */
export async function readThroughOverlay(overlay: { readInto(block: number, at: number, target: Buffer): Promise<unknown> }, blockSize: number, offset: number, out: Buffer): Promise<Buffer> {
  for (let at = offset; at < offset + out.length; ) {
    const block = Math.floor(at / blockSize);
    const upTo = Math.min(offset + out.length, (block + 1) * blockSize);
    await overlay.readInto(block, at - block * blockSize, out.subarray(at - offset, upTo - offset));
    at = upTo;
  }
  return out;
}

/**
 * The host's loop devices are shared by every test file that attaches one (losetup, mount -o loop, engine mount,
 * test/guest/build-files-disks.sh): with two of them at it at once, one was seen to find "its" fresh device
 * mounted or "in use by the system" (restore-guard beside mount, in a clean clone). Each holds this lock (flock on
 * one file, the one the disk builder takes) while its loop devices exist; the returned function lets it go.
 */
export async function holdLoopDeviceLock(): Promise<() => Promise<void>> {
  const holder = spawn('flock', ['/run/lock/engine-test-loop-devices.lock', 'sh', '-c', 'echo locked; exec cat'], { stdio: ['pipe', 'pipe', 'ignore'] });
  await new Promise<void>((resolve, reject) => {
    holder.stdout!.once('data', () => resolve());
    holder.once('exit', (code) => reject(new Error(`flock exited (${code}) before it held the lock`)));
  });
  return async () => {
    holder.stdin!.end();
    await exitOf(holder);
  };
}
