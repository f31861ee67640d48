/**
 * The chain decisions of changed-block tracking, as pure logic (no root, no qemu): chooseChain given the
 * VM's records and the base's state (a qcow2 image's bitmaps through bitmapProblem and imageIdentity, or a
 * libvirt-like checkpoint check), and settleChain given an in-memory parent map, source and chunk
 * availability. Each case asserts the mode and the reason a user reads. One case asks real qemu-img: the
 * granularity it gives a bitmap added with no -g, against defaultGranularity.
 */
import { describe, expect, test } from 'vitest';
import { createHash } from 'node:crypto';
import { chooseChain, NO_EARLIER_BACKUP, settleChain, touchedBytes, type Chain, type ChainFacts } from '../dist/engine/cbt/chain.js';
import { bitmapProblem, imageIdentity } from '../dist/engine/cbt/image-disk.js';
import { join } from 'node:path';
import { bitmapName, defaultGranularity, imageInfo } from '../dist/engine/cbt/qcow2-bitmaps.js';
import { MapBuilder, type MapRoot } from '../dist/repo-format/block-map.js';
import { ID_SIZE, ZERO_ID } from '../dist/repo-format/constants.js';
import type { BackupRecord, DiskCbt, DiskRecord } from '../dist/repo-format/backup-record.js';
import type { BlockSource } from '../dist/engine/sources/source.js';
import type { Range } from '../dist/engine/pipeline/map-cursors.js';
import { sh, tempDir } from './helpers.js';

const GiB = 1024 ** 3;
const REPO = 'a1b2c3d4e5f60718293a4b5c6d7e8f90';
const idOf = (n: number): string => n.toString(16).padStart(32, '0');

function cbtOf(backup: string, chainFull: string, granularity = 65536): DiskCbt {
  return { checkpoint: bitmapName(REPO, backup), base: null, chainFull, chainCheckpoint: bitmapName(REPO, chainFull), granularity, audited: 0 };
}

function disk(name: string, size: number, cbt: DiskCbt | null, extra: Partial<DiskRecord> = {}): DiskRecord {
  return {
    name,
    size,
    source: { kind: 'qcow2-image', path: `/images/${name}.qcow2`, realPath: `/images/${name}.qcow2` },
    mode: 'full',
    modeReason: null,
    parent: null,
    cbt,
    map: { root: '00'.repeat(ID_SIZE), depth: 0, blocks: 0 },
    stats: { bytesRead: 0, bytesNew: 0, bytesStored: 0, blocksTotal: 0, blocksZero: 0, blocksNew: 0, blocksDeduplicated: 0, blocksUnchanged: 0, durationMs: 0 },
    ...extra,
  };
}

function record(n: number, disks: DiskRecord[], name = 'vm'): BackupRecord {
  return {
    version: 1,
    id: idOf(n),
    name,
    type: 'full',
    parent: null,
    startTime: new Date(Date.UTC(2026, 0, n)).toISOString(),
    endTime: new Date(Date.UTC(2026, 0, n, 1)).toISOString(),
    hostname: 'host',
    engineVersion: '0.1.0',
    blockSize: 65536,
    disks,
    attachments: [],
  };
}

/** A chain of three backups of disk sda, newest first: full 1, incremental 2, incremental 3. */
function history(size = 10 * GiB): BackupRecord[] {
  const full = record(1, [disk('sda', size, cbtOf(idOf(1), idOf(1)))]);
  const inc2 = record(2, [disk('sda', size, { ...cbtOf(idOf(2), idOf(1)), base: bitmapName(REPO, idOf(1)) })]);
  const inc3 = record(3, [disk('sda', size, { ...cbtOf(idOf(3), idOf(1)), base: bitmapName(REPO, idOf(2)) })]);
  return [inc3, inc2, full];
}

const trusted: ChainFacts['baseProblem'] = () => null;

