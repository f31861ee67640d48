/**
 * Ways out of states that used to strand a repository: locks and registrations judged by boot id and
 * process start time (a reused pid, a lock of an earlier boot), `engine unlock`; damaged backup records
 * (`engine forget`, records put back from the index catalogue by repair, gc marking from that copy);
 * files in packs/ and backups/ that are not the repository's; and a lost or damaged config rebuilt by repair.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { spawn, type ChildProcess } from 'node:child_process';
import { hostname } from 'node:os';
import { mkdir, readdir, readFile, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { bootId, processIdentity } from '../dist/repo-format/process-alive.js';
import { exitOf, filesIdentical, parseJson, runEngine, sparseFile, tempDir, writeRegion, type BackupJson, withoutProgress, backUp } from './helpers.js';

const MiB = 1024 * 1024;
let dir: string;
let cleanup: () => Promise<void>;
/** A live process that is not an engine: its pid stands for "a pid now held by someone else". */
let other: ChildProcess;
let counter = 0;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-resilience-'));
  other = spawn('sleep', ['600'], { stdio: 'ignore' });
});
afterAll(async () => {
  other.kill();
  await exitOf(other);
  await cleanup();
});

async function freshRepo(args: string[] = [], env: Record<string, string> = {}): Promise<string> {
  const repo = join(dir, `repo-${++counter}`);
  // Format 1 (2 encrypted): the lock, readers/ and writers/, the catalogue and the LevelDB index are what
  // these cases are about (format 3's leases: v3-leases, v3-leases-processes, v3-commands).
  const made = await runEngine(['init', repo, '--format', args.includes('--encrypt') ? '2' : '1', ...args], { env });
  expect(made.code).toBe(0);
  return repo;
}

async function image(name: string, megabytes: number, seed = name): Promise<string> {
  const path = join(dir, name);
  await sparseFile(path, megabytes * MiB);
  await writeRegion(path, 0, megabytes * MiB, 'random', seed);
  return path;
}

function backupOf(repo: string, source: string, name?: string, env: Record<string, string> = {}): Promise<BackupJson> {
  return backUp(repo, ['--source', source, ...(name ? ['--name', name] : [])], { env, quiet: true });
}

async function restoresIdentical(repo: string, id: string, expected: string, env: Record<string, string> = {}): Promise<void> {
  const target = join(dir, `restored-${++counter}.raw`);
  const restored = await runEngine(['restore', '--repo', repo, id, '--to', target], { env });
  expect(withoutProgress(restored.stderr)).toBe('');
  expect(restored.code).toBe(0);
  expect(await filesIdentical(target, expected)).toBe(true);
  await rm(target);
}

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

function lockOf(fields: Record<string, unknown>): string {
  return JSON.stringify({ hostname: hostname(), since: '2026-01-01T00:00:00.000Z', command: 'backup', token: 'feedfacefeedface', ...fields });
}

