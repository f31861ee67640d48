#!/usr/bin/env node
// The CLI lives in cli/main.ts, compiled to dist/ by `npm run build` (scripts/setup.sh runs it).
// `bin/engine` picks the runtime and starts this file; it can also be run as `node bin/engine.js`.
import { chmodSync, existsSync, lstatSync, mkdirSync, readFileSync, statSync } from 'node:fs';
// The namespace, not `{ enableCompileCache }`: a named import that the runtime lacks (Node 20, 22.0) fails at link
// time, before any line here runs, and the version check below could not say what is wrong.
import * as nodeModule from 'node:module';
import { homedir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';

const [major, minor] = process.versions.node.split('.').map(Number);
// node:zlib's zstd (repo-format/compression.ts imports it by name) exists from 22.15 and 23.8.
if (major < 22 || (major === 22 && minor < 15) || (major === 23 && minor < 8)) {
  process.stderr.write(
    `engine: needs Node.js 22.15 or later (23: 23.8 or later; 24 LTS recommended); this is ${process.version} at ${process.execPath}. ` +
      'Install the project with its optional dependencies (npm install), which brings Node 24 from the npm registry.\n',
  );
  process.exit(1);
}
// bin/engine tuned this process's malloc (glibc reads GLIBC_TUNABLES once, at start): what the engine runs gets the caller's own.
if (process.env.ENGINE_CALLER_GLIBC_TUNABLES !== undefined) {
  if (process.env.ENGINE_CALLER_GLIBC_TUNABLES === '') delete process.env.GLIBC_TUNABLES;
  else process.env.GLIBC_TUNABLES = process.env.ENGINE_CALLER_GLIBC_TUNABLES;
  delete process.env.ENGINE_CALLER_GLIBC_TUNABLES;
}
/**
 * For the tests and benches only, like ENGINE_CRASH_AT: ENGINE_TEST_CPU_LOG=FILE appends one JSON line to FILE when the
 * process exits: the command (argv[2..3]), its own CPU (process.cpuUsage: every thread's), the CPU of the children it
 * waited for (/proc/self/stat), peak RSS, wall ms since the process started; the wall ms and CPU ms by which this
 * launcher started, its entry was imported and the command's action began (the mark cli/main.ts sets); and the
 * worker threads it started.
 * What a suite's thousands of engine processes spend, by command, is then a sum over FILE (scripts/cpu-log.mjs).
 * A process killed by a signal (the kill -9 tests) writes no line.
 */
async function cpuLog(file) {
  const { appendFileSync } = await import('node:fs');
  const { subscribe } = await import('node:diagnostics_channel');
  const { performance } = await import('node:perf_hooks');
  const launcher = performance.now();
  const launcherCpu = process.cpuUsage();
  let workers = 0;
  subscribe('worker_threads', () => workers++);
  process.on('exit', (code) => {
    const cpu = process.cpuUsage();
    const usage = process.resourceUsage();
    let children = null;
    try {
      // Fields 16 and 17 (cutime, cstime), after the command name in parentheses, in clock ticks (100 Hz).
      const fields = readFileSync('/proc/self/stat', 'utf8').replace(/^.*\) /, '').split(' ');
      children = (Number(fields[13]) + Number(fields[14])) / 100;
    } catch {}
    const mark = (name) => performance.getEntriesByName(name, 'mark')[0]?.startTime ?? null;
    const actionCpu = performance.getEntriesByName('engine:action', 'mark')[0]?.detail;
    const entryCpu = performance.getEntriesByName('engine:entry', 'mark')[0]?.detail;
    const ms = (usage) => (usage ? (usage.user + usage.system) / 1000 : null);
    const line = {
      pid: process.pid,
      argv: process.argv.slice(2, 4),
      code,
      userMs: cpu.user / 1000,
      systemMs: cpu.system / 1000,
      childrenS: children,
      maxRssKiB: usage.maxRSS,
      wallMs: performance.now(),
      launcherMs: launcher,
      launcherCpuMs: ms(launcherCpu),
      entryMs: mark('engine:entry'),
      entryCpuMs: ms(entryCpu),
      actionMs: mark('engine:action'),
      actionCpuMs: ms(actionCpu),
      workers,
    };
    try {
      appendFileSync(file, `${JSON.stringify(line)}\n`);
    } catch {}
  });
}
if (process.env.ENGINE_TEST_CPU_LOG) await cpuLog(process.env.ENGINE_TEST_CPU_LOG);
/**
 * Node's compile cache: V8's compiled code of dist/ kept between runs, so that each command does not parse and
 * compile its ~150 modules again (measured, paired medians on the loaded 2-core machine: a restore of a 64 MiB disk
 * 0.338 -> 0.311 and 0.374 -> 0.352 CPU-s, a backup of it 0.438 -> 0.422, `--version` 0.086 -> 0.081).
 * It holds code this process will run, so it lives where only this user can write: the host cache folder of
 * SPEC.md 19.4 ($ENGINE_CACHE_DIR, /var/cache/engine for root, else $XDG_CACHE_HOME/engine or ~/.cache/engine),
 * in node-compile-cache/, created 0700; a folder owned by someone else, open to others, or a symlink is not used,
 * nor one under a parent others may write to (not sticky). Node's own settings win: NODE_COMPILE_CACHE names
 * another folder, NODE_DISABLE_COMPILE_CACHE=1 turns it off. Any failure only means no cache.
 */
