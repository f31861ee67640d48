/**
 * Everything the engine creates is private to its owner whatever the umask (SPEC.md, section 2.1):
 * directories 0700, files written once 0400, files changed in place 0600. Each command runs as its own
 * process under the umask given, exactly as a user's shell or a scheduler would start it.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { execFile } from 'node:child_process';
import { chmod, lstat, mkdir, readdir, stat } from 'node:fs/promises';
import { join, relative } from 'node:path';
import { ENGINE_BIN, parseJson, tempDir, writeRegion, type BackupJson, type RunResult, withoutProgress } from './helpers.js';

let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-modes-'));
});
afterAll(async () => {
  await cleanup();
});

/** Runs `engine ARGS` under a given umask (the shell sets it, then execs the CLI). */
function runWithUmask(umask: string, args: string[], env: Record<string, string> = {}): Promise<RunResult> {
  return runWithUmaskIn(umask, args, env);
}

function runWithUmaskIn(umask: string, args: string[], env: Record<string, string>): Promise<RunResult> {
  return new Promise((resolve) => {
    execFile('sh', ['-c', `umask ${umask} && exec "$0" "$@"`, process.execPath, ENGINE_BIN, ...args], { env: { ...process.env, ...env }, maxBuffer: 16 * 1024 * 1024 }, (error, stdout, stderr) => {
      resolve({ code: error ? (typeof error.code === 'number' ? error.code : 1) : 0, stdout, stderr });
    });
  });
}

async function ok(run: Promise<RunResult>): Promise<RunResult> {
  const result = await run;
  expect(withoutProgress(result.stderr)).toBe('');
  expect(result.code).toBe(0);
  return result;
}

/** Every entry under `root` with its permission bits, relative paths sorted. */
async function modes(root: string): Promise<Map<string, { mode: number; directory: boolean }>> {
  const found = new Map<string, { mode: number; directory: boolean }>();
  const visit = async (path: string): Promise<void> => {
    const s = await lstat(path);
    found.set(relative(root, path) || '.', { mode: s.mode & 0o7777, directory: s.isDirectory() });
    if (s.isDirectory()) for (const name of await readdir(path)) await visit(join(path, name));
  };
  await visit(root);
  return found;
}

/** What SPEC.md 2.1 says each repository path must have. */
function expectedRepositoryMode(path: string, directory: boolean): number {
  if (directory) return 0o700;
  if (path.startsWith('index/') || path.startsWith('journal/')) return 0o600;
  return 0o400;
}

/** Version 3 (SPEC.md 19.2): index/ holds segments, written once like every object (0400); no journal/ in the store. */
function expectedV3RepositoryMode(_path: string, directory: boolean): number {
  return directory ? 0o700 : 0o400;
}

/** A host cache folder of version 3 (SPEC.md 19.4): folders 0700, the host id and LevelDB's files 0600. */
function expectedHostCacheMode(_path: string, directory: boolean): number {
  return directory ? 0o700 : 0o600;
}

function mismatches(found: Map<string, { mode: number; directory: boolean }>, expected: (path: string, directory: boolean) => number): string[] {
  return [...found].filter(([path, e]) => e.mode !== expected(path, e.directory)).map(([path, e]) => `${path} ${e.mode.toString(8)} (want ${expected(path, e.directory).toString(8)})`);
}