describe('liveness by boot id and process start time; engine unlock', () => {
  test('a lock whose pid now runs another process, or that an earlier boot left, is broken by every command, which says so', async () => {
    const repo = await freshRepo();
    const source = await image('liveness.img', 2);
    const { id } = await backupOf(repo, source);
    const [boot, start] = processIdentity(other.pid!)!.split(':');
    const target = join(dir, 'liveness-restored.raw');
    const commands: [string, string[]][] = [
      ['verify', ['verify', '--repo', repo]],
      ['restore', ['restore', '--repo', repo, id, '--to', target]],
      ['prune', ['prune', '--repo', repo, '--keep-last', '5']],
      ['gc', ['gc', '--repo', repo]],
      ['protect', ['protect', '--repo', repo, id]],
      ['repair', ['repair', '--repo', repo]],
      ['forget', ['forget', '--repo', repo, 'ffff']],
    ];
    for (const [n, [name, args]] of commands.entries()) {
      // Same pid, another start time (the pid was reused); or the boot before this one.
      const identity = n % 2 === 0 ? `${boot}:${Number(start) + 1}` : `00000000-0000-4000-8000-000000000000:${start}`;
      await writeFile(join(repo, 'lock'), lockOf({ pid: other.pid, identity }));
      const result = await runEngine(args);
      expect(result.stderr, name).toContain(`engine: removed a stale lock of pid ${other.pid} on ${hostname()} (since 2026-01-01T00:00:00.000Z): its backup no longer runs`);
      expect(result.code, name).toBe(name === 'forget' ? 1 : 0); // forget: no backup ffff…, after breaking the lock
      expect(await exists(join(repo, 'lock')), name).toBe(false);
    }
    expect(await filesIdentical(target, source)).toBe(true);
  });

  test('an older engine\'s lock (no identity) with a live pid is respected; unlock keeps it without --force and removes it, warning, with it', async () => {
    const repo = await freshRepo();
    const source = await image('legacy-lock.img', 1);
    await writeFile(join(repo, 'lock'), lockOf({ pid: other.pid }));
    const refused = await runEngine(['backup', '--repo', repo, '--source', source]);
    expect(refused.code).toBe(3);
    expect(refused.stderr).toContain(`pid ${other.pid} is alive, but its file does not say whether it is still the holder`);
    expect(refused.stderr).toContain(`\`engine unlock --repo ${repo} --force\` removes the lock`);

    const kept = await runEngine(['unlock', '--repo', repo]);
    expect(kept.code).toBe(3);
    expect(kept.stdout).toContain(`kept the lock of pid ${other.pid} on ${hostname()} (backup, since 2026-01-01T00:00:00.000Z): pid ${other.pid} is alive (sleep 600)`);
    expect(await exists(join(repo, 'lock'))).toBe(true);

    const forced = await runEngine(['unlock', '--repo', repo, '--force', '--json']);
    expect(forced.code).toBe(0);
    const report = parseJson<{ lock: { state: string; removed: boolean; message: string }; locked: boolean }>(forced.stdout);
    expect(report.lock).toMatchObject({ state: 'unverified', removed: true });
    expect(report.lock.message).toMatch(/^WARNING: removed the lock of pid \d+ on .* although pid \d+ is alive .* \(forced\): if that process still works on the repository, two processes may now change it at once$/);
    expect(report.locked).toBe(false);
    expect(await exists(join(repo, 'lock'))).toBe(false);
    await backupOf(repo, source);
  });

  test('another host\'s lock and a running holder\'s lock: unlock refuses both, --force removes them; no lock: nothing to do', async () => {
    const repo = await freshRepo();
    const none = await runEngine(['unlock', '--repo', repo]);
    expect(none.code).toBe(0);
    expect(none.stdout).toBe(`repository ${repo} is not locked\n`);

    await writeFile(join(repo, 'lock'), lockOf({ pid: 1, hostname: 'elsewhere.invalid', identity: `${bootId()}:1` }));
    const remote = await runEngine(['unlock', '--repo', repo]);
    expect(remote.code).toBe(3);
    expect(remote.stdout).toContain('this host cannot tell whether it still runs; once it has finished (or host elsewhere.invalid is down)');
    expect((await runEngine(['unlock', '--repo', repo, '--force'])).code).toBe(0);
    expect(await exists(join(repo, 'lock'))).toBe(false);

    await writeFile(join(repo, 'lock'), lockOf({ pid: other.pid, identity: processIdentity(other.pid!) }));
    const running = await runEngine(['unlock', '--repo', repo]);
    expect(running.code).toBe(3);
    expect(running.stdout).toContain('that process is running; wait for it to finish, or stop it');
    const verify = await runEngine(['verify', '--repo', repo]);
    expect(verify.code).toBe(3);
    expect(verify.stderr).toContain('that process is running: wait for it to finish');
    const forced = await runEngine(['unlock', '--repo', repo, '--force']);
    expect(forced.code).toBe(0);
    expect(forced.stdout).toContain('WARNING: removed the lock');
    expect(await exists(join(repo, 'lock'))).toBe(false);
  });

  test('registrations: a reader whose pid was reused defers no deletion; an older gc\'s live-pid registration is kept until unlock --force; a running reader\'s never', async () => {
    const repo = await freshRepo();
    const first = await image('reg-a.img', 3, 'reg-a');
    const second = await image('reg-b.img', 3, 'reg-b');
    await backupOf(repo, first, 'vm');
    const kept = await backupOf(repo, second, 'vm');
    expect((await runEngine(['prune', '--repo', repo, '--keep-last', '1'])).code).toBe(0);
    const [boot, start] = processIdentity(other.pid!)!.split(':');
    const registration = (token: string, fields: Record<string, unknown>): string =>
      JSON.stringify({ pid: other.pid, hostname: hostname(), since: '2026-01-01T00:00:00.000Z', command: 'serve', token, backupIds: [], ...fields });

    // A reader registration whose pid now runs another process: no reader, the dead packs go now.
    await writeFile(join(repo, 'readers', 'aaaaaaaaaaaaaaaa.json'), registration('aaaaaaaaaaaaaaaa', { identity: `${boot}:${Number(start) + 7}` }));
    const gc = await runEngine(['gc', '--repo', repo, '--json']);
    expect(gc.code).toBe(0);
    const report = parseJson<{ readers: number; packs: { deleted: string[]; deferred: string[] } }>(gc.stdout);
    expect(report.readers).toBe(0);
    expect(report.packs.deferred).toEqual([]);
    expect(report.packs.deleted.length).toBe(2); // the pruned backup's data and map packs
    expect(await readdir(join(repo, 'readers'))).toEqual([]);
    await restoresIdentical(repo, kept.id, second);

    // An older engine's gc registration (no identity) whose pid is alive blocks the next gc, naming the way out.
    await mkdir(join(repo, 'writers'), { recursive: true });
    await writeFile(join(repo, 'writers', 'bbbbbbbbbbbbbbbb.json'), registration('bbbbbbbbbbbbbbbb', { command: 'gc' }));
    const blocked = await runEngine(['gc', '--repo', repo]);
    expect(blocked.code).toBe(3);
    expect(blocked.stderr).toContain(`\`engine unlock --repo ${repo} --force\` removes its registration writers/bbbbbbbbbbbbbbbb.json`);
    const listed = await runEngine(['unlock', '--repo', repo]);
    expect(listed.code).toBe(0);
    expect(listed.stdout).toContain('kept writers/bbbbbbbbbbbbbbbb.json');
    // A reader that provably runs here stays even with --force: stopping it is the way.
    await writeFile(join(repo, 'readers', 'cccccccccccccccc.json'), registration('cccccccccccccccc', { identity: processIdentity(other.pid!) }));
    const forced = await runEngine(['unlock', '--repo', repo, '--force', '--json']);
    expect(forced.code).toBe(0);
    const items = parseJson<{ registrations: { file: string; state: string; removed: boolean }[] }>(forced.stdout).registrations;
    expect(items.map((i) => [i.file, i.state, i.removed])).toEqual([
      ['writers/bbbbbbbbbbbbbbbb.json', 'unverified', true],
      ['readers/cccccccccccccccc.json', 'alive', false],
    ]);
    expect((await runEngine(['gc', '--repo', repo])).code).toBe(0);
  });
});

