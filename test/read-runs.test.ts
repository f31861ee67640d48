/**
 * How a backup reads its source (issue 15): adjacent blocks in runs of RUN_BYTES, one large read each, in
 * order of offset, at most RUNS_IN_FLIGHT at once; holes and clean blocks of an incremental break a run and
 * are never read. An NBD export is read at a constant depth instead (BlockSource.depth): single requests of at
 * most its request size, never more bytes in flight than its depth (test/nbd-depth.test.ts: the refill). Every source here is real (a sparse file, a loop device, a qemu-nbd export), wrapped only to
 * record the reads the pipeline asks of it; every backup is restored and compared byte for byte.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { open, truncate } from 'node:fs/promises';
import { join } from 'node:path';
import { backup, listBackups, restore } from '../dist/engine/index.js';
import { FileSource } from '../dist/engine/sources/file-source.js';
import { NBD_DEPTH_BYTES, NbdSource } from '../dist/engine/sources/nbd-source.js';
import { readRun, type BlockSource, type Extent, type ReadDepth } from '../dist/engine/sources/source.js';
import { RUN_BYTES, RUNS_IN_FLIGHT } from '../dist/engine/pipeline/backup-disk.js';
import type { IncrementalPlan } from '../dist/engine/pipeline/backup-disk.js';
import type { BackupRecord } from '../dist/repo-format/backup-record.js';
import type { Range } from '../dist/engine/pipeline/map-cursors.js';
import { filesIdentical, holdLoopDeviceLock, runEngine, sh, sparseFile, tempDir, writeRegion } from './helpers.js';
import { qcow2, qemuIo, qemuNbd } from './qemu.js';

// About the pipeline: its blocks run in the worker pool whatever the disk's size (a small job otherwise runs them on
// the main thread; inline-blocks.test.ts checks the two agree).
process.env.ENGINE_TEST_BLOCK_WORKERS = 'pool';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

let dir: string;
let cleanup: () => Promise<void>;

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-read-runs-'));
});
afterAll(async () => {
  await cleanup();
});

/**
 * A real source, every read the pipeline asks of it recorded: runs in the order asked, single reads (and
 * their ranges), the most runs and the most bytes of single reads in flight at once.
 */
class RecordingSource implements BlockSource {
  readonly runs: Range[] = [];
  readonly reads: Range[] = [];
  singleReads = 0;
  maxInFlight = 0;
  maxBytesInFlight = 0;
  private inFlight = 0;
  private bytesInFlight = 0;

  constructor(
    private readonly inner: BlockSource,
    /** Called once each run (or, for a source read at a depth, each single read) is in, with its index: lets a test change the source mid-backup. */
    private readonly afterRun: (index: number) => Promise<void> = async () => undefined,
  ) {}

  get depth(): ReadDepth | undefined {
    return this.inner.depth;
  }

  get size(): number {
    return this.inner.size;
  }
  get description(): BlockSource['description'] {
    return this.inner.description;
  }
  get defaultName(): string {
    return this.inner.defaultName;
  }
  get extents(): (() => AsyncIterable<Extent>) | undefined {
    return this.inner.extents;
  }

  async read(target: Buffer, offset: number): Promise<void> {
    const index = this.singleReads;
    this.singleReads += 1;
    this.reads.push({ offset, length: target.length });
    this.bytesInFlight += target.length;
    this.maxBytesInFlight = Math.max(this.maxBytesInFlight, this.bytesInFlight);
    try {
      await this.inner.read(target, offset);
    } finally {
      this.bytesInFlight -= target.length;
    }
    if (this.inner.depth) await this.afterRun(index);
  }

  async readRun(targets: readonly Buffer[], offset: number): Promise<void> {
    const index = this.runs.length;
    this.runs.push({ offset, length: targets.reduce((sum, t) => sum + t.length, 0) });
    this.inFlight += 1;
    this.maxInFlight = Math.max(this.maxInFlight, this.inFlight);
    try {
      await readRun(this.inner, targets, offset);
    } finally {
      this.inFlight -= 1;
    }
    await this.afterRun(index);
  }

  close(): Promise<void> {
    return this.inner.close();
  }
  dispose(): Promise<void> {
    return this.inner.dispose();
  }
}

/** The runs a reader must ask for: each range of adjacent blocks to read, cut into pieces of RUN_BYTES. */
function expectedRuns(ranges: Range[]): Range[] {
  const runs: Range[] = [];
  for (const { offset, length } of ranges) {
    for (let at = 0; at < length; at += RUN_BYTES) runs.push({ offset: offset + at, length: Math.min(RUN_BYTES, length - at) });
  }
  return runs;
}

function expectReadAsRuns(source: RecordingSource, ranges: Range[]): void {
  expect(source.singleReads).toBe(0);
  expect(source.runs).toEqual(expectedRuns(ranges));
  expect(source.maxInFlight).toBeGreaterThanOrEqual(1);
  expect(source.maxInFlight).toBeLessThanOrEqual(RUNS_IN_FLIGHT);
}