describe('modes of what the engine creates', () => {
  for (const [format, umask] of [['1', '000'], ['1', '0277'], ['3', '000'], ['3', '0277']] as const) {
    test(`umask ${umask}: a version-${format} repository through init, backup, protect, gc, verify and repair; every kind of restore target`, async () => {
      const base = join(dir, `umask-${umask}-v${format}`);
      await mkdir(base);
      const repo = join(base, 'repo');
      const image = join(base, 'disk.img');
      // Version 3's host cache in a folder of this test's, to check its modes too.
      const cache = join(base, 'cache');
      const runWithUmask = (mask: string, args: string[], env: Record<string, string> = {}): Promise<RunResult> => runWithUmaskIn(mask, args, { ENGINE_CACHE_DIR: cache, ...env });
      await writeRegion(image, 0, 3 * 1024 * 1024 + 512, 'random', umask);
      await ok(runWithUmask(umask, ['init', '--format', format, repo, '--block-size', '64K']));
      const first = parseJson<BackupJson>((await ok(runWithUmask(umask, ['backup', '--repo', repo, '--source', image, '--name', 'vm', '--json']))).stdout);
      await writeRegion(image, 0, 64 * 1024, 'random', `${umask}-changed`);
      await ok(runWithUmask(umask, ['backup', '--repo', repo, '--source', image, '--source', image, '--disk-name', 'a', '--disk-name', 'b', '--name', 'vm', '--json']));
      await ok(runWithUmask(umask, ['protect', '--repo', repo, first.id, '--json']));
      await ok(runWithUmask(umask, ['prune', '--repo', repo, '--keep-last', '1', '--json']));
      await ok(runWithUmask(umask, ['gc', '--repo', repo, '--rewrite-below', '100%', '--json']));
      await ok(runWithUmask(umask, ['repair', '--repo', repo, '--json']));
      const verified = parseJson<{ ok: boolean; permissions: { loose: number } }>((await ok(runWithUmask(umask, ['verify', '--repo', repo, '--json']))).stdout);
      expect(verified.permissions.loose).toBe(0);

      const found = await modes(repo);
      expect([...found.keys()].some((p) => /^packs\/..\/[0-9a-f]{32}$/.test(p))).toBe(true);
      if (format === '1') {
        // The commands above created these (gc: writers/; protect: protected/; repair: quarantine/ is made only for damage).
        for (const path of ['.', 'packs', 'packs/00', 'packs/ff', 'backups', 'tmp', 'readers', 'writers', 'protected', 'index', 'index/CURRENT', 'config']) expect(found.has(path)).toBe(true);
        expect(mismatches(found, expectedRepositoryMode)).toEqual([]);
      } else {
        for (const path of ['.', 'packs', 'backups', 'protected', 'index', 'leases', 'config']) expect(found.has(path)).toBe(true);
        expect([...found.keys()].some((p) => /^index\/[0-9a-f]{32}-[0-9a-f]{8}$/.test(p))).toBe(true);
        expect(mismatches(found, expectedV3RepositoryMode)).toEqual([]);
        const cached = await modes(cache);
        expect([...cached.keys()].some((p) => /\/slot-0\/CURRENT$/.test(p))).toBe(true);
        expect(mismatches(cached, expectedHostCacheMode)).toEqual([]);
      }

      // Restore targets: a new raw file, a new directory of disks, a file inside an existing directory, a new qcow2 image.
      const latest = (await readdir(join(repo, 'backups'))).find((name) => name !== first.id)!;
      const targets = join(base, 'targets');
      await mkdir(targets);
      await ok(runWithUmask(umask, ['restore', '--repo', repo, first.id, '--to', join(targets, 'new.raw'), '--json']));
      await ok(runWithUmask(umask, ['restore', '--repo', repo, latest, '--to', join(targets, 'new-dir'), '--json']));
      await ok(runWithUmask(umask, ['restore', '--repo', repo, latest, '--disk', 'a', '--to-qcow2', join(targets, 'new.qcow2'), '--json']));
      expect(mismatches(await modes(targets), (path, directory) => (path === '.' ? 0o755 : directory ? 0o700 : 0o600)).filter((m) => !m.startsWith('. '))).toEqual([]);
      expect([...(await modes(targets)).keys()].sort()).toEqual(['.', 'new-dir', 'new-dir/a', 'new-dir/b', 'new.qcow2', 'new.raw']);

      // An encrypted repository: keys/ and its key file, written once.
      const encrypted = join(base, 'encrypted');
      await ok(runWithUmask(umask, ['init', '--format', format === '1' ? '2' : '3', encrypted, '--encrypt'], { ENGINE_PASSWORD: 'correct horse battery' }));
      const keys = await modes(join(encrypted, 'keys'));
      expect([...keys.values()].map((e) => e.mode).sort()).toEqual([0o400, 0o700]);
      expect(mismatches(await modes(encrypted), format === '1' ? expectedRepositoryMode : expectedV3RepositoryMode)).toEqual([]);
    });
  }

  test('the demo: its directory, images and repository', async () => {
    const demo = join(dir, 'demo');
    await ok(runWithUmask('000', ['demo', '--dir', demo, '--size', '3M']));
    const found = await modes(demo);
    expect(found.get('.')!.mode).toBe(0o700);
    expect(found.get('vm-disk.img')!.mode).toBe(0o600);
    // The demo's repository is of version 3, the default.
    expect(mismatches(await modes(join(demo, 'repo')), expectedV3RepositoryMode)).toEqual([]);
  });

  test('the NBD socket of engine serve is 0600 from the start', async () => {
    const repo = join(dir, 'serve-repo');
    const image = join(dir, 'serve.img');
    await writeRegion(image, 0, 1024 * 1024, 'random', 'serve');
    await ok(runWithUmask('000', ['init', repo]));
    const { id } = parseJson<BackupJson>((await ok(runWithUmask('000', ['backup', '--repo', repo, '--source', image, '--json']))).stdout);
    const socket = join(dir, 'serve.sock');
    const child = execFile('sh', ['-c', `umask 000 && exec "$0" "$@"`, process.execPath, ENGINE_BIN, 'serve', '--repo', repo, id, '--socket', socket, '--json']);
    try {
      await new Promise<void>((resolve, reject) => {
        child.stdout!.once('data', () => resolve());
        child.once('exit', (code) => reject(new Error(`serve exited with ${code}`)));
      });
      const s = await stat(socket);
      expect(s.isSocket()).toBe(true);
      expect(s.mode & 0o777).toBe(0o600);
    } finally {
      child.kill('SIGTERM');
      await new Promise((resolve) => child.once('exit', resolve));
    }
  });

  test('a journal is 0600 in a 0700 directory', async () => {
    const { Journal } = await import('../dist/repo-format/journal.js');
    const root = join(dir, 'journal-root');
    await mkdir(root);
    const previous = process.umask(0);
    try {
      const journal = await Journal.create(root, { flow: 'test' });
      await journal.add({ kind: 'snapshot', id: 'x' });
      expect((await stat(join(root, 'journal'))).mode & 0o777).toBe(0o700);
      expect((await stat(join(root, 'journal', `${journal.id}.json`))).mode & 0o777).toBe(0o600);
    } finally {
      process.umask(previous);
    }
  });
});