describe('damaged backup records: forget, and the catalogue\'s copy', () => {
  test('a damaged record whose catalogue copy is good: gc marks from the copy, forget refuses, repair puts the file back byte for byte', async () => {
    const repo = await freshRepo();
    const x = await image('catalogue-x.img', 3, 'cx');
    const y = await image('catalogue-y.img', 2, 'cy');
    const damaged = await backupOf(repo, x, 'x');
    await backupOf(repo, y, 'y');
    const recordPath = join(repo, 'backups', damaged.id);
    const original = await readFile(recordPath);
    await truncate(recordPath, 40);

    const verify = await runEngine(['verify', '--repo', repo, '--json']);
    expect(verify.code).toBe(4);
    const problems = parseJson<{ problems: { code: string; message: string; backup?: string }[] }>(verify.stdout).problems;
    expect(problems.map((p) => [p.code, p.backup])).toEqual([['RECORD_DAMAGED', damaged.id]]);
    expect(problems[0]!.message).toContain('the index holds a good copy of it: `engine repair` restores it');

    // gc marks the damaged backup's chunks from the copy: nothing of it is collected.
    const gc = await runEngine(['gc', '--repo', repo, '--json']);
    expect(gc.code).toBe(0);
    expect(parseJson<{ packs: { deleted: string[] } }>(gc.stdout).packs.deleted).toEqual([]);
    const notice = await runEngine(['gc', '--repo', repo]);
    expect(notice.stderr).toContain(`backup record ${damaged.id} is damaged: not valid JSON; gc marks from its good copy in the index`);

    const forget = await runEngine(['forget', '--repo', repo, damaged.id.slice(0, 8)]);
    expect(forget.code).toBe(2);
    expect(forget.stderr).toContain('the index holds a good copy of it: `engine repair` restores the backup');
    expect(await exists(recordPath)).toBe(true);

    const repair = await runEngine(['repair', '--repo', repo, '--json']);
    expect(repair.code).toBe(0);
    expect(parseJson<{ recordsRestored: { backup: string; was: string }[] }>(repair.stdout).recordsRestored).toEqual([{ backup: damaged.id, was: 'not valid JSON' }]);
    expect((await readFile(recordPath)).equals(original)).toBe(true);
    await restoresIdentical(repo, damaged.id, x);
    expect((await runEngine(['verify', '--repo', repo])).code).toBe(0);
  });

  test('a damaged record with no good copy: gc names forget, forget removes it, gc then runs; a protected backup is not forgotten', async () => {
    const repo = await freshRepo();
    const x = await image('forget-x.img', 2, 'fx');
    const y = await image('forget-y.img', 2, 'fy');
    const lost = await backupOf(repo, x, 'x');
    const kept = await backupOf(repo, y, 'y');
    await writeFile(join(repo, 'backups', lost.id), 'not a record');
    await rm(join(repo, 'index'), { recursive: true }); // the catalogue's copy goes with it (rebuilt from the damaged file)

    const refused = await runEngine(['gc', '--repo', repo]);
    expect(refused.code).toBe(4);
    expect(refused.stderr).toContain(`\`engine forget ${lost.id}\` removes that backup`);
    const repair = await runEngine(['repair', '--repo', repo]);
    expect(repair.code).toBe(4);
    expect(repair.stdout).toContain(`no good copy of it is left: \`engine forget ${lost.id}\` removes the backup`);

    const forgot = await runEngine(['forget', '--repo', repo, lost.id.slice(0, 6), '--json']);
    expect(withoutProgress(forgot.stderr)).toBe('');
    expect(forgot.code).toBe(0);
    expect(parseJson<{ backup: string; name: string | null; damaged: string | null }>(forgot.stdout)).toMatchObject({ backup: lost.id, name: null, damaged: 'not valid JSON' });
    const list = parseJson<{ backups: { id: string }[]; damaged: unknown[] }>((await runEngine(['list', '--repo', repo, '--json'])).stdout);
    expect(list.backups.map((b) => b.id)).toEqual([kept.id]);
    expect(list.damaged).toEqual([]);
    const gc = await runEngine(['gc', '--repo', repo, '--json']);
    expect(gc.code).toBe(0);
    expect(parseJson<{ packs: { deleted: string[] } }>(gc.stdout).packs.deleted.length).toBe(2);
    await restoresIdentical(repo, kept.id, y);

    expect((await runEngine(['protect', '--repo', repo, kept.id])).code).toBe(0);
    const protectedOne = await runEngine(['forget', '--repo', repo, kept.id]);
    expect(protectedOne.code).toBe(2);
    expect(protectedOne.stderr).toContain(`backup ${kept.id} is protected: \`engine unprotect ${kept.id}\` first`);
    expect((await runEngine(['unprotect', '--repo', repo, kept.id])).code).toBe(0);
    const readable = await runEngine(['forget', '--repo', repo, kept.id]);
    expect(readable.code).toBe(0);
    expect(readable.stdout).toBe(`forgot backup ${kept.id} ("y", ${(kept as BackupJson & { startTime: string }).startTime}); \`engine gc\` reclaims the space of the chunks only it used\n`);
    expect(await readdir(join(repo, 'backups'))).toEqual([]);
  });
});