describe('chooseChain', () => {
  test('full when asked, whatever the history', () => {
    const chain = chooseChain('sda', 'full', { size: 10 * GiB, baseProblem: trusted }, history());
    expect(chain).toEqual({ mode: 'full', reason: null, base: null, parent: null, previous: null });
  });

  test('incremental (and auto): against the newest backup of the disk, reading its checkpoint', () => {
    const h = history();
    for (const requested of ['incremental', 'auto'] as const) {
      const chain = chooseChain('sda', requested, { size: 10 * GiB, baseProblem: trusted }, h);
      expect(chain.mode).toBe('incremental');
      expect(chain.reason).toBeNull();
      expect(chain.base).toBe(bitmapName(REPO, idOf(3)));
      expect(chain.parent?.record.id).toBe(idOf(3));
      expect(chain.previous).toBe(h[0]!.disks[0]);
    }
  });

  test('differential: against the chain full backup, reading the chain checkpoint', () => {
    const chain = chooseChain('sda', 'differential', { size: 10 * GiB, baseProblem: trusted }, history());
    expect(chain.mode).toBe('differential');
    expect(chain.base).toBe(bitmapName(REPO, idOf(1)));
    expect(chain.parent?.record.id).toBe(idOf(1));
  });

  test('the first backup of a disk: full, with the expected reason; a disk added since says so', () => {
    expect(chooseChain('sda', 'incremental', { size: GiB, baseProblem: trusted }, []).reason).toBe(NO_EARLIER_BACKUP);
    const added = chooseChain('sdb', 'incremental', { size: GiB, baseProblem: trusted, addedDisk: true }, history());
    expect(added).toMatchObject({ mode: 'full', reason: `${NO_EARLIER_BACKUP} (a disk added since the last backup)` });
    // addedDisk with no history at all is simply the first backup.
    expect(chooseChain('sdb', 'incremental', { size: GiB, baseProblem: trusted, addedDisk: true }, []).reason).toBe(NO_EARLIER_BACKUP);
  });

  test('backups of the disk without changed-block tracking are passed over; none with it is a full read', () => {
    const plain = record(4, [disk('sda', 10 * GiB, null)]);
    const chain = chooseChain('sda', 'incremental', { size: 10 * GiB, baseProblem: trusted }, [plain, ...history()]);
    expect(chain.parent?.record.id).toBe(idOf(3));
    expect(chooseChain('sda', 'incremental', { size: 10 * GiB, baseProblem: trusted }, [plain]).reason).toBe(NO_EARLIER_BACKUP);
  });

  test('a disk whose size changed: full, saying from what to what', () => {
    const chain = chooseChain('sda', 'incremental', { size: 12 * GiB, baseProblem: trusted }, history());
    expect(chain).toMatchObject({ mode: 'full', reason: `the disk size changed from ${10 * GiB} to ${12 * GiB} bytes`, base: null, parent: null });
  });

  test('a base that cannot be trusted: full, with the base check own reason, asked about the right base', () => {
    const asked: [string, DiskCbt][] = [];
    const chain = chooseChain('sda', 'differential', {
      size: 10 * GiB,
      baseProblem: (base, previous) => {
        asked.push([base, previous]);
        return `checkpoint ${base} no longer exists in libvirt`;
      },
    }, history());
    expect(asked).toEqual([[bitmapName(REPO, idOf(1)), history()[0]!.disks[0]!.cbt]]);
    expect(chain).toMatchObject({ mode: 'full', reason: `checkpoint ${bitmapName(REPO, idOf(1))} no longer exists in libvirt` });
  });

  test('a parent pruned since: full, naming it; a parent whose disk had another size: full', () => {
    const [inc3, inc2] = history();
    const pruned = chooseChain('sda', 'differential', { size: 10 * GiB, baseProblem: trusted }, [inc3!, inc2!]);
    expect(pruned).toMatchObject({ mode: 'full', reason: `parent backup ${idOf(1)} of this disk is no longer in the repository` });
    const resizedFull = record(1, [disk('sda', 8 * GiB, cbtOf(idOf(1), idOf(1)))]);
    const grown = chooseChain('sda', 'differential', { size: 10 * GiB, baseProblem: trusted }, [inc3!, inc2!, resizedFull]);
    expect(grown).toMatchObject({ mode: 'full', reason: `the disk size changed since parent backup ${idOf(1)}` });
  });

  test('the work of an incremental: the blocks its ranges touch, each once, whole', async () => {
    const MiB = 1024 * 1024;
    async function* ranges(list: [number, number][]): AsyncGenerator<Range> {
      for (const [offset, length] of list) yield { offset, length };
    }
    expect(await touchedBytes(ranges([]), MiB)).toBe(0);
    expect(await touchedBytes(ranges([[100 * MiB, 65536], [300 * MiB - 4096, 8192]]), MiB)).toBe(3 * MiB);
    // Two ranges in one block, and a range that ends where the next block begins.
    expect(await touchedBytes(ranges([[0, 1], [4096, 1], [MiB, MiB], [5 * MiB + 1, 3 * MiB]]), MiB)).toBe(6 * MiB);
  });

  test("a new bitmap's granularity: the cluster size within 4 KiB and 64 KiB, 64 KiB without one (what qemu gives unasked)", () => {
    const info = (clusterSize: number | undefined) => ({ format: 'qcow2', virtualSize: GiB, clusterSize, bitmaps: [] });
    expect([512, 4096, 32768, 65536, 2 * 1024 * 1024, undefined].map((c) => defaultGranularity(info(c)))).toEqual([4096, 4096, 32768, 65536, 65536, 65536]);
  });

  test("defaultGranularity is what qemu-img gives a bitmap added with no -g (512 B, 4 KiB, 64 KiB, 2 MiB clusters)", async () => {
    const { path: dir, cleanup } = await tempDir('engine-granularity-');
    try {
      const clusters = [512, 4096, 65536, 2 * 1024 * 1024];
      const found: { qemu: number; engine: number }[] = [];
      for (const cluster of clusters) {
        const image = join(dir, `c${cluster}.qcow2`);
        await sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${cluster}`, image, '64M']);
        const info = await imageInfo(image);
        expect(info.clusterSize).toBe(cluster);
        await sh('qemu-img', ['bitmap', '--add', image, 'unasked']);
        const json = JSON.parse(await sh('qemu-img', ['info', '--output=json', image])) as { 'format-specific': { data: { bitmaps: { name: string; granularity: number }[] } } };
        const bitmaps = json['format-specific'].data.bitmaps;
        expect(bitmaps.map((b) => b.name)).toEqual(['unasked']);
        found.push({ qemu: bitmaps[0]!.granularity, engine: defaultGranularity(info) });
      }
      expect(found.map((f) => f.engine)).toEqual(found.map((f) => f.qemu));
      // Both sides of the clamp are exercised: 512 B and 2 MiB clusters are not their own granularity.
      expect(found.map((f) => f.qemu)).toEqual([4096, 4096, 65536, 65536]);
    } finally {
      await cleanup();
    }
  });

  describe('with a qcow2 image bitmap states (bitmapProblem, imageIdentity)', () => {
    const h = history();
    const checkpoint = bitmapName(REPO, idOf(3));
    const decide = (bitmaps: { name: string; granularity: number; flags: string[] }[], requested: 'incremental' | 'differential' = 'incremental'): Chain => {
      const info = { format: 'qcow2', virtualSize: 10 * GiB, clusterSize: 65536, bitmaps };
      return chooseChain('sda', requested, { size: info.virtualSize, baseProblem: bitmapProblem(info), ...imageIdentity(info, REPO, '/images/sda.qcow2', 'vm', 'sda', h) }, h);
    };
    const recording = (name: string, granularity = 65536) => ({ name, granularity, flags: ['auto'] });

    test('a recording bitmap of the last backup: incremental', () => {
      expect(decide([recording(bitmapName(REPO, idOf(1))), recording(checkpoint)])).toMatchObject({ mode: 'incremental', reason: null, base: checkpoint });
    });

    test('in use after an unclean close, disabled, or of another granularity: full, saying which', () => {
      const full = bitmapName(REPO, idOf(1));
      expect(decide([recording(full), { name: checkpoint, granularity: 65536, flags: ['in-use', 'auto'] }]).reason).toBe(`bitmap ${checkpoint} is inconsistent (the image was not closed cleanly)`);
      expect(decide([recording(full), { name: checkpoint, granularity: 65536, flags: [] }]).reason).toBe(`bitmap ${checkpoint} is disabled: it stopped recording writes`);
      expect(decide([recording(full), recording(checkpoint, 131072)]).reason).toBe(`bitmap ${checkpoint} changed granularity from 65536 to 131072`);
    });

    test('the newest checkpoint gone but an older one held: the chain follows the bitmaps the image holds', () => {
      // Only backup 2's bitmap is in the image: the image is the disk of backup 2, not of backup 3.
      const chain = decide([recording(bitmapName(REPO, idOf(2)))]);
      expect(chain).toMatchObject({ mode: 'incremental', base: bitmapName(REPO, idOf(2)) });
      expect(chain.parent?.record.id).toBe(idOf(2));
    });

    test('a differential whose chain checkpoint was removed: full, naming the bitmap', () => {
      expect(decide([recording(checkpoint)], 'differential')).toMatchObject({ mode: 'full', reason: `bitmap ${bitmapName(REPO, idOf(1))} is missing from the image` });
    });

    test('an image holding none of this repository bitmaps: full, saying which bitmap the last backup of that name left', () => {
      const chain = decide([recording('engine-ffffffff-somebody-else')]);
      expect(chain.mode).toBe('full');
      expect(chain.reason).toBe(
        `bitmap ${checkpoint} is missing from the image (the checkpoint of the last backup named vm, ${idOf(3)}; the image holds none of this repository's: another image of the same name, or its bitmaps were removed)`,
      );
    });
  });
});