describe('a repository made before modes were set', () => {
  test('keeps working; verify warns (exit 0), names examples and the fix, and the fix silences it', async () => {
    const repo = join(dir, 'old');
    const image = join(dir, 'old.img');
    await writeRegion(image, 0, 2 * 1024 * 1024, 'random', 'old');
    // Version 1: the repositories made before modes were set were of version 1.
    await ok(runWithUmask('022', ['init', '--format', '1', repo]));
    await ok(runWithUmask('022', ['backup', '--repo', repo, '--source', image, '--json']));
    // What the engine made before: directories 0755, packs 0444, records, config and index 0644.
    for (const [path, entry] of await modes(repo)) {
      await chmod(join(repo, path), entry.directory ? 0o755 : path.startsWith('packs/') ? 0o444 : 0o644);
    }
    await ok(runWithUmask('022', ['backup', '--repo', repo, '--source', image, '--json']));
    const list = await ok(runWithUmask('022', ['list', '--repo', repo, '--json']));
    expect(parseJson<{ backups: unknown[] }>(list.stdout).backups).toHaveLength(2);
    const restored = join(dir, 'old-restored.img');
    const [firstId] = parseJson<{ backups: { id: string }[] }>(list.stdout).backups.map((b) => b.id);
    await ok(runWithUmask('022', ['restore', '--repo', repo, firstId!, '--to', restored, '--json']));

    const json = await ok(runWithUmask('022', ['verify', '--repo', repo, '--json']));
    const report = parseJson<{ ok: boolean; problems: unknown[]; warnings: { code: string; path: string }[]; permissions: { loose: number; examples: { path: string; mode: string }[] } }>(json.stdout);
    expect(report.ok).toBe(true);
    expect(report.problems).toEqual([]);
    expect(report.permissions.loose).toBeGreaterThan(260);
    expect(report.permissions.examples[0]).toEqual({ path: '.', mode: '0755' });
    const human = await ok(runWithUmask('022', ['verify', '--repo', repo]));
    expect(human.stdout).toMatch(new RegExp(`WARNING PERMISSIONS_LOOSE: \\d+ files and directories of the repository are open to other users \\(\\. 0755, .*\\); make it private with: chmod -R go= ${repo}\\n`));
    expect(report.warnings).toEqual([expect.objectContaining({ code: 'PERMISSIONS_LOOSE', path: '.' })]);
    expect(human.stdout).toMatch(/no problems found\n$/);

    await new Promise((resolve, reject) => execFile('chmod', ['-R', 'go=', repo], (error) => (error ? reject(error) : resolve(undefined))));
    expect(parseJson<{ permissions: { loose: number } }>((await ok(runWithUmask('022', ['verify', '--repo', repo, '--json']))).stdout).permissions.loose).toBe(0);
  });
});