describe('files that are not the repository\'s', () => {
  test('a README, directories and files with a pack\'s or record\'s name: verify warns about each, every command skips them, gc deletes none', async () => {
    const repo = await freshRepo();
    const source = await image('strays.img', 3);
    const { id } = await backupOf(repo, source);
    const strays = {
      readme: join(repo, 'packs', 'README'),
      notes: join(repo, 'packs', '12', 'notes.txt'),
      packDir: join(repo, 'packs', 'ab', `ab${'0'.repeat(30)}`),
      empty: join(repo, 'packs', 'cd', `cd${'1'.repeat(30)}`),
      garbage: join(repo, 'packs', 'ef', `ef${'2'.repeat(30)}`),
      recordReadme: join(repo, 'backups', 'README'),
      recordDir: join(repo, 'backups', 'f'.repeat(32)),
    };
    await writeFile(strays.readme, 'these are packs\n');
    await writeFile(strays.notes, 'notes\n');
    await mkdir(strays.packDir);
    await writeFile(strays.empty, '');
    await writeFile(strays.garbage, Buffer.alloc(5000, 7));
    await writeFile(strays.recordReadme, 'backups\n');
    await mkdir(strays.recordDir);

    const verify = await runEngine(['verify', '--repo', repo, '--read-data', '--json']);
    expect(withoutProgress(verify.stderr)).toBe('');
    expect(verify.code).toBe(0);
    const report = parseJson<{ ok: boolean; problems: unknown[]; warnings: { code: string; path: string; message: string }[] }>(verify.stdout);
    expect(report.problems).toEqual([]);
    // The strays were made here under the test's umask, so other users may read them: verify says that too.
    expect(report.warnings.filter((w) => w.code === 'PERMISSIONS_LOOSE')).toHaveLength(1);
    expect(report.warnings.filter((w) => w.code !== 'PERMISSIONS_LOOSE').map((w) => [w.code, w.path]).sort()).toEqual(
      [
        ['STRAY_FILE', 'packs/README'],
        ['STRAY_FILE', 'packs/12/notes.txt'],
        ['STRAY_FILE', `packs/ab/ab${'0'.repeat(30)}`],
        ['NOT_A_PACK', `packs/cd/cd${'1'.repeat(30)}`],
        ['NOT_A_PACK', `packs/ef/ef${'2'.repeat(30)}`],
        ['STRAY_FILE', 'backups/README'],
        ['STRAY_FILE', `backups/${'f'.repeat(32)}`],
      ].sort(),
    );
    expect(report.warnings.find((w) => w.path === `packs/ab/ab${'0'.repeat(30)}`)!.message).toContain('a directory named like a pack');
    const text = await runEngine(['verify', '--repo', repo]);
    expect(text.code).toBe(0);
    expect(text.stdout).toContain('WARNING STRAY_FILE: packs/README is a file that is not one of the 256 pack directories (00 … ff)');

    for (const args of [['list'], ['show', id], ['gc'], ['repair'], ['prune', '--keep-last', '3']]) {
      const result = await runEngine([...args, '--repo', repo]);
      expect(result.code, `${args[0]}: ${result.stderr}`).toBe(0);
      expect(result.stderr, args[0]).not.toMatch(/ENOTDIR|EISDIR|ENOENT/);
    }
    for (const path of Object.values(strays)) expect(await exists(path), path).toBe(true);
    await restoresIdentical(repo, id, source);
  });
});

