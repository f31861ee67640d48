/**
 * Every error code belongs to the layer that raises it, and is documented: SPEC.md 14.3's table lists each
 * code once with its layer and exit code, exactly as repo-format/errors.ts, engine/errors.ts and
 * cli/exit-codes.ts have them; the storage layer names no code of the engine's. And the failures that used
 * to surface as bare Errors (ENGINE_INTERNAL) carry their own codes: a missing tool names its Debian
 * package, a tool's output that is not JSON, a block device whose size cannot be read, a damaged mount
 * state or journal.
 */
import { describe, expect, test } from 'vitest';
import { mkdir, readdir, readFile, realpath, writeFile } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { ENGINE_EXITS, EXIT, exitCodeFor, STORAGE_EXITS } from '../dist/cli/exit-codes.js';
import { EngineError } from '../dist/repo-format/errors.js';
import { SourceUnreadableError } from '../dist/engine/errors.js';
import { notInstalled, runTool, runToolJson } from '../dist/engine/cbt/run-tool.js';
import { blockDeviceSize } from '../dist/engine/sources/device-size.js';
import { umount } from '../dist/engine/mount/mount.js';
import { Journal } from '../dist/repo-format/journal.js';
import { tempDir } from './helpers.js';

const root = fileURLToPath(new URL('..', import.meta.url));

/** SPEC.md 14.3's rows: code → layer (its first word) and exit code. */
async function specTable(): Promise<Map<string, { layer: string; exit: number }>> {
  const spec = await readFile(join(root, 'SPEC.md'), 'utf8');
  const section = spec.slice(spec.indexOf('### 14.3 Error codes'), spec.indexOf('### 14.4'));
  const rows = new Map<string, { layer: string; exit: number }>();
  for (const match of section.matchAll(/^\| `(ENGINE_[A-Z_]+)` \| ([a-z-]+)[^|]* \| (\d+) \|/gm)) {
    expect(rows.has(match[1]!), `${match[1]} listed twice`).toBe(false);
    rows.set(match[1]!, { layer: match[2]!, exit: Number(match[3]) });
  }
  return rows;
}

async function sourceFiles(dir: string): Promise<string[]> {
  const entries = await readdir(join(root, dir), { withFileTypes: true, recursive: true });
  return entries.filter((e) => e.isFile() && e.name.endsWith('.ts')).map((e) => join(e.parentPath, e.name));
}

describe('error codes by layer', () => {
  test("SPEC.md 14.3 lists every code once, with the layer that owns it and the CLI's exit code", async () => {
    const table = await specTable();
    const expected = new Map<string, { layer: string; exit: number }>([
      ...Object.entries(STORAGE_EXITS).map(([code, exit]) => [code, { layer: 'repo-format', exit }] as const),
      ...Object.entries(ENGINE_EXITS).map(([code, exit]) => [code, { layer: 'engine', exit }] as const),
    ]);
    expect(Object.fromEntries(table)).toEqual(Object.fromEntries(expected));
    for (const [code, { exit }] of expected) expect(exitCodeFor(code as never)).toBe(exit);
    expect(exitCodeFor(undefined)).toBe(EXIT.failed);
  });

  test('the storage layer names no code of the engine layer (NBD, oVirt, tools, sources, targets)', async () => {
    const engineCodes = Object.keys(ENGINE_EXITS);
    expect(engineCodes).toContain('ENGINE_NBD_PROTOCOL');
    expect(engineCodes).toContain('ENGINE_OVIRT_FAULT');
    const offending: string[] = [];
    for (const file of await sourceFiles('repo-format')) {
      const source = await readFile(file, 'utf8');
      for (const code of engineCodes) if (new RegExp(`\\b${code}\\b`).test(source)) offending.push(`${file}: ${code}`);
    }
    expect(offending).toEqual([]);
  });

  test('every code raised anywhere in engine/, cli/ and repo-format/ is one of the table', async () => {
    const known = new Set([...Object.keys(STORAGE_EXITS), ...Object.keys(ENGINE_EXITS)]);
    const unknown: string[] = [];
    for (const file of [...(await sourceFiles('engine')), ...(await sourceFiles('cli')), ...(await sourceFiles('repo-format'))]) {
      const source = await readFile(file, 'utf8');
      for (const match of source.matchAll(/'(ENGINE_[A-Z_]+)'/g)) if (!known.has(match[1]!)) unknown.push(`${file}: ${match[1]}`);
    }
    // Environment variables share the prefix; they are not codes.
    expect(unknown.filter((u) => !/ENGINE_(REPO|RUN_DIR|PASSWORD|PASSWORD_FILE|FAIL_AT|OVIRT_CONFLICT_RETRIES|OVIRT_CONFLICT_DELAY_MS)$/.test(u))).toEqual([]);
  });
});

