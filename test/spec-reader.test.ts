/**
 * The claim "a reader written from SPEC.md alone restores every backup byte for byte", tested with such a
 * reader (test/spec-reader/: node built-ins only, written from SPEC.md without reading the engine's code):
 * - every disk of every backup of every golden repository (formats 1, 2 and 3, plain and encrypted) against
 *   the sha256 in its expected.json;
 * - damage the reader must refuse (a flipped pack byte, a flipped segment byte, a wrong passphrase), so that
 *   the checks above cannot pass by reading nothing;
 * - a fresh format-3 folder written now by two `engine backup` processes at once from images that share
 *   data (past 2^32 too), restored by the reader and compared with `cmp`;
 * - the same on S3 (a real Ceph RGW, test/rgw.ts): the objects under the prefix copied to a folder with the
 *   keys as relative paths (SPEC 19.2, 20.2), then read by the reader.
 */
import { execFile, spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import { cpSync, createReadStream, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync, chmodSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Repository, SpecReaderError } from './spec-reader/reader.js';
import { lz4BlockDecode } from './spec-reader/lz4.js';
import { xxh64 } from './spec-reader/xxh64.js';
import { copyPrefixToFolder } from './spec-reader/s3-copy.js';
import { startRgwCluster, type RgwCluster } from './rgw.js';
import { createBucket, rgwEnv } from './s3-helpers.js';

const run = promisify(execFile);
const here = dirname(fileURLToPath(import.meta.url));
const ENGINE = join(here, '..', 'bin', 'engine');
const FIXTURES = join(here, 'fixtures');
// Every golden repository in test/fixtures (as test/fixtures.test.ts reads them): none can be left out.
const GOLDEN = readdirSync(FIXTURES, { withFileTypes: true })
  .filter((entry) => entry.isDirectory())
  .map((entry) => entry.name)
  .sort();
const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

interface Expected {
  passphrase?: string;
  /** The depth of every map of the fixture, where its script made it for that (make-deep-map-fixture.sh). */
  mapDepth?: number;
  /** Records made by engine copy (make-copy-fixture.sh): two backups, one data and one map pack each. */
  copies?: boolean;
  restores: Array<{ id: string; disk: string; sha256: string }>;
}

function sha256File(path: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    createReadStream(path)
      .on('data', (chunk) => hash.update(chunk))
      .on('error', reject)
      .on('end', () => resolve(hash.digest('hex')));
  });
}

function codeOf(fn: () => unknown): string {
  try {
    fn();
  } catch (error) {
    return error instanceof SpecReaderError ? error.code : `not a reader error: ${(error as Error).message}`;
  }
  return 'no error';
}

// Made when a test of the file runs (a run that skips them all leaves nothing behind).
let scratch = '';
beforeAll(() => {
  scratch = mkdtempSync(join(tmpdir(), 'spec-reader-test-'));
});
afterAll(() => {
  if (scratch !== '') rmSync(scratch, { recursive: true, force: true });
});

describe('the primitives, against published values', () => {
  it('xxh64 (seed 0) of the xxHash reference strings', () => {
    expect(xxh64(Buffer.alloc(0)).toString(16)).toBe('ef46db3751d8e999');
    expect(xxh64(Buffer.from('a')).toString(16)).toBe('d24ec4f1a98c6e5b');
    expect(xxh64(Buffer.from('abc')).toString(16)).toBe('44bc2cf5ad770999');
  });

  it('an LZ4 block with an overlapping match, and one that claims more than its prefix', () => {
    // token 0x1f: 1 literal 'a', match length 15+4+... (extension byte 1 -> 20), offset 1: 21 bytes of 'a';
    // then the last sequence: token 0x10, 1 literal 'b'.
    const block = Buffer.from([0x1f, 0x61, 0x01, 0x00, 0x01, 0x10, 0x62]);
    expect(lz4BlockDecode(block, 22).toString()).toBe('a'.repeat(21) + 'b');
    expect(() => lz4BlockDecode(block, 21)).toThrow(/longer than the size prefix/);
  });
});