describe('a lost or damaged config', () => {
  interface ConfigJson {
    id: string;
    blockSize: number;
    version: number;
    encryption?: { keyFile: string };
  }

  test('missing, then cut short, then lost with the index: commands point at repair, which rebuilds it; every backup restores', async () => {
    const repo = await freshRepo(['--block-size', '256K']);
    const source = await image('config.img', 3);
    const { id } = await backupOf(repo, source);
    const original = parseJson<ConfigJson & Record<string, unknown>>(await readFile(join(repo, 'config'), 'utf8'));

    await rm(join(repo, 'config'));
    const list = await runEngine(['list', '--repo', repo]);
    expect(list.code).toBe(5);
    expect(list.stderr).toBe(`engine: ${repo} is not an engine repository: it has no config file; it has a repository's packs/ and backups/: \`engine repair --repo ${repo}\` rebuilds the config from them\n`);
    const rebuilt = await runEngine(['repair', '--repo', repo, '--json']);
    expect(rebuilt.code).toBe(0);
    expect(parseJson<{ configRebuilt: Record<string, unknown> }>(rebuilt.stdout).configRebuilt).toEqual({
      why: 'missing',
      id: original.id,
      blockSize: 256 * 1024,
      version: 1,
      encrypted: false,
      sources: { id: 'index', blockSize: 'records', created: 'records', encryption: 'none' },
      objectLock: null,
      keptAs: null,
    });
    const config = parseJson<ConfigJson & Record<string, unknown>>(await readFile(join(repo, 'config'), 'utf8'));
    expect({ ...config, created: undefined }).toEqual({ ...original, created: undefined });
    await restoresIdentical(repo, id, source);

    const whole = await readFile(join(repo, 'config'));
    await writeFile(join(repo, 'config'), whole.subarray(0, 60));
    const cut = await runEngine(['repair', '--repo', repo, '--json']);
    expect(cut.code).toBe(0);
    const keptAs = parseJson<{ configRebuilt: { why: string; keptAs: string } }>(cut.stdout).configRebuilt;
    expect(keptAs.why).toBe('config is not JSON');
    expect((await readFile(join(repo, keptAs.keptAs))).equals(whole.subarray(0, 60))).toBe(true);
    expect(parseJson<ConfigJson>(await readFile(join(repo, 'config'), 'utf8'))).toMatchObject({ id: original.id, blockSize: 256 * 1024 });

    await rm(join(repo, 'config'));
    await rm(join(repo, 'index'), { recursive: true });
    const fresh = await runEngine(['repair', '--repo', repo, '--json']);
    expect(fresh.code).toBe(0);
    const again = parseJson<{ configRebuilt: { id: string; blockSize: number; sources: { id: string } } }>(fresh.stdout).configRebuilt;
    expect(again.sources.id).toBe('new');
    expect(again.id).not.toBe(original.id);
    expect(again.blockSize).toBe(256 * 1024);
    await restoresIdentical(repo, id, source);
    expect((await runEngine(['verify', '--repo', repo, '--read-data'])).code).toBe(0);
    // The repository takes backups again, deduplicated against what it held.
    expect((await backupOf(repo, source)).disks[0]!.blocksNew).toBe(0);
  });

  test('an encrypted repository: rebuilt with the passphrase; without the index the repository id is gone, and repair says so', async () => {
    const env = { ENGINE_PASSWORD: 'correct horse battery staple' };
    const repo = await freshRepo(['--encrypt'], env);
    const source = await image('config-encrypted.img', 2);
    const { id } = await backupOf(repo, source, undefined, env);
    const original = await readFile(join(repo, 'config'), 'utf8');
    await rm(join(repo, 'config'));
    const noPassphrase = await runEngine(['repair', '--repo', repo]);
    expect(noPassphrase.code).toBe(6);
    expect(await exists(join(repo, 'config'))).toBe(false);
    const wrong = await runEngine(['repair', '--repo', repo], { env: { ENGINE_PASSWORD: 'wrong' } });
    expect(wrong.code).toBe(6);
    expect(await exists(join(repo, 'config'))).toBe(false);
    const rebuilt = await runEngine(['repair', '--repo', repo, '--json'], { env });
    expect(rebuilt.code).toBe(0);
    expect(parseJson<{ configRebuilt: { encrypted: boolean; version: number } }>(rebuilt.stdout).configRebuilt).toMatchObject({ encrypted: true, version: 2 });
    const config = parseJson<ConfigJson & Record<string, unknown>>(await readFile(join(repo, 'config'), 'utf8'));
    expect({ ...config, created: undefined }).toEqual({ ...parseJson<Record<string, unknown>>(original), created: undefined });
    await restoresIdentical(repo, id, source, env);

    await rm(join(repo, 'config'));
    await rm(join(repo, 'index'), { recursive: true });
    const lost = await runEngine(['repair', '--repo', repo], { env });
    expect(lost.code).toBe(5);
    expect(lost.stderr).toContain('the repository id, to which the key file\'s seal is bound, was kept only in those two; restore the config from a copy');
    expect(await exists(join(repo, 'config'))).toBe(false);
  });

  test('a directory that is not a repository is left alone, and so is a config of a newer format', async () => {
    const plain = join(dir, 'not-a-repo');
    await mkdir(join(plain, 'packs'), { recursive: true });
    const result = await runEngine(['repair', '--repo', plain]);
    expect(result.code).toBe(5);
    expect(await readdir(plain)).toEqual(['packs']);
    const repo = await freshRepo();
    const config = parseJson<Record<string, unknown>>(await readFile(join(repo, 'config'), 'utf8'));
    const newer = JSON.stringify({ ...config, version: 9 });
    await writeFile(join(repo, 'config'), newer);
    expect((await runEngine(['repair', '--repo', repo])).code).toBe(5);
    expect(await readFile(join(repo, 'config'), 'utf8')).toBe(newer);
  });
});