describe('runTool', () => {
  test('a tool that is not installed names the Debian package that provides it', async () => {
    expect(notInstalled('losetup')).toBe('losetup is not installed (Debian: apt-get install mount)');
    expect(notInstalled('mount')).toContain('apt-get install mount');
    expect(notInstalled('umount')).toContain('apt-get install mount');
    expect(notInstalled('blkid')).toContain('apt-get install util-linux');
    expect(notInstalled('qemu-img')).toContain('apt-get install qemu-utils');
    expect(notInstalled('qemu-nbd')).toContain('apt-get install qemu-utils');
    expect(notInstalled('nbdfuse')).toContain('apt-get install libnbd-bin');
    expect(notInstalled('virsh')).toContain('apt-get install libvirt-clients');
    expect(notInstalled('no-such-tool')).toBe('no-such-tool is not installed (it is not on PATH)');
    const { path: empty, cleanup } = await tempDir('engine-no-tools-');
    const saved = process.env.PATH;
    process.env.PATH = empty;
    try {
      for (const [tool, pkg] of [['losetup', 'mount'], ['qemu-img', 'qemu-utils'], ['mount', 'mount']]) {
        await expect(runTool(tool!, ['--version'])).rejects.toMatchObject({ code: 'ENGINE_TOOL_FAILED', message: expect.stringContaining(`(Debian: apt-get install ${pkg})`) });
      }
    } finally {
      process.env.PATH = saved;
      await cleanup();
    }
  });

  test('a tool whose answer is not JSON fails with ENGINE_TOOL_FAILED, not a SyntaxError', async () => {
    await expect(runToolJson('echo', ['{not json'])).rejects.toMatchObject({ code: 'ENGINE_TOOL_FAILED', message: expect.stringContaining('its output is not JSON') });
    await expect(runToolJson('echo', ['{"required": 1}'])).resolves.toEqual({ required: 1 });
  });
});

describe('failures that were bare Errors', () => {
  test("a block device whose size sysfs cannot tell is the caller's error (an unreadable source)", async () => {
    // Major 4095, minor 0 (major in bits 8..19 of dev_t): no such block device in sysfs.
    const rdev = 4095 * 256;
    await expect(blockDeviceSize(rdev, (why) => new SourceUnreadableError('/dev/x', why))).rejects.toMatchObject({ code: 'ENGINE_SOURCE_UNREADABLE', message: expect.stringContaining('/sys/dev/block/') });
  });

  test('a damaged mount state is ENGINE_CORRUPT_METADATA naming the file, not a TypeError half-way through umount', async () => {
    const { path: dir, cleanup } = await tempDir('engine-mount-state-');
    try {
      const runDir = join(dir, 'run');
      const mountDir = join(dir, 'mnt');
      await mkdir(mountDir);
      const stateDir = join(runDir, 'mounts', createHash('sha256').update(await realpath(mountDir)).digest('hex').slice(0, 16));
      await mkdir(stateDir, { recursive: true });
      for (const state of ['{"version":1,', 'null', '{"version":1,"dir":"/x","repo":"/r","mounts":[3],"loops":[],"dirs":[],"fuse":[]}', '{"version":1,"dir":"/x","repo":"/r","mounts":[],"loops":[],"dirs":[],"fuse":[{"pid":"1"}]}']) {
        await writeFile(join(stateDir, 'state.json'), state);
        await expect(umount({ dir: mountDir, runDir })).rejects.toMatchObject({ code: 'ENGINE_CORRUPT_METADATA', message: expect.stringContaining('state.json') });
      }
    } finally {
      await cleanup();
    }
  });

  test('a journal that parses but lacks its entries is ENGINE_CORRUPT_METADATA, like one that does not parse', async () => {
    const { path: repo, cleanup } = await tempDir('engine-journal-');
    try {
      await mkdir(join(repo, 'journal'));
      for (const content of ['{}', '{"created":"2026-01-01T00:00:00Z","entries":[null]}', '{"created":"2026-01-01T00:00:00Z","entries":{}}', '[']) {
        await writeFile(join(repo, 'journal', '0123456789abcdef.json'), content);
        const error = await Journal.list(repo).catch((e: unknown) => e);
        expect(error).toBeInstanceOf(EngineError);
        expect((error as EngineError).code).toBe('ENGINE_CORRUPT_METADATA');
      }
    } finally {
      await cleanup();
    }
  });
});
