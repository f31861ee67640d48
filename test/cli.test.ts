/**
 * The CLI contract: exit codes, JSON-only output, one-line errors, progress on a terminal, interruption.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { execFile } from 'node:child_process';
import { access, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { generateImage } from '../dist/engine/index.js';
import { LZ4_IMPLEMENTATION } from '../dist/repo-format/lz4-native.js';
import { Command } from 'commander';
import { COMMAND_GROUPS, groupsFor } from '../dist/cli/command-groups.js';
import { ENGINE_BIN, exitOf, parseJson, runEngine, sparseFile, spawnEngine, tempDir, writeRegion, type BackupJson, hostCacheOf, hostCacheLeftovers, waitFor } from './helpers.js';

const MiB = 1024 * 1024;
let dir: string;
let repo: string;
let image: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir());
  repo = join(dir, 'repo');
  await runEngine(['init', repo]);
  image = join(dir, 'disk.img');
  await sparseFile(image, 3 * MiB);
  await writeRegion(image, 0, 3 * MiB, 'random', 'cli');
});
afterAll(async () => {
  await cleanup();
});

describe('usage', () => {
  test('help and version exit 0', async () => {
    const help = await runEngine(['--help']);
    expect(help.code).toBe(0);
    for (const command of ['init', 'backup', 'list', 'show', 'restore', 'verify', 'demo']) expect(help.stdout).toContain(command);
    expect((await runEngine(['--version'])).stdout.trim()).toMatch(/^\d+\.\d+\.\d+$/);
  });

  test('each command group defines exactly the commands its table names; a command line defines only its own group', () => {
    const defined = COMMAND_GROUPS.map((group) => {
      const program = new Command('engine');
      group.register(program);
      return program.commands.map((command) => command.name());
    });
    COMMAND_GROUPS.forEach((group, i) => expect([...defined[i]!].sort()).toEqual([...group.names].sort()));
    const all = defined.flat();
    expect(new Set(all).size).toBe(all.length);
    // completion prints every command: it defines them all (below).
    for (const name of all.filter((n) => n !== 'completion')) {
      expect(groupsFor(['node', 'engine', '--debug', name, '--repo', 'r'])).toEqual([COMMAND_GROUPS.find((g) => g.names.includes(name))]);
    }
    for (const argv of [[], ['--help'], ['help', 'list'], ['frobnicate'], ['completion', 'bash']]) expect(groupsFor(['node', 'engine', ...argv])).toBe(COMMAND_GROUPS);
    // The program's options with a value as the next word: the value is no command.
    const backupGroup = [COMMAND_GROUPS.find((g) => g.names.includes('backup'))];
    expect(groupsFor(['node', 'engine', '--server', 'http://127.0.0.1:8400', '--server-token-file', 'verify', 'backup', '--repo', 'r'])).toEqual(backupGroup);
    expect(groupsFor(['node', 'engine', '--server=http://127.0.0.1:8400', 'backup'])).toEqual(backupGroup);
  });

  test("a command's own help, and a misspelt command's suggestion, are as with every command defined", async () => {
    const own = await runEngine(['prune', '--help']);
    expect(own.code).toBe(0);
    expect(own.stdout).toMatch(/^Usage: engine prune \[options\]/);
    const near = await runEngine(['lsit', '--repo', 'x']);
    expect(near.code).toBe(2);
    expect(near.stderr).toBe("engine: unknown command 'lsit'\n(Did you mean list?)\n");
  });

  test.each([
    [['backup', '--repo', 'x'], 'name at least one disk: --source PATH|URI, --image QCOW2 or --libvirt DOMAIN'],
    [['backup', '--repo', 'x', '--image', 'a.qcow2', '--full', '--incremental'], "option '--full' cannot be used with option '--incremental'"],
    [['frobnicate'], "engine: unknown command 'frobnicate'\n"],
    [['backup', '--repo', 'x', '--source', 'y', '--workers', '0'], '--workers 0: give a whole number from 1 to 64'],
    [['init', 'somewhere', '--block-size', '3M'], 'block size 3145728 is not allowed: it must be a power of two from 64 KiB to 16 MiB'],
    [['init', 'somewhere', '--block-size', 'lots'], '"lots" is not a size'],
  ])('%j is a usage error (exit 2)', async (args, message) => {
    const result = await runEngine(args);
    expect(result.code).toBe(2);
    expect(result.stderr).toContain(message);
  });
});

describe('output', () => {
  test('--json errors are one JSON document on stdout, nothing on stderr', async () => {
    const result = await runEngine(['list', '--repo', join(dir, 'nothing-here'), '--json']);
    expect(result.code).toBe(5);
    expect(result.stderr).toBe('');
    expect(parseJson<{ error: { code: string; message: string } }>(result.stdout).error).toMatchObject({
      code: 'ENGINE_NOT_A_REPOSITORY',
      message: `${join(dir, 'nothing-here')} is not an engine repository: it has no config file`,
    });
  });

  test('--json usage errors are JSON too, with exit 2', async () => {
    const result = await runEngine(['backup', '--repo', repo, '--json']);
    expect(result.code).toBe(2);
    expect(result.stderr).toBe('');
    expect(parseJson<{ error: { code: string; message: string } }>(result.stdout).error).toMatchObject({
      code: 'ENGINE_INVALID_ARGUMENT',
      message: 'name at least one disk: --source PATH|URI, --image QCOW2 or --libvirt DOMAIN',
    });
  });

  test('errors are one line; --debug adds the stack', async () => {
    const plain = await runEngine(['show', '--repo', repo, 'ffff']);
    expect(plain.code).toBe(1);
    expect(plain.stderr).toBe('engine: no backup matches "ffff"\n');
    const debug = await runEngine(['--debug', 'show', '--repo', repo, 'ffff']);
    expect(debug.stderr.split('\n').length).toBeGreaterThan(3);
    expect(debug.stderr).toContain('at ');
  });

  test('backup, list and show agree; every documented field is present', async () => {
    const made = parseJson<BackupJson & Record<string, unknown>>((await runEngine(['backup', '--repo', repo, '--source', image, '--json'])).stdout);
    for (const field of ['id', 'name', 'type', 'parent', 'startTime', 'endTime', 'hostname', 'engineVersion', 'blockSize', 'disks']) expect(made).toHaveProperty(field);
    const disk = made.disks[0]!;
    for (const field of ['name', 'size', 'source', 'bytesRead', 'bytesNew', 'bytesStored', 'blocksTotal', 'blocksZero', 'blocksNew', 'blocksDeduplicated', 'blocksUnchanged', 'durationMs']) {
      expect(disk).toHaveProperty(field);
    }
    expect(disk.blocksZero + disk.blocksNew + disk.blocksDeduplicated + disk.blocksUnchanged).toBe(disk.blocksTotal);
    const listed = parseJson<{ backups: BackupJson[] }>((await runEngine(['list', '--repo', repo, '--json'])).stdout);
    expect(listed.backups.find((b) => b.id === made.id)).toEqual(made);
    const shown = parseJson<BackupJson>((await runEngine(['show', '--repo', repo, made.id.slice(0, 6), '--json'])).stdout);
    expect(shown).toEqual(made);
    const human = await runEngine(['list', '--repo', repo]);
    expect(human.stdout).toContain(made.id.slice(0, 12));
  });

  test('on a terminal, progress is a redrawn bar with rate and ETA on stderr', async () => {
    const big = join(dir, 'tty.img');
    await generateImage(big, 256 * MiB, 'cli-tty');
    // `script` gives the command a pseudo-terminal, as an operator's shell would.
    const transcript = await new Promise<string>((resolve) => {
      execFile('script', ['-qfec', `${process.execPath} ${ENGINE_BIN} backup --repo ${repo} --source ${big} --workers 1`, '/dev/null'], (_e, stdout) => resolve(stdout));
    });
    expect(transcript).toMatch(/\r\x1b\[K\[[#-]{24}\] backup tty\.img \(1\/1\) [\d.]+ [KMG]iB\/256 MiB [\d.]+% [\d.]+ [KMG]iB\/s ETA \d\d:\d\d/);
    expect(transcript).toContain('committed');
  });
});

describe('engine bench', () => {
  test('reports every primitive on every kind of data, as JSON', async () => {
    // Short trials: the same rows, measured less precisely (the default, 400 ms, makes this take 40 s).
    const result = await runEngine(['bench', '--json', '--trial-ms', '20']);
    expect(result.code).toBe(0);
    const { rows } = parseJson<{ rows: { primitive: string; data: string; blockSize: number; trialsMbPerS: number[] }[] }>(result.stdout);
    const primitives = [...new Set(rows.map((r) => r.primitive))];
    expect(primitives).toEqual([
      'SHA-256 (node:crypto)',
      'xxh64 (xxhash-wasm h64Raw)',
      `lz4 compress (${LZ4_IMPLEMENTATION})`,
      `lz4 decompress (${LZ4_IMPLEMENTATION})`,
      'zero check (Buffer.equals)',
      'HMAC-SHA256 (node:crypto)',
      'AES-256-GCM encrypt (node:crypto)',
      'AES-256-GCM decrypt (node:crypto)',
    ]);
    for (const p of primitives) expect(rows.filter((r) => r.primitive === p).map((r) => r.data).sort()).toEqual(['random', 'text', 'zero']);
    for (const r of rows) expect(r.trialsMbPerS).toHaveLength(3);
    const { pipeline } = parseJson<{ pipeline: { workers: number; data: string; mbPerS: number }[] }>(result.stdout);
    expect(pipeline.map((r) => `${r.data}/${r.workers}`)).toEqual(expect.arrayContaining(['random/1', 'random/2', 'text/1', 'text/2']));
    for (const r of pipeline) expect(r.mbPerS).toBeGreaterThan(0);
  });

  test('--trial-ms outside 10..60000 is a usage error', async () => {
    for (const value of ['9', '60001', '1e3']) {
      const result = await runEngine(['bench', '--trial-ms', value]);
      expect(result.code).toBe(2);
      expect(result.stderr).toContain(`--trial-ms ${value}: give a whole number from 10 to 60000, in digits`);
    }
  });
});

describe('interruption', () => {
  test('SIGINT during a backup: exit 130, nothing committed, no temporary file, lock released', async () => {
    const big = join(dir, 'interrupt.img');
    await generateImage(big, 512 * MiB, 'cli-interrupt');
    const before = parseJson<{ backups: unknown[] }>((await runEngine(['list', '--repo', repo, '--json'])).stdout).backups.length;
    const child = spawnEngine(['backup', '--repo', repo, '--source', big, '--workers', '1']);
    let stderr = '';
    child.stderr!.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
    // Running once it holds the repository: the lock (versions 1, 2) or a lease (version 3, the default).
    const v3 = (await hostCacheOf(repo)) !== undefined;
    const holds = async (): Promise<boolean> => (v3 ? (await readdir(join(repo, 'leases')).catch(() => [])).length > 0 : access(join(repo, 'lock')).then(() => true, () => false));
    // Held only once the signal handlers are in place: a SIGINT before them would kill, not interrupt.
    await waitFor('the backup holds the repository', holds, { child, everyMs: 10 });
    await new Promise((r) => setTimeout(r, 200));
    child.kill('SIGINT');
    const { code } = await exitOf(child);
    expect(code).toBe(130);
    expect(stderr).toContain('engine: backup was interrupted (SIGINT); nothing of it was committed');
    expect(parseJson<{ backups: unknown[] }>((await runEngine(['list', '--repo', repo, '--json'])).stdout).backups.length).toBe(before);
    if (v3) {
      expect(await readdir(join(repo, 'leases'))).toEqual([]);
      expect(await hostCacheLeftovers(repo)).toEqual([]);
    } else {
      expect(await readdir(join(repo, 'tmp'))).toEqual([]);
      await expect(access(join(repo, 'lock'))).rejects.toThrow();
    }
    expect((await runEngine(['verify', '--repo', repo])).code).toBe(0);
  });
});