/** Restores every disk of every backup of `repoDir` with the reader and checks each against expected.json. */
async function restoreGolden(repoDir: string, expected: Expected, source: 'segments' | 'pack-walk', label: string): Promise<number> {
  const repo = Repository.open(repoDir, expected.passphrase !== undefined ? { passphrase: expected.passphrase } : {});
  try {
    expect(repo.report.source).toBe(source);
    const backups = repo.listBackups();
    expect(backups.map((b) => b.id).sort()).toEqual([...new Set(expected.restores.map((r) => r.id))].sort());
    let restored = 0;
    for (const backup of backups) {
      for (const disk of backup.disks) {
        const want = expected.restores.find((r) => r.id === backup.id && r.disk === disk.name);
        expect(want, `${backup.id} ${disk.name} in expected.json`).toBeDefined();
        if (expected.mapDepth !== undefined) expect(disk.map.depth).toBe(expected.mapDepth);
        const out = join(scratch, `${label}-${backup.id}-${disk.name}`);
        const result = repo.restoreDisk(backup, disk.name, out);
        expect(result.chunksRead + result.zeroBlocks).toBe(disk.map.blocks);
        expect(await sha256File(out)).toBe(want!.sha256);
        rmSync(out);
        restored++;
      }
    }
    return restored;
  } finally {
    repo.close();
  }
}

const expectedOf = (name: string): Expected => JSON.parse(readFileSync(join(FIXTURES, name, 'expected.json'), 'utf8')) as Expected;

describe('golden repositories, every disk of every backup', () => {
  for (const name of GOLDEN) {
    it(name, async () => {
      const expected = expectedOf(name);
      const restored = await restoreGolden(join(FIXTURES, name, 'repo'), expected, name.startsWith('v3') ? 'segments' : 'pack-walk', name);
      expect(restored).toBe(expected.restores.length);
    });
  }
});

describe('golden repositories of format 1 and 2 after `engine migrate` (SPEC 19.11): read through its segments', () => {
  for (const name of GOLDEN.filter((n) => !n.startsWith('v3'))) {
    it(name, async () => {
      const expected = expectedOf(name);
      const dir = join(scratch, `migrated-${name}`);
      cpSync(join(FIXTURES, name, 'repo'), dir, { recursive: true });
      const env: Record<string, string> = { ENGINE_CACHE_DIR: join(scratch, `migrate-cache-${name}`), ...(expected.passphrase !== undefined ? { ENGINE_PASSWORD: expected.passphrase } : {}) };
      const migrate = await engine(['migrate', dir, '--json'], env);
      expect(migrate.code, migrate.stderr).toBe(0);
      expect((JSON.parse(readFileSync(join(dir, 'config'), 'utf8')) as { version: number }).version).toBe(3);
      const restored = await restoreGolden(dir, expected, 'segments', `migrated-${name}`);
      expect(restored).toBe(expected.restores.length);
    });
  }
});

