/**
 * What every benchmark script needs: arguments, logging, running tools (optionally under /usr/bin/time for
 * CPU time and peak RSS), installing a peer from Debian when missing, sizing a directory, the machine line.
 */
import { execFile } from 'node:child_process';
import { mkdtemp, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { cpus, tmpdir, totalmem } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { formatBytes } from '../engine/index.js';

/**
 * The `engine` command as users run it: bin/engine, which picks the project's Node and sets glibc's malloc
 * tunables (measured there: restore CPU -7%); `node bin/engine.js` would measure an engine no user runs.
 */
export const ENGINE = fileURLToPath(new URL('../../bin/engine', import.meta.url));

/**
 * This run's own host index cache (format 3, SPEC.md 19.4), set as ENGINE_CACHE_DIR for every engine the
 * bench starts and for its own API calls: as root the default, /var/cache/engine, would keep a cache of
 * every repository the bench made and then deleted. `remove` deletes it (call it in the bench's finally).
 */
export async function privateEngineCache(): Promise<{ dir: string; remove: () => Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), 'engine-bench-cache-'));
  process.env.ENGINE_CACHE_DIR = dir;
  return { dir, remove: () => rm(dir, { recursive: true, force: true }) };
}

/** `engine init` of a repository (the default format unless `options` name one); the format version it created. */
export async function initRepository(repo: string, options: string[] = [], env: Record<string, string> = {}): Promise<number> {
  const { stdout } = await run(ENGINE, ['init', repo, ...options, '--json'], env);
  return (JSON.parse(stdout) as { version: number }).version;
}
export const MB = 1e6;

export function arg(name: string): string | undefined {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : undefined;
}

export function logger(tag: string): (message: string) => void {
  return (message) => process.stderr.write(`[${tag} ${new Date().toISOString().slice(11, 19)}] ${message}\n`);
}

export function machineLine(): string {
  return `${cpus()[0]?.model ?? 'unknown CPU'}, ${cpus().length} cores, ${formatBytes(totalmem())} RAM, Node ${process.version}`;
}

/** Runs a command; resolves with stdout and the wall time, rejects with the tail of stderr. */
export function run(command: string, args: string[], env: Record<string, string> = {}): Promise<{ stdout: string; seconds: number }> {
  const started = performance.now();
  return new Promise((resolve, reject) => {
    execFile(command, args, { maxBuffer: 256 * 1024 * 1024, env: { ...process.env, ...env } }, (error, stdout, stderr) => {
      if (error) reject(new Error(`${command} ${args.join(' ')}: ${(stderr || error.message).trim().split('\n').slice(-3).join(' ')}`));
      else resolve({ stdout, seconds: (performance.now() - started) / 1000 });
    });
  });
}

export async function sh(command: string, args: string[], env: Record<string, string> = {}): Promise<string> {
  return (await run(command, args, env)).stdout;
}

export interface Measured {
  seconds: number;
  cpuSeconds: number;
  /** The two halves of cpuSeconds, user and system CPU-seconds (timed() gives them; a sum of several runs may not). */
  userSeconds?: number;
  systemSeconds?: number;
  peakRssMiB: number;
  stdout: string;
  /** The 1-, 5- and 15-minute load averages just before the run (coldTimed gives them). */
  load?: string;
}

let timingFile = 0;

/**
 * `sync; echo 3 > /proc/sys/vm/drop_caches` (root only): a timed backup, restore or verify starts with a cold
 * page cache, as a backup of a disk snapshot does; a page cache warm from the step before would hide its reads.
 */
export async function dropCaches(): Promise<void> {
  await run('sync', []);
  await writeFile('/proc/sys/vm/drop_caches', '3\n').catch((error: unknown) => {
    throw new Error(`cannot drop the page cache (${(error as Error).message}): the benches time every backup, restore and verify cold, which needs root`);
  });
}

/** The 1-, 5- and 15-minute load averages, as /proc/loadavg gives them. */
export async function loadAverage(): Promise<string> {
  return (await readFile('/proc/loadavg', 'utf8')).split(' ').slice(0, 3).join(' ');
}

/**
 * Runs a command under /usr/bin/time: wall seconds, user+sys CPU of it and its children, peak RSS of the
 * largest process (GNU time's %M), and its stdout.
 */
export async function timed(command: string, args: string[], env: Record<string, string> = {}): Promise<Measured> {
  const output = join(tmpdir(), `bench-time-${process.pid}-${(timingFile += 1)}`);
  try {
    const { stdout } = await run('/usr/bin/time', ['-f', '%e %U %S %M', '-o', output, command, ...args], env);
    const [e, u, s, m] = (await readFile(output, 'utf8')).trim().split('\n').pop()!.split(/\s+/).map(Number);
    return { seconds: e!, cpuSeconds: u! + s!, userSeconds: u!, systemSeconds: s!, peakRssMiB: m! / 1024, stdout };
  } finally {
    await rm(output, { force: true });
  }
}

/** timed(), after `sync` and with the page cache dropped (dropCaches): the step reads its disk or repository cold. */
export async function coldTimed(command: string, args: string[], env: Record<string, string> = {}): Promise<Measured> {
  await dropCaches();
  const load = await loadAverage();
  return { ...(await timed(command, args, env)), load };
}

export async function available(command: string): Promise<boolean> {
  return run('which', [command]).then(() => true, () => false);
}

/** Installs a Debian package when its command is missing (root only); a reason when that is not possible. */
export async function ensure(command: string, pkg: string): Promise<string | true> {
  if (await available(command)) return true;
  if (process.getuid?.() !== 0) return `${command} is not installed and this is not root (apt-get install ${pkg})`;
  try {
    await run('apt-get', ['install', '-y', '-qq', '--no-install-recommends', pkg], { DEBIAN_FRONTEND: 'noninteractive' });
  } catch (error) {
    return `apt-get install ${pkg} failed: ${(error as Error).message}`;
  }
  return (await available(command)) ? true : `${pkg} installed no ${command}`;
}

/** Bytes of the files under `path` (apparent sizes: what the repository holds). */
export async function duBytes(path: string): Promise<number> {
  const info = await stat(path);
  if (!info.isDirectory()) return info.size;
  let total = 0;
  for (const name of await readdir(path)) total += await duBytes(join(path, name));
  return total;
}
