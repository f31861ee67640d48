/**
 * A backup's write order in format version 3 (SPEC.md 19.7), through SegmentWriter: segments before the
 * record, the lease checked before each, memory bounded by flushing every FLUSH_ENTRIES entries. The crash
 * table: a store that fails at each put in turn (the request or the answer lost) never leaves a record
 * whose blobs no segment names.
 */
import { describe, expect, test } from 'vitest';
import { initChecksum } from '../dist/repo-format/checksum.js';
import { MemoryStorage } from '../dist/repo-format/storage/memory.js';
import { FaultInjectingStorage } from '../dist/repo-format/storage/faults.js';
import { decodeSegment, parseSegmentKey, type SegmentEntry } from '../dist/repo-format/v3/segment.js';
import { resolveIndex } from '../dist/repo-format/v3/segment-set.js';
import { SegmentWriter } from '../dist/repo-format/v3/segment-writer.js';
import { LeaseLostError } from '../dist/repo-format/errors.js';

await initChecksum();
const RECORD = 'backups/' + 'ab'.repeat(16);

function entry(blob: number, pack: number): SegmentEntry {
  return { id: Buffer.alloc(32, blob), packId: pack.toString(16).padStart(32, '0'), offset: 32 + blob * 100, length: 90, rawLength: 34, kind: 1, flags: 0 };
}

async function namedBlobs(storage: MemoryStorage): Promise<Set<string>> {
  const segments = [];
  for await (const info of storage.list('index/')) {
    if (!parseSegmentKey(info.key)) continue;
    const segment = decodeSegment(await storage.get(info.key), info.key);
    if (typeof segment === 'string') throw new Error(segment);
    segments.push(segment);
  }
  return new Set(resolveIndex(segments).keys());
}

async function exists(storage: MemoryStorage, key: string): Promise<boolean> {
  try {
    await storage.stat(key);
    return true;
  } catch {
    return false;
  }
}

describe('segment writer', () => {
  test('segments before the record; flushed every N entries; a blob named twice keeps its first entry', async () => {
    const storage = new MemoryStorage();
    const order: string[] = [];
    const writer = new SegmentWriter({ storage, assertHeld: () => undefined, flushEntries: 3, onSegment: async (s) => void order.push(`segment ${s.name.seq} (${s.entries.length})`) });
    await writer.addPack([entry(1, 1), entry(2, 1)]);
    expect(writer.segments).toEqual([]);
    await writer.addPack([entry(3, 2), entry(1, 2)]);
    expect(writer.segments.length).toBe(1); // 3 distinct blobs reached the threshold
    await writer.addPack([entry(4, 3)]);
    await writer.commitRecord(RECORD, Buffer.from('{}'));
    order.push('record');
    expect(order).toEqual(['segment 0 (3)', 'segment 1 (1)', 'record']);
    const named = await namedBlobs(storage);
    expect([...named].sort()).toEqual([1, 2, 3, 4].map((b) => Buffer.alloc(32, b).toString('hex')));
    const index = resolveIndex([decodeSegment(await storage.get(writer.segments[0]!), writer.segments[0]!) as never]);
    expect(index.get(Buffer.alloc(32, 1).toString('hex'))?.entry.packId).toBe((1).toString(16).padStart(32, '0'));
  });

  test('a lease lost before the commit: no segment, no record, ENGINE_LEASE_LOST', async () => {
    const storage = new MemoryStorage();
    let held = true;
    const writer = new SegmentWriter({ storage, assertHeld: () => { if (!held) throw new LeaseLostError('memory', 'leases/x.json', 'test'); } });
    await writer.addPack([entry(1, 1)]);
    held = false;
    await expect(writer.commitRecord(RECORD, Buffer.from('{}'))).rejects.toMatchObject({ code: 'ENGINE_LEASE_LOST' });
    expect(await exists(storage, RECORD)).toBe(false);
    expect(await namedBlobs(storage)).toEqual(new Set());
  });

  test('a store failing at any put, before or after doing it: a record exists only when its blobs are named', async () => {
    for (const when of ['before', 'after'] as const) {
      for (let failAt = 0; failAt < 4; failAt++) {
        const memory = new MemoryStorage();
        const storage = new FaultInjectingStorage(memory, [{ operation: 'put', skip: failAt, times: 1, when }]);
        const writer = new SegmentWriter({ storage, assertHeld: () => undefined, flushEntries: 2 });
        let failed = false;
        try {
          await writer.addPack([entry(1, 1), entry(2, 1)]);
          await writer.addPack([entry(3, 2), entry(4, 2)]);
          await writer.addPack([entry(5, 3)]);
          await writer.commitRecord(RECORD, Buffer.from('{}'));
        } catch {
          failed = true;
        }
        expect(failed, `failure at put ${failAt} (${when})`).toBe(true);
        if (await exists(memory, RECORD)) {
          const named = await namedBlobs(memory);
          for (const blob of [1, 2, 3, 4, 5]) expect(named.has(Buffer.alloc(32, blob).toString('hex')), `blob ${blob}, failure at put ${failAt} (${when})`).toBe(true);
        }
      }
    }
  });

  /** A writer whose lease lapses once a put under `prefix` has landed (a process paused between its check and its request). */
  function lapsingAfterPut(prefix: string): { memory: MemoryStorage; writer: SegmentWriter } {
    const memory = new MemoryStorage();
    let held = true;
    const storage = new FaultInjectingStorage(memory);
    const original = memory.put.bind(memory);
    memory.put = async (key, source, options) => {
      await original(key, source, options);
      if (key.startsWith(prefix)) held = false;
    };
    const writer = new SegmentWriter({ storage, assertHeld: () => { if (!held) throw new LeaseLostError('memory', 'leases/x.json', 'test'); } });
    return { memory, writer };
  }

  test('a segment put that lands after the lease lapsed is taken back', async () => {
    const { memory, writer } = lapsingAfterPut('index/');
    await writer.addPack([entry(1, 1)]);
    await expect(writer.flush()).rejects.toMatchObject({ code: 'ENGINE_LEASE_LOST' });
    expect(await namedBlobs(memory)).toEqual(new Set());
    expect(writer.segments).toEqual([]);
  });

  test('a record put that lands after the lease lapsed is taken back: the backup is not committed (a gc may have deleted its packs meanwhile)', async () => {
    const { memory, writer } = lapsingAfterPut('backups/');
    await writer.addPack([entry(1, 1)]);
    await expect(writer.commitRecord(RECORD, Buffer.from('record'))).rejects.toMatchObject({ code: 'ENGINE_LEASE_LOST' });
    expect(await exists(memory, RECORD)).toBe(false);
  });
});