describe('damage the reader refuses', () => {
  const copyOf = (name: string): string => {
    const dir = join(scratch, `damaged-${name}-${Math.random().toString(16).slice(2)}`);
    cpSync(join(FIXTURES, name, 'repo'), dir, { recursive: true });
    return dir;
  };
  const firstFile = (dir: string): string => {
    for (const entry of readdirSync(dir, { withFileTypes: true, recursive: true })) if (entry.isFile()) return join(entry.parentPath, entry.name);
    throw new Error(`no file under ${dir}`);
  };
  const flip = (path: string, offset: number): void => {
    chmodSync(path, 0o600);
    const bytes = readFileSync(path);
    bytes[offset] = (bytes[offset] as number) ^ 0xff;
    writeFileSync(path, bytes);
  };
  const restoreAll = (repo: Repository): void => {
    for (const backup of repo.listBackups()) for (const disk of backup.disks) repo.restoreDisk(backup, disk.name, join(scratch, 'damaged-out'));
  };

  for (const name of GOLDEN) {
    it(`${name}: a flipped byte in the last frame of each pack is ENGINE_CORRUPT_FRAME`, () => {
      const expected = JSON.parse(readFileSync(join(FIXTURES, name, 'expected.json'), 'utf8')) as Expected;
      const options = expected.passphrase !== undefined ? { passphrase: expected.passphrase } : {};
      const dir = copyOf(name);
      const packs = readdirSync(join(dir, 'packs'), { recursive: true, withFileTypes: true }).filter((e) => e.isFile());
      // 8 packs in make-fixture.sh's repositories, 4 in make-deep-map-fixture.sh's and make-copy-fixture.sh's: never none.
      expect(packs.length).toBe(expected.mapDepth !== undefined || expected.copies === true ? 4 : 8);
      for (const pack of packs) {
        const path = join(pack.parentPath, pack.name);
        flip(path, statSync(path).size - 20); // inside the last frame's payload (or its checksum)
        const repo = Repository.open(dir, options);
        expect(codeOf(() => restoreAll(repo))).toBe('ENGINE_CORRUPT_FRAME');
        repo.close();
        flip(path, statSync(path).size - 20);
      }
      const repo = Repository.open(dir, options);
      expect(repo.report.damage).toEqual([]);
      expect(codeOf(() => restoreAll(repo))).toBe('no error');
      repo.close();
    });
  }

  it('a flipped byte in a segment: ENGINE_CORRUPT_METADATA (plain: checksum; encrypted: tag)', () => {
    for (const [name, passphrase] of [['v3-9dd22da', undefined], ['v3-9dd22da-encrypted', 'golden-fixture-passphrase']] as const) {
      const dir = copyOf(name);
      flip(firstFile(join(dir, 'index')), 50);
      expect(codeOf(() => Repository.open(dir, passphrase !== undefined ? { passphrase } : {}))).toBe('ENGINE_CORRUPT_METADATA');
    }
  });

  it('a wrong passphrase: ENGINE_WRONG_PASSPHRASE (formats 2 and 3)', () => {
    for (const name of ['v2-21ba75d', 'v3-9dd22da-encrypted']) {
      expect(codeOf(() => Repository.open(join(FIXTURES, name, 'repo'), { passphrase: 'golden-fixture-passphrasE' }))).toBe('ENGINE_WRONG_PASSPHRASE');
    }
  });
});

/**
 * Two images sharing data: the same random 8 MiB at offset 0 and past 2^32, each with data of its own, and
 * a short last block (sizes not multiples of the 1 MiB default block).
 */