// settleChain, over an in-memory disk of 8 blocks of 4 KiB and its parent backup's map.
const BS = 4096;
const BLOCKS = 8;
const blockId = (data: Uint8Array): Buffer => createHash('sha256').update(data).digest();

function diskBytes(seed: string): Buffer {
  const bytes = Buffer.alloc(BS * BLOCKS);
  for (let b = 0; b < BLOCKS; b += 1) if (b !== 5) bytes.fill(`${seed}${b}`, b * BS, (b + 1) * BS); // block 5 is zero
  return bytes;
}

function memorySource(bytes: Buffer): BlockSource {
  return {
    size: bytes.length,
    description: { kind: 'memory', path: 'memory' },
    defaultName: 'memory',
    read: async (target, offset) => {
      bytes.copy(target, 0, offset, offset + target.length);
    },
    close: async () => undefined,
    dispose: async () => undefined,
  };
}

/** The map of `bytes` (zero blocks as ZERO_ID), its pages in memory. */
async function mapOf(bytes: Buffer): Promise<{ root: MapRoot; pages: Map<string, Buffer>; ids: Buffer[] }> {
  const pages = new Map<string, Buffer>();
  const builder = new MapBuilder(BLOCKS, async (_kind, page) => {
    const id = blockId(page);
    pages.set(id.toString('hex'), Buffer.from(page));
    return id;
  });
  const ids: Buffer[] = [];
  for (let b = 0; b < BLOCKS; b += 1) {
    const block = bytes.subarray(b * BS, (b + 1) * BS);
    const id = block.equals(Buffer.alloc(BS)) ? ZERO_ID : blockId(block);
    ids.push(id);
    await builder.push(id);
  }
  return { root: await builder.finish(), pages, ids };
}