function privateCompileCache() {
  const env = process.env;
  if (env.NODE_COMPILE_CACHE || env.NODE_DISABLE_COMPILE_CACHE) return undefined;
  const uid = process.getuid?.();
  if (uid === undefined) return undefined;
  const root = env.ENGINE_CACHE_DIR || (uid === 0 ? '/var/cache/engine' : join(env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'engine'));
  const dir = resolve(root, 'node-compile-cache');
  try {
    const first = mkdirSync(dir, { recursive: true, mode: 0o700 });
    if (first !== undefined) for (let d = dir; ; d = dirname(d)) { chmodSync(d, 0o700); if (d === resolve(first)) break; }
    const own = lstatSync(dir);
    if (!own.isDirectory() || own.uid !== uid || (own.mode & 0o077) !== 0) return undefined;
    const parent = lstatSync(dirname(dir));
    if (!parent.isDirectory() || (parent.uid !== uid && parent.uid !== 0) || ((parent.mode & 0o022) !== 0 && (parent.mode & 0o1000) === 0)) return undefined;
    return dir;
  } catch {
    return undefined;
  }
}
const compileCache = privateCompileCache();
if (compileCache !== undefined) {
  nodeModule.enableCompileCache(compileCache);
  // The block workers (threads) read the variable when they start.
  process.env.NODE_COMPILE_CACHE = compileCache;
}
/**
 * The bundle (dist/bundle/, scripts/bundle.mjs: tsc's output in a few files, its lazy parts still lazy) while every
 * module of dist/ it was made from is as it was then (dist/bundle/inputs.json: size and mtime of each; also of the
 * LevelDB packages it took in, as ../node_modules/...), else tsc's output itself: a `tsc`, or a `tsc --watch`
 * rewriting one module, after the bundle step never runs stale code, only slower; nor an `npm install` that changed
 * classic-level its old JavaScript with the new addon. The check is one small JSON file and a stat per module (~230): measured in the launcher, ~2 ms CPU against
 * ~0.4 for the two stats it replaced, next to the bundle's ~x0.8-0.9 CPU per command (bench/fixed-costs.ts, paired;
 * --version saves ~7-11 ms). ENGINE_NO_BUNDLE=1 runs tsc's output (a bench's baseline, a debugger).
 */
function entryFile() {
  const plain = new URL('../dist/cli/main.js', import.meta.url);
  if (process.env.ENGINE_NO_BUNDLE === '1') return plain;
  const dist = fileURLToPath(new URL('../dist/', import.meta.url));
  try {
    const { modules } = JSON.parse(readFileSync(join(dist, 'bundle', 'inputs.json'), 'utf8'));
    if (!Array.isArray(modules) || modules.length === 0) return plain;
    for (const [path, size, mtimeMs] of modules) {
      // `dist + path`, no options: join() and the options' checks, cold, cost more than the stats themselves.
      const now = statSync(dist + path);
      if (now.size !== size || now.mtimeMs !== mtimeMs) return plain;
    }
    return new URL('../dist/bundle/main.js', import.meta.url);
  } catch {
    // No bundle, one cut short or from before inputs.json, a module gone (or no build at all): tsc's output.
    return plain;
  }
}
const entry = entryFile();
// --debug prints stack traces: through the source maps they name the TypeScript sources, not the bundle's chunks.
if (process.argv.includes('--debug')) process.setSourceMapsEnabled(true);
if (!existsSync(entry)) {
  process.stderr.write('engine: not built yet; run `npm run build` (or `bash scripts/setup.sh`) in the project root\n');
  process.exit(1);
}
if (process.env.ENGINE_TEST_CPU_LOG) performance.mark('engine:entry', { detail: process.cpuUsage() });
await import(entry.href);