async function makeImages(dir: string): Promise<{ a: string; b: string }> {
  const shared = join(dir, 'shared.bin');
  await run('dd', ['if=/dev/urandom', `of=${shared}`, 'bs=1M', 'count=8', 'status=none']);
  const a = join(dir, 'a.img');
  const b = join(dir, 'b.img');
  const sizeA = 4 * GiB + 512 * MiB + 12345;
  const sizeB = 4 * GiB + 256 * MiB + 777;
  await run('qemu-img', ['create', '-q', '-f', 'raw', a, String(sizeA)]);
  await run('qemu-img', ['create', '-q', '-f', 'raw', b, String(sizeB)]);
  for (const image of [a, b]) {
    await run('dd', [`if=${shared}`, `of=${image}`, 'bs=1M', 'conv=notrunc', 'status=none']);
    await run('dd', [`if=${shared}`, `of=${image}`, 'bs=1M', `seek=${4 * 1024 + 1}`, 'conv=notrunc', 'status=none']);
  }
  await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x11 ${16 * MiB} ${3 * MiB}`, '-c', `write -P 0x22 ${sizeA - 12345} 12345`, '-c', `write -P 0x44 ${4 * GiB - 65536} 131072`, a]);
  await run('qemu-io', ['-f', 'raw', '-c', `write -P 0x33 ${100 * MiB} ${2 * MiB}`, '-c', `write -P 0x55 ${sizeB - 777} 777`, b]);
  await run('dd', ['if=/dev/urandom', `of=${b}`, 'bs=1M', 'seek=200', 'count=2', 'conv=notrunc', 'status=none']);
  return { a, b };
}

function engine(args: string[], env: Record<string, string>): Promise<{ code: number; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    const child = spawn(ENGINE, args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d: Buffer) => (stdout += d.toString()));
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.on('error', reject);
    child.on('close', (code) => resolve({ code: code ?? -1, stdout, stderr }));
  });
}

async function backUpConcurrently(repo: string, images: { a: string; b: string }, env: Record<string, string>): Promise<string[]> {
  const runs = await Promise.all([
    engine(['backup', '--repo', repo, '--source', images.a, '--name', 'spec-reader-a', '--json'], env),
    engine(['backup', '--repo', repo, '--source', images.b, '--name', 'spec-reader-b', '--json'], env),
  ]);
  return runs.map((r) => {
    expect(r.code, r.stderr).toBe(0);
    const id = (JSON.parse(r.stdout) as { id: string }).id;
    expect(id).toMatch(/^[0-9a-f]{32}$/);
    return id;
  });
}

/** Restores every disk of every backup with the reader and compares each with its source image (`cmp`). */
async function restoreAndCompare(repoDir: string, sources: Map<string, string>, options: { passphrase?: string } = {}): Promise<number> {
  const repo = Repository.open(repoDir, options);
  let compared = 0;
  try {
    expect(repo.report.source).toBe('segments');
    const backups = repo.listBackups();
    expect(backups.length).toBe(sources.size);
    for (const backup of backups) {
      expect(backup.disks.length).toBe(1);
      const disk = backup.disks[0]!;
      const out = join(scratch, `restored-${backup.id}`);
      repo.restoreDisk(backup, disk.name, out);
      const source = sources.get(backup.id);
      expect(source).toBeDefined();
      expect(statSync(out).size).toBe(statSync(source!).size);
      // Rejects on any difference. Not cmp: it reads every byte of the holes of these 4.5 GiB sparse images
      // (~15 CPU-s each); qemu-img compare finds them with SEEK_DATA and compares every other byte (the
      // lengths are equal, just checked; a hole and written zeros are the same content, as for cmp).
      await run('qemu-img', ['compare', '-q', '-f', 'raw', '-F', 'raw', out, source!]);
      rmSync(out);
      compared++;
    }
  } finally {
    repo.close();
  }
  return compared;
}

describe('a fresh format-3 folder, two backups at once', () => {
  let images: { a: string; b: string };
  beforeAll(async () => {
    images = await makeImages(scratch);
  }, 300_000);

  for (const encrypted of [false, true]) {
    it(encrypted ? 'encrypted' : 'plain', async () => {
      const passphrase = 'spec-reader-passphrase';
      const env: Record<string, string> = { ENGINE_CACHE_DIR: join(scratch, `cache-${encrypted}`), ...(encrypted ? { ENGINE_PASSWORD: passphrase } : {}) };
      const repo = join(scratch, `repo-v3-${encrypted ? 'encrypted' : 'plain'}`);
      const init = await engine(['init', '--format', '3', repo, ...(encrypted ? ['--encrypt'] : [])], env);
      expect(init.code, init.stderr).toBe(0);
      const [idA, idB] = await backUpConcurrently(repo, images, env);
      // Two writers: at least two segments, each named by its own writer id (SPEC 19.3).
      const segments = readdirSync(join(repo, 'index'));
      expect(new Set(segments.map((s) => s.slice(0, 32))).size).toBeGreaterThanOrEqual(2);
      const compared = await restoreAndCompare(repo, new Map([[idA!, images.a], [idB!, images.b]]), encrypted ? { passphrase } : {});
      expect(compared).toBe(2);
      if (encrypted) return;

      // gc after forgetting one backup: its switch segment supersedes every segment present (SPEC 19.8).
      // The old segments are then put back, as a gc cut after its switch leaves them (19.8's crash table):
      // they name packs gc deleted, so a reader that did not honour supersession would fail here.
      const saved = join(scratch, 'index-before-gc');
      cpSync(join(repo, 'index'), saved, { recursive: true });
      const forget = await engine(['forget', '--repo', repo, idA!, '--json'], env);
      expect(forget.code, forget.stderr).toBe(0);
      const gc = await engine(['gc', '--repo', repo, '--json'], env);
      expect(gc.code, gc.stderr).toBe(0);
      const report = JSON.parse(gc.stdout) as { packs: { deleted: string[] }; segments: { written: number; deleted: number } };
      expect(report.packs.deleted.length).toBeGreaterThan(0);
      expect(report.segments.deleted).toBe(segments.length);
      cpSync(saved, join(repo, 'index'), { recursive: true });
      const reopened = Repository.open(repo);
      expect(reopened.report.segmentsSuperseded).toBe(segments.length);
      expect(reopened.report.segmentsEffective).toBe(report.segments.written);
      reopened.close();
      expect(await restoreAndCompare(repo, new Map([[idB!, images.b]]))).toBe(1);
    }, 600_000);
  }
});

describe('format 3 on S3 (a real Ceph RGW): the objects copied to a folder, keys as paths', () => {
  let cluster: RgwCluster;
  let images: { a: string; b: string };
  beforeAll(async () => {
    const dir = join(scratch, 's3-images');
    mkdirSync(dir);
    [cluster, images] = await Promise.all([startRgwCluster(), makeImages(dir)]);
  }, 300_000);
  afterAll(async () => {
    await cluster?.stop();
  });

  for (const encrypted of [false, true]) {
    it(encrypted ? 'encrypted' : 'plain', async () => {
      const bucket = `spec-reader-${encrypted ? 'enc' : 'plain'}`;
      const prefix = 'nightly/vms';
      await createBucket(cluster, bucket);
      const passphrase = 'spec-reader-passphrase';
      const env: Record<string, string> = {
        ...rgwEnv(cluster, scratch),
        ENGINE_CACHE_DIR: join(scratch, `s3-cache-${encrypted}`),
        ...(encrypted ? { ENGINE_PASSWORD: passphrase } : {}),
      };
      const url = `s3://${bucket}/${prefix}`;
      const init = await engine(['init', url, ...(encrypted ? ['--encrypt'] : [])], env);
      expect(init.code, init.stderr).toBe(0);
      const [idA, idB] = await backUpConcurrently(url, images, env);
      const folder = join(scratch, `s3-copy-${encrypted}`);
      const access = { endpoint: cluster.endpoint, region: cluster.region, accessKeyId: cluster.user.accessKeyId, secretAccessKey: cluster.user.secretAccessKey };
      const keys = await copyPrefixToFolder(access, bucket, prefix, folder);
      expect(keys).toContain('config');
      expect(keys.filter((k) => /^backups\/[0-9a-f]{32}$/.test(k)).length).toBe(2);
      expect(keys.filter((k) => /^index\/[0-9a-f]{32}-[0-9a-f]{8}$/.test(k)).length).toBeGreaterThanOrEqual(2);
      expect(keys.filter((k) => k.startsWith('leases/'))).toEqual([]); // both backups ended and deleted theirs
      const compared = await restoreAndCompare(folder, new Map([[idA!, images.a], [idB!, images.b]]), encrypted ? { passphrase } : {});
      expect(compared).toBe(2);
    }, 600_000);
  }
});
