/**
 * One-liners a user reads (issue 11, "unclear messages"): init on a file or under a missing parent, a backup id
 * prefix that is too short, times with their zone, counts with the right noun, prune's columns, gc that wrote
 * more than it deleted, numeric options that are whole numbers within bounds, what --workers does per command,
 * and a demo that says its files are temporary.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { readdir, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { exitOf, parseJson, runEngine, spawnEngine, tempDir, writeRegion, type BackupJson } from './helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let repo: string;
let image: string;
let first: BackupJson & { startTime: string };

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-messages-'));
  repo = join(dir, 'repo');
  expect((await runEngine(['init', repo, '--block-size', '64K'])).code).toBe(0);
  image = join(dir, 'disk.img');
  await writeRegion(image, 0, 64 * 1024, 'random', 'messages-1'); // exactly one block
  first = parseJson<BackupJson & { startTime: string }>((await runEngine(['backup', '--repo', repo, '--source', image, '--name', 'vm', '--json'])).stdout);
});
afterAll(async () => {
  await cleanup();
});

describe('init', () => {
  test('on a file, inside a file, or under a missing parent: a usage error (exit 2) saying which, and nothing created', async () => {
    const file = join(dir, 'a-file');
    await writeFile(file, 'x');
    const onFile = await runEngine(['init', file]);
    expect([onFile.code, onFile.stderr]).toEqual([2, `engine: cannot create a repository at ${file}: it is a file, not a directory (give a new or empty directory)\n`]);
    const inside = await runEngine(['init', join(file, 'repo')]);
    expect([inside.code, inside.stderr]).toEqual([2, `engine: cannot create a repository at ${join(file, 'repo')}: a part of that path is a file, not a directory\n`]);
    const missing = join(dir, 'no', 'such', 'parent', 'repo');
    const orphan = await runEngine(['init', missing]);
    expect([orphan.code, orphan.stderr]).toEqual([2, `engine: cannot create a repository at ${missing}: its parent directory ${join(dir, 'no', 'such', 'parent')} does not exist (create it first)\n`]);
    await expect(stat(join(dir, 'no'))).rejects.toMatchObject({ code: 'ENOENT' });
  });
});

describe('backup ids', () => {
  test('a prefix shorter than 4 is too short (exit 2), not "no backup matches"; a non-hex argument is not an id', async () => {
    const short = await runEngine(['show', '--repo', repo, first.id.slice(0, 3)]);
    expect([short.code, short.stderr]).toEqual([2, `engine: backup id prefix "${first.id.slice(0, 3)}" is too short: give at least 4 characters (a prefix of 4 or more names one backup if it is unique)\n`]);
    const notHex = await runEngine(['restore', '--repo', repo, 'vm-nightly', '--to', join(dir, 'x.img')]);
    expect([notHex.code, notHex.stderr]).toEqual([2, 'engine: "vm-nightly" is not a backup id: ids are 32 hexadecimal characters, and any unique prefix of 4 or more names one\n']);
    expect((await runEngine(['show', '--repo', repo, first.id.slice(0, 4)])).code).toBe(0);
  });
});

describe('what list, show, backup, restore, verify, prune and gc print', () => {
  test('times carry their zone (UTC, Z); counts of one are singular', async () => {
    const list = await runEngine(['list', '--repo', repo]);
    expect(list.stdout.split('\n')[1]).toMatch(new RegExp(`^${first.id.slice(0, 12)}  ${first.startTime.slice(0, 19)}Z  full `));
    const show = await runEngine(['show', '--repo', repo, first.id]);
    expect(show.stdout).toContain(`started:   ${first.startTime.slice(0, 19)}Z\n`);
    await writeRegion(image, 0, 64 * 1024, 'random', 'messages-2');
    const backup = await runEngine(['backup', '--repo', repo, '--source', image, '--name', 'vm']);
    expect(backup.stdout).toMatch(/; 1 new block \(64\.0 KiB → /);
    const restore = await runEngine(['restore', '--repo', repo, first.id, '--to', join(dir, 'one.img')]);
    expect(restore.stdout).toMatch(/\(64\.0 KiB, 1 block \/ 64\.0 KiB written\)\n$/);
    const single = join(dir, 'single');
    expect((await runEngine(['init', single])).code).toBe(0);
    await runEngine(['backup', '--repo', single, '--source', image]);
    const verify = await runEngine(['verify', '--repo', single]);
    expect(verify.stdout).toMatch(/^checked 1 backup, 2 packs, 2 blobs /);
  });

  test("prune's columns line up, whatever the action's length", async () => {
    await writeRegion(image, 0, 64 * 1024, 'random', 'messages-3');
    await runEngine(['backup', '--repo', repo, '--source', image, '--name', 'vm']);
    const dry = await runEngine(['prune', '--repo', repo, '--keep-last', '1', '--dry-run']);
    const rows = dry.stdout.split('\n').filter((line) => /^(keep|would remove) /.test(line));
    expect(rows.map((r) => r.split(/\s{2,}/)[0])).toEqual(['keep', 'would remove', 'would remove']);
    const idColumn = rows.map((r) => r.search(/[0-9a-f]{12}  /));
    expect(new Set(idColumn).size).toBe(1);
    expect(rows.every((r) => /  \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  vm/.test(r))).toBe(true);
  });

  test('gc that writes more than it deletes (packs kept for a reader) says so, never "reclaimed -N B"', async () => {
    const gcRepo = join(dir, 'gc');
    // Version 1: deletions deferred for a registered reader are versions 1 and 2's gc (SPEC.md 10.2); version 3's
    // gc waits for the readers' shared leases instead (19.8, test/v3-gc).
    expect((await runEngine(['init', '--format', '1', gcRepo, '--block-size', '64K'])).code).toBe(0);
    const disk = join(dir, 'gc.img');
    await writeRegion(disk, 0, 2 * 1024 * 1024, 'random', 'gc-1');
    await runEngine(['backup', '--repo', gcRepo, '--source', disk, '--name', 'vm']);
    await writeRegion(disk, 0, 1024 * 1024, 'random', 'gc-2');
    const kept = parseJson<BackupJson>((await runEngine(['backup', '--repo', gcRepo, '--source', disk, '--name', 'vm', '--json'])).stdout);
    expect((await runEngine(['prune', '--repo', gcRepo, '--keep-last', '1'])).code).toBe(0);
    const socket = join(dir, 'gc.sock');
    const server = spawnEngine(['serve', '--repo', gcRepo, kept.id, '--socket', socket, '--json']);
    try {
      await new Promise<void>((resolve, reject) => {
        server.stdout!.once('data', () => resolve());
        server.once('exit', (code) => reject(new Error(`serve exited with ${code}`)));
      });
      const gc = await runEngine(['gc', '--repo', gcRepo, '--rewrite-below', '100%']);
      expect(gc.code).toBe(0);
      expect(gc.stdout).toMatch(/\nreclaimed nothing: [0-9.]+ [KM]iB more written than deleted \(0 B deleted, [0-9.]+ [KM]iB written\)\n/);
      expect(gc.stdout).not.toMatch(/-\d/);
      expect(gc.stderr).toMatch(/^engine: 1 reader is registered \(engine serve\/mount\): deleting \d+ packs is deferred to a later gc\n$/);
    } finally {
      server.kill('SIGTERM');
      await exitOf(server);
    }
  });
});

describe('numeric options', () => {
  test('whole numbers in digits, within bounds: 1e3, 0x10, 5.0, -1 and numbers past the bound are refused (exit 2)', async () => {
    const refusals: [string[], string][] = [
      [['prune', '--repo', repo, '--keep-last', '1e3'], '--keep-last 1e3: give a whole number from 0 to 1000000, in digits'],
      [['prune', '--repo', repo, '--keep-daily', '0x10'], '--keep-daily 0x10: give a whole number from 0 to 1000000, in digits'],
      [['prune', '--repo', repo, '--keep-weekly', '5.0'], '--keep-weekly 5.0: give a whole number from 0 to 1000000, in digits'],
      [['prune', '--repo', repo, '--keep-monthly', '-1'], '--keep-monthly -1: give a whole number from 0 to 1000000, in digits'],
      [['prune', '--repo', repo, '--keep-yearly', '1000001'], '--keep-yearly 1000001: give a whole number from 0 to 1000000, in digits'],
      [['verify', '--repo', repo, '--workers', '1e1'], '--workers 1e1: give a whole number from 1 to 64, in digits'],
      [['serve', '--repo', repo, first.id, '--port', '0x50'], '--port 0x50: give a whole number from 0 to 65535, in digits'],
      [['verify', '--repo', repo, '--read-data', '--subset', '1e1%'], '--subset 1e1%: give a percentage above 0 up to 100%, in digits (e.g. 10% or 12.5%)'],
      [['gc', '--repo', repo, '--rewrite-below', '0x10'], '--rewrite-below 0x10: give a percentage from 0 up to 100%, in digits (e.g. 10% or 12.5%)'],
      [['serve', '--repo', repo, first.id, '--socket', join(dir, 's.sock'), '--cache', '1e3'], '--cache "1e3" is not a size (examples: 1048576, 256K, 1M, 4GiB)'],
      [['serve', '--repo', repo, first.id, '--socket', join(dir, 's.sock'), '--cache', '65G'], '--cache 65G: give a size from 0 B to 64.0 GiB'],
      [['demo', '--size', '2T'], '--size 2T: give a size from 1 B to 1.00 TiB'],
    ];
    for (const [args, message] of refusals) {
      const result = await runEngine(args);
      expect([args.join(' '), result.code, result.stderr]).toEqual([args.join(' '), 2, `engine: ${message}\n`]);
    }
    const fine = await runEngine(['prune', '--repo', repo, '--keep-last', '1000', '--dry-run', '--json']);
    expect(fine.code).toBe(0);
    const percent = await runEngine(['gc', '--repo', repo, '--rewrite-below', '12.5%', '--dry-run', '--json']);
    expect(parseJson<{ rewriteBelow: number }>(percent.stdout).rewriteBelow).toBe(0.125);
  });

  test('--workers says what the threads do, per command', async () => {
    const help = async (command: string): Promise<string> => (await runEngine([command, '--help'])).stdout.replace(/\s+/g, ' ');
    expect(await help('backup')).toContain('--workers <n> worker threads that hash and compress the blocks read (default: one per core; none for a job of 16 MiB or less, which the main thread runs)');
    expect(await help('restore')).toContain('--workers <n> worker threads that read and check the chunks (decrypt, decompress, hash) before they are written (default: one per core; none for a job of 16 MiB or less, which the main thread runs)');
    expect(await help('serve')).toContain('--workers <n> worker threads that read and check the chunks before they are served (default: 2)');
    expect(await help('verify')).toContain('--workers <n> worker threads that re-read and check the chunks with --read-data');
    expect(await help('repair')).toContain('--workers <n> worker threads that re-read and check every frame');
    for (const command of ['restore', 'serve', 'verify', 'repair']) expect(await help(command)).not.toContain('hashing/compression');
  });
});

describe('demo', () => {
  test('says up front that its directory is temporary, and that it removed it (and its repository\'s host cache)', async () => {
    // The demo's repository is of format 3 (the default): its host cache folder goes with the directory.
    const cache = join(dir, 'demo-host-cache');
    const demo = await runEngine(['demo', '--size', '1M'], { env: { ENGINE_CACHE_DIR: cache } });
    expect(demo.code).toBe(0);
    const lines = demo.stdout.trim().split('\n');
    const work = /^demo: working in (\S+), a temporary directory removed when the demo ends \(give the demo a directory to keep the image and the repository\)$/.exec(lines[0]!);
    expect(work).not.toBeNull();
    expect(lines.at(-2)).toBe(`demo: removed the temporary directory ${work![1]}`);
    expect(lines.at(-1)).toBe('demo: done; 2 backups restored byte for byte, repository verified');
    await expect(stat(work![1]!)).rejects.toMatchObject({ code: 'ENOENT' });
    expect(await readdir(cache)).toEqual(['host-id']);
    const kept = join(dir, 'demo-kept');
    const keptRun = await runEngine(['demo', '--size', '1M', '--dir', kept]);
    expect(keptRun.stdout.split('\n')[0]).toBe(`demo: working in ${kept} (kept afterwards)`);
    expect((await readdir(kept)).sort()).toEqual(['repo', 'vm-disk.img']);
  });
});