async function freshRepo(name: string): Promise<string> {
  const repo = join(dir, name);
  const init = await runEngine(['init', repo]);
  expect(init.code).toBe(0);
  return repo;
}

const noSession = { release: async () => undefined, finish: async () => undefined, rollback: async () => undefined };

/** Backs `source` up as disk vda: whole, or (plan) only its dirty blocks against the parent's map. */
async function backupOf(repo: string, source: BlockSource, incremental?: { plan: IncrementalPlan; parent: string }): Promise<BackupRecord> {
  const { record } = await backup({
    repo,
    name: 'vm',
    chain: { mode: incremental ? 'incremental' : 'full' },
    from: {
      kind: 'provider',
      provide: async () => ({
        ...noSession,
        disks: [{ name: 'vda', source, plan: incremental?.plan, mode: incremental ? 'incremental' : 'full', modeReason: null, parent: incremental?.parent ?? null, cbt: null }],
      }),
    },
  });
  return record;
}

async function restoredIdentical(repo: string, record: BackupRecord, original: string, name: string): Promise<boolean> {
  const to = join(dir, name);
  await restore({ repo, backupId: record.id, target: { kind: 'file', path: to } });
  return filesIdentical(original, to);
}

async function* rangesOf(ranges: Range[]): AsyncGenerator<Range> {
  for (const range of ranges) yield range;
}

describe('FileSource.readRun', () => {
  test('fills the targets one after another with the exact bytes, past 2^32, and says where a file that ends early ended', async () => {
    const image = join(dir, 'exact.img');
    const at = 4 * GiB + 3 * MiB + 17; // past 2^32, not aligned
    await sparseFile(image, at + 3 * MiB);
    await writeRegion(image, at, 3 * MiB, 'random', 'exact');
    const expected = Buffer.alloc(3 * MiB);
    const handle = await open(image, 'r');
    await handle.read(expected, 0, expected.length, at);
    await handle.close();
    const source = await FileSource.open(image);
    try {
      const targets = [Buffer.alloc(MiB), Buffer.alloc(5), Buffer.alloc(0), Buffer.alloc(2 * MiB - 5)];
      await source.readRun(targets, at);
      expect(Buffer.concat(targets).equals(expected)).toBe(true);
      await truncate(image, at + MiB);
      const error = await source.readRun([Buffer.alloc(MiB), Buffer.alloc(MiB)], at).catch((e: unknown) => e);
      expect(error).toMatchObject({ code: 'ENGINE_SOURCE_CHANGED' });
      expect(String((error as Error).message)).toContain(`it ended at offset ${at + MiB}`);
    } finally {
      await source.dispose();
    }
  });
});