async function settle(options: { sourceBytes: Buffer; parentBytes: Buffer; dirty: Range[]; unavailable?: Buffer[]; mode?: 'incremental' | 'full'; unreadableMap?: boolean }) {
  const parentMap = await mapOf(options.parentBytes);
  const parentDisk = disk('sda', BS * BLOCKS, cbtOf(idOf(1), idOf(1)), { map: { root: parentMap.root.root.toString('hex'), depth: parentMap.root.depth, blocks: BLOCKS } });
  const parentRecord = record(1, [parentDisk]);
  const chain: Chain =
    options.mode === 'full'
      ? { mode: 'full', reason: null, base: null, parent: null, previous: null }
      : { mode: 'incremental', reason: null, base: parentDisk.cbt!.checkpoint, parent: { record: parentRecord, disk: parentDisk }, previous: parentDisk };
  const unavailable = new Set((options.unavailable ?? []).map((id) => id.toString('hex')));
  const settled = await settleChain({
    chain,
    source: memorySource(options.sourceBytes),
    dirty: async function* () {
      yield* options.dirty;
    },
    what: 'bitmap',
    checkpoint: bitmapName(REPO, idOf(2)),
    backupId: idOf(2),
    granularity: 65536,
    loadPage: async (id) => {
      if (options.unreadableMap) throw new Error('page is gone');
      return parentMap.pages.get(id.toString('hex'))!;
    },
    blockSize: BS,
    blockId,
    available: async (ids) => ids.map((id) => !unavailable.has(id.toString('hex'))),
  });
  const dirty: Range[] = [];
  if (settled.plan) for await (const range of settled.plan.dirty) dirty.push({ ...range });
  return { ...settled, dirty, parentMap };
}

describe('settleChain', () => {
  test('a full read: the disk starts its own chain, no plan', async () => {
    const bytes = diskBytes('a');
    const settled = await settle({ sourceBytes: bytes, parentBytes: bytes, dirty: [], mode: 'full' });
    expect(settled.chain.mode).toBe('full');
    expect(settled.plan).toBeUndefined();
    expect(settled.cbt).toEqual({ checkpoint: bitmapName(REPO, idOf(2)), base: null, chainFull: idOf(2), chainCheckpoint: bitmapName(REPO, idOf(2)), granularity: 65536, audited: 0 });
  });

  test('an incremental whose clean blocks match the parent: kept, audited, in the parent chain', async () => {
    const parent = diskBytes('a');
    const source = Buffer.from(parent);
    source.fill('changed', 2 * BS, 3 * BS); // block 2 changed, and the bitmap says so
    const settled = await settle({ sourceBytes: source, parentBytes: parent, dirty: [{ offset: 2 * BS, length: BS }] });
    expect(settled.chain.mode).toBe('incremental');
    expect(settled.chain.reason).toBeNull();
    expect(settled.cbt.audited).toBeGreaterThan(0);
    expect(settled.cbt.audited).toBeLessThanOrEqual(BLOCKS - 1);
    expect(settled.cbt).toMatchObject({ base: bitmapName(REPO, idOf(1)), chainFull: idOf(1), chainCheckpoint: bitmapName(REPO, idOf(1)) });
    expect(settled.plan?.parent).toEqual(settled.parentMap.root);
    expect(settled.dirty).toEqual([{ offset: 2 * BS, length: BS }]);
  });

  test('a clean block that differs from the parent (a bitmap that missed a write): full, saying where', async () => {
    const parent = diskBytes('a');
    const source = diskBytes('b'); // every non-zero block differs, none is called dirty
    const settled = await settle({ sourceBytes: source, parentBytes: parent, dirty: [] });
    expect(settled.chain.mode).toBe('full');
    expect(settled.chain.reason).toMatch(new RegExp(`^CBT audit: the block at offset (\\d+) differs from parent backup ${idOf(1)} although bitmap ${bitmapName(REPO, idOf(1))} calls it clean$`));
    const offset = Number(/offset (\d+)/.exec(settled.chain.reason!)![1]);
    expect(offset % BS).toBe(0);
    expect(offset / BS).not.toBe(5); // the zero block is zero in both
    expect(settled.plan).toBeUndefined();
    expect(settled.cbt).toMatchObject({ base: null, chainFull: idOf(2), audited: 0 });
  });

  test('chunks of the parent that are no longer available are read again: merged into the dirty ranges, in order', async () => {
    const bytes = diskBytes('a');
    const { ids } = await mapOf(bytes);
    const settled = await settle({ sourceBytes: bytes, parentBytes: bytes, dirty: [{ offset: 2 * BS, length: 100 }, { offset: 6 * BS, length: BS }], unavailable: [ids[0]!, ids[3]!, ids[4]!, ids[7]!] });
    expect(settled.chain.mode).toBe('incremental');
    expect(settled.dirty).toEqual([
      { offset: 0, length: BS },
      { offset: 2 * BS, length: 100 },
      { offset: 3 * BS, length: 2 * BS }, // blocks 3 and 4, merged
      { offset: 6 * BS, length: BS },
      { offset: 7 * BS, length: BS },
    ]);
  });

  test('a parent map that cannot be read: full, naming the parent and why', async () => {
    const bytes = diskBytes('a');
    const settled = await settle({ sourceBytes: bytes, parentBytes: bytes, dirty: [], unreadableMap: true });
    expect(settled.chain).toMatchObject({ mode: 'full', reason: `the map of parent backup ${idOf(1)} cannot be read (page is gone)`, parent: null, base: null });
    expect(settled.plan).toBeUndefined();
  });
});