describe('a backup reads its source in large runs, in order', () => {
  test('a sparse file past 2^32: data in runs of RUN_BYTES, holes unread and breaking runs, bytes restored identical', async () => {
    const repo = await freshRepo('repo-sparse');
    const image = join(dir, 'sparse.img');
    const size = 4 * GiB + 21 * MiB + 4097;
    await sparseFile(image, size);
    const data: Range[] = [
      { offset: 0, length: 19 * MiB },
      { offset: 24 * MiB, length: 3 * MiB },
      { offset: 4 * GiB, length: 21 * MiB + 4097 }, // to the end: the last block is short
    ];
    for (const [i, { offset, length }] of data.entries()) await writeRegion(image, offset, length, i === 1 ? 'zero' : 'random', `sparse${i}`);
    // The zero-filled region is allocated: a file's holes are what is skipped, zeros in data are read (and stored as zeros).
    const source = new RecordingSource(await FileSource.open(image));
    const record = await backupOf(repo, source);
    expectReadAsRuns(source, data);
    expect(record.disks[0]!.stats.bytesRead).toBe(19 * MiB + 3 * MiB + 21 * MiB + 4097);
    expect(record.disks[0]!.stats.blocksZero).toBe(record.disks[0]!.stats.blocksTotal - 19 - 22);
    expect(await restoredIdentical(repo, record, image, 'sparse.restored')).toBe(true);
  });

  test('an incremental reads only the blocks its dirty extents touch, adjacent ones coalesced into runs', async () => {
    const repo = await freshRepo('repo-incremental');
    const image = join(dir, 'incremental.img');
    await sparseFile(image, 40 * MiB);
    await writeRegion(image, 0, 40 * MiB, 'random', 'base');
    const full = await backupOf(repo, new RecordingSource(await FileSource.open(image)));
    // Changes: 10 bytes inside block 1; blocks 3..14 (12 MiB, touched at both ends mid-block); block 39.
    const dirty: Range[] = [
      { offset: MiB + 100, length: 10 },
      { offset: 3 * MiB + 5, length: 12 * MiB - 10 },
      { offset: 39 * MiB, length: MiB },
    ];
    for (const [i, { offset, length }] of dirty.entries()) await writeRegion(image, offset, length, 'random', `changed${i}`);
    const source = new RecordingSource(await FileSource.open(image));
    const map = full.disks[0]!.map;
    const plan: IncrementalPlan = { parent: { root: Buffer.from(map.root, 'hex'), depth: map.depth, blocks: map.blocks }, dirty: rangesOf(dirty) };
    const incremental = await backupOf(repo, source, { plan, parent: full.id });
    expectReadAsRuns(source, [
      { offset: MiB, length: MiB },
      { offset: 3 * MiB, length: 12 * MiB },
      { offset: 39 * MiB, length: MiB },
    ]);
    expect(incremental.disks[0]!.stats.bytesRead).toBe(14 * MiB);
    expect(incremental.disks[0]!.stats.blocksUnchanged).toBe(26);
    expect(await restoredIdentical(repo, incremental, image, 'incremental.restored')).toBe(true);
  });

  test('a loop device (a real block device) is read whole in runs and restored identical', async () => {
    const repo = await freshRepo('repo-loop');
    const backing = join(dir, 'loop-backing.img');
    await sparseFile(backing, 21 * MiB);
    await writeRegion(backing, 0, 21 * MiB, 'text', 'loop');
    const release = await holdLoopDeviceLock();
    const device = (await sh('losetup', ['--find', '--show', backing]).catch(async (error: unknown) => {
      await release();
      throw error;
    })).trim();
    try {
      const source = new RecordingSource(await FileSource.open(device));
      expect(source.description.kind).toBe('block-device');
      const record = await backupOf(repo, source);
      expectReadAsRuns(source, [{ offset: 0, length: 21 * MiB }]);
      expect(record.disks[0]!.stats.bytesRead).toBe(21 * MiB);
      expect(await restoredIdentical(repo, record, backing, 'loop.restored')).toBe(true);
    } finally {
      await sh('losetup', ['-d', device]).finally(release);
    }
  });

  test('a qemu-nbd export: allocated clusters read at a constant depth (requests of 256 KiB, at most 16 MiB in flight), zero clusters unread, restored identical', async () => {
    const repo = await freshRepo('repo-nbd');
    const image = join(dir, 'nbd.qcow2');
    await qcow2(image, '48M');
    await qemuIo(image, ['write -P 0x5a 0 10M', 'write -P 0xa5 16M 9M', 'write -P 0x33 40M 8M']);
    const raw = join(dir, 'nbd.raw');
    await sh('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', image, raw]);
    const server = await qemuNbd(image, dir);
    try {
      const source = new RecordingSource(await NbdSource.open(server.uri));
      const record = await backupOf(repo, source);
      expect(source.runs).toEqual([]);
      // Every allocated byte once, in requests of 256 KiB (qemu-nbd's maximum is 32 MiB), in order of offset as sent.
      const expected: Range[] = [];
      for (const { offset, length } of [{ offset: 0, length: 10 * MiB }, { offset: 16 * MiB, length: 9 * MiB }, { offset: 40 * MiB, length: 8 * MiB }]) {
        for (let at = 0; at < length; at += 256 * 1024) expected.push({ offset: offset + at, length: 256 * 1024 });
      }
      expect(source.reads).toEqual(expected);
      // A block's four requests are all sent before any reply can land; never more than the depth.
      expect(source.maxBytesInFlight).toBeGreaterThanOrEqual(MiB);
      expect(source.maxBytesInFlight).toBeLessThanOrEqual(NBD_DEPTH_BYTES);
      expect(record.disks[0]!.stats.bytesRead).toBe(27 * MiB);
      expect(await restoredIdentical(repo, record, raw, 'nbd.restored')).toBe(true);
    } finally {
      await server.stop();
    }
  });
});

describe('a source that fails while it is read', () => {
  test('a file that shrinks after its first run: ENGINE_SOURCE_CHANGED, nothing committed', async () => {
    const repo = await freshRepo('repo-shrink');
    const image = join(dir, 'shrink.img');
    await sparseFile(image, 64 * MiB);
    await writeRegion(image, 0, 64 * MiB, 'random', 'shrink');
    const source = new RecordingSource(await FileSource.open(image), async (index) => {
      if (index === 0) await truncate(image, 20 * MiB);
    });
    await expect(backupOf(repo, source)).rejects.toMatchObject({ code: 'ENGINE_SOURCE_CHANGED' });
    expect(source.runs.length).toBeGreaterThan(1);
    expect((await listBackups(repo)).backups).toHaveLength(0);
  });

  test('an NBD server that goes away mid-backup: a clear NBD error, nothing committed', async () => {
    const repo = await freshRepo('repo-nbd-gone');
    const image = join(dir, 'gone.qcow2');
    await qcow2(image, '64M');
    await qemuIo(image, ['write -P 0x77 0 64M']);
    const server = await qemuNbd(image, dir);
    const source = new RecordingSource(await NbdSource.open(server.uri), async (index) => {
      if (index === 0) await server.stop();
    });
    const error = await backupOf(repo, source).catch((e: unknown) => e);
    expect(error).toMatchObject({ code: expect.stringMatching(/^ENGINE_NBD_/) });
    expect((await listBackups(repo)).backups).toHaveLength(0);
  });
});
