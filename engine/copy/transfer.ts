/**
 * One disk of a backup carried from the source to the target (SPEC.md 22.3, 22.4): its map walked leaf by
 * leaf; each chunk's target id found (the same id when both repositories name blobs alike, else the
 * target's id of the chunk's plaintext, which means reading it); only chunks the target's index lacks are
 * read, re-sealed under the target's keys and compression, and written through the target's blob writer,
 * the one write path a backup uses (packs durable, then indexed); the target's map is built from the
 * translated entries and its pages written through the same path. Nothing is committed here.
 */
import type { BlobWriter } from '../../repo-format/blob-writer.js';
import { sealBlobToBuffer } from '../../repo-format/blob-codec.js';
import { ID_SIZE, KIND_DATA, ZERO_ID } from '../../repo-format/constants.js';
import { MapBuilder, readMap, runChunks, type StorePage } from '../../repo-format/block-map.js';
import { mapRootOf, type DiskRecord } from '../../repo-format/backup-record.js';
import { CorruptMetadataError } from '../../repo-format/errors.js';
import type { Repository } from '../../repo-format/repository.js';
import type { BlobLocation } from '../../repo-format/index-entry.js';
import type { Interruption } from '../host/interrupt.js';
import type { UploadLimit } from './upload-limit.js';

/** Chunks (or spans) read and sealed at once: enough to keep an S3 source's GETs and the target's uploads busy. */
const CHUNKS_IN_FLIGHT = 8;
/**
 * Frames that follow one another in one pack of a store of objects are read with one ranged GET of at most
 * this much, as restore reads its spans (a request per chunk left an S3 source's GETs latency-bound); with
 * CHUNKS_IN_FLIGHT spans at once, 32 MiB in flight.
 */
const SPAN_BYTES = 4 * 1024 * 1024;
/** Source-to-target ids remembered when re-keying (about 200 bytes each): an incremental's unchanged chunks are not read again. */
const TRANSLATION_CACHE = 262_144;

export interface CopyCounters {
  chunksSent: number;
  chunksSkipped: number;
  pagesSent: number;
  /** Plaintext bytes of the chunks read from the source. */
  bytesRead: number;
  /** Bytes of the frames written to the target (chunks and map pages), what --limit-upload counts. */
  bytesSent: number;
}

export function newCounters(): CopyCounters {
  return { chunksSent: 0, chunksSkipped: 0, pagesSent: 0, bytesRead: 0, bytesSent: 0 };
}

/** What every disk of a copy shares. */
export interface Transfer {
  source: Repository;
  target: Repository;
  dataWriter: BlobWriter;
  metaWriter: BlobWriter;
  limit: UploadLimit | undefined;
  interruption: Interruption;
  counters: CopyCounters;
  /** Both repositories name a plaintext by the same id (both plain, or the same id key): no chunk need be read to know its target id. */
  sameIds: boolean;
  /** Source id (hex) → target id, when re-keying. */
  translations: Map<string, Buffer>;
  /** Target ids being written right now: a second chunk with the same bytes waits for nothing and sends nothing. */
  inFlight: Set<string>;
}

export function sameIdSpace(source: Repository, target: Repository): boolean {
  if (!source.keys && !target.keys) return true;
  return source.keys !== undefined && target.keys !== undefined && source.keys.idKey.equals(target.keys.idKey);
}

export function newTransfer(source: Repository, target: Repository, limit: UploadLimit | undefined, interruption: Interruption): Transfer {
  return { source, target, dataWriter: target.createBlobWriter(), metaWriter: target.createBlobWriter(), limit, interruption, counters: newCounters(), sameIds: sameIdSpace(source, target), translations: new Map(), inFlight: new Set() };
}

/**
 * Copies one disk; returns the disk record with the target's map (everything else as the source has it).
 * `onBlocks`: blocks done so far of this disk, for progress.
 */
export async function transferDisk(t: Transfer, backupId: string, disk: DiskRecord, blockSize: number, onBlocks: (done: number) => void): Promise<DiskRecord> {
  const builder = new MapBuilder(disk.map.blocks, storePageThrough(t));
  for await (const run of readMap(mapRootOf(disk), t.source.loadPage)) {
    await t.interruption.tick();
    if (run.entries === null) {
      await builder.pushZeros(run.count);
    } else {
      const entries = await translateRun(t, backupId, disk, blockSize, run.firstBlock, run.count, run.entries);
      for (let i = 0; i < run.count; i += 1) await builder.push(entries.subarray(i * ID_SIZE, (i + 1) * ID_SIZE));
    }
    onBlocks(run.firstBlock + run.count);
  }
  const map = await builder.finish();
  return { ...disk, map: { root: map.root.toString('hex'), depth: map.depth, blocks: map.blocks } };
}

/** The entries of one leaf in the target's ids, every chunk the target lacks written. */
async function translateRun(t: Transfer, backupId: string, disk: DiskRecord, blockSize: number, firstBlock: number, count: number, sourceEntries: Buffer): Promise<Buffer> {
  const entries = Buffer.from(sourceEntries.subarray(0, count * ID_SIZE));
  const { ids, blocks } = runChunks({ firstBlock, count, entries: sourceEntries });
  const lengthOf = (block: number): number => Math.min(blockSize, disk.size - block * blockSize);
  const where = (block: number): string => `backup ${backupId}, disk ${disk.name}, block ${block}`;
  if (t.sameIds) {
    // Ask the target first: only what it lacks is read from the source.
    const known = await t.dataWriter.known(ids);
    const wanted = new Map<string, number>();
    known.forEach((has, i) => {
      const hex = ids[i]!.toString('hex');
      if (has || t.inFlight.has(hex) || wanted.has(hex)) t.counters.chunksSkipped += 1;
      else wanted.set(hex, i);
    });
    await readChunks(t, [...wanted.values()].map((i) => ({ i, id: ids[i]!, length: lengthOf(blocks[i]!), where: where(blocks[i]!) })), (chunk, plaintext) => send(t, chunk.id, plaintext));
    return entries;
  }
  // Re-keying: a chunk's target id is a function of its plaintext under the target's id key. The chunks whose
  // translation is not remembered are read first (in spans), each handled as it arrives; the rest after, when
  // a repeated chunk of this leaf has its translation too.
  const translate = async (i: number, read?: Buffer): Promise<void> => {
    const hex = ids[i]!.toString('hex');
    let targetId = t.translations.get(hex);
    let plaintext: Buffer | undefined = read;
    if (!targetId) {
      plaintext ??= await readChunk(t, ids[i]!, lengthOf(blocks[i]!), where(blocks[i]!));
      targetId = t.target.blobId(plaintext);
      if (t.translations.size >= TRANSLATION_CACHE) t.translations.clear();
      t.translations.set(hex, targetId);
    }
    entries.set(targetId, (blocks[i]! - firstBlock) * ID_SIZE);
    const targetHex = targetId.toString('hex');
    if (t.inFlight.has(targetHex)) {
      t.counters.chunksSkipped += 1;
      return;
    }
    t.inFlight.add(targetHex);
    try {
      const [has] = await t.dataWriter.known([targetId]);
      if (has) {
        t.counters.chunksSkipped += 1;
        return;
      }
      plaintext ??= await readChunk(t, ids[i]!, lengthOf(blocks[i]!), where(blocks[i]!));
      await send(t, targetId, plaintext);
    } finally {
      t.inFlight.delete(targetHex);
    }
  };
  const unread = new Set<string>();
  const first: number[] = [];
  const then: number[] = [];
  ids.forEach((id, i) => {
    const hex = id.toString('hex');
    if (t.translations.has(hex) || unread.has(hex)) then.push(i);
    else {
      unread.add(hex);
      first.push(i);
    }
  });
  await readChunks(t, first.map((i) => ({ i, id: ids[i]!, length: lengthOf(blocks[i]!), where: where(blocks[i]!) })), (chunk, plaintext) => translate(chunk.i, plaintext));
  await eachLimited(then, (i) => translate(i));
  return entries;
}

function comparePackOrder(a: BlobLocation, b: BlobLocation): number {
  if (a.packId !== b.packId) return a.packId < b.packId ? -1 : 1;
  return a.offset - b.offset;
}

interface WantedChunk {
  /** Its index in the leaf's run. */
  i: number;
  id: Buffer;
  /** Its block's length: the plaintext must have exactly this many bytes. */
  length: number;
  where: string;
}

/**
 * The plaintexts of `wanted`, each handed to `use` once read and checked: chunks whose frames follow one
 * another in one pack of a store of objects (Repository.locateFrame says 'store') go as one span, one
 * ranged GET of at most SPAN_BYTES; any other chunk, or a span whose read fails, is read one chunk at a time
 * (readChunk, whose errors name the chunk). At most CHUNKS_IN_FLIGHT spans or chunks at once.
 */
async function readChunks(t: Transfer, wanted: WantedChunk[], use: (chunk: WantedChunk, plaintext: Buffer) => Promise<void>): Promise<void> {
  const found = wanted.length === 0 ? [] : await t.source.lookup(wanted.map((w) => w.id));
  // In pack order, not block order: the frames of a run are adjacent in a pack however the writer's lanes
  // interleaved them (the order chunks are handed to `use` does not matter).
  const located = wanted.map((chunk, k) => ({ chunk, k, location: found[k], stored: found[k] !== undefined && t.source.locateFrame(found[k])?.kind === 'store' }));
  located.sort((a, b) => (a.stored !== b.stored ? (a.stored ? -1 : 1) : a.stored ? comparePackOrder(a.location!, b.location!) : a.k - b.k));
  const spans: { chunks: WantedChunk[]; locations: BlobLocation[]; bytes: number }[] = [];
  let open: (typeof spans)[number] | undefined;
  located.forEach(({ chunk, location, stored }) => {
    const last = open?.locations.at(-1);
    if (stored && location && open && last && last.packId === location.packId && last.offset + last.length === location.offset && open.bytes + location.length <= SPAN_BYTES) {
      open.chunks.push(chunk);
      open.locations.push(location);
      open.bytes += location.length;
      return;
    }
    const span = { chunks: [chunk], locations: location ? [location] : [], bytes: location?.length ?? 0 };
    spans.push(span);
    open = stored ? span : undefined;
  });
  await eachLimited(spans, async (span) => {
    t.interruption.check();
    const start = span.locations[0];
    const bytes = span.chunks.length > 1 && start ? await t.source.readPackRange(start.packId, start.offset, span.bytes).catch(() => undefined) : undefined;
    let offset = 0;
    for (const [k, chunk] of span.chunks.entries()) {
      const location = span.locations[k];
      const frame = bytes && location ? bytes.subarray(offset, offset + location.length) : undefined;
      offset += location?.length ?? 0;
      const plaintext = frame ? counted(t, chunk.id, chunk.length, chunk.where, t.source.openFrame(frame, chunk.id, location, `chunk of ${chunk.where}`)) : await readChunk(t, chunk.id, chunk.length, chunk.where);
      await use(chunk, plaintext);
    }
  });
}

/** A chunk's plaintext from the source, checked (frame, id) by the read and its length against the map. */
async function readChunk(t: Transfer, id: Buffer, length: number, where: string): Promise<Buffer> {
  t.interruption.check();
  return counted(t, id, length, where, await t.source.readBlob(id, `chunk of ${where}`));
}

/** A chunk's plaintext, its length checked against the map's block and counted as read. */
function counted(t: Transfer, id: Buffer, length: number, where: string, plaintext: Buffer): Buffer {
  // A map entry names a chunk of exactly its block's length (SPEC.md 8); another length is damage, never copied.
  if (plaintext.length !== length) throw new CorruptMetadataError(`chunk ${id.toString('hex')} (${where})`, `holds ${plaintext.length} bytes, the block has ${length}`);
  t.counters.bytesRead += plaintext.length;
  return plaintext;
}

/** Seals a chunk for the target and writes it through the blob writer, within the upload limit. */
async function send(t: Transfer, id: Buffer, plaintext: Buffer): Promise<void> {
  t.dataWriter.claim(id);
  const frame = sealBlobToBuffer(KIND_DATA, id, plaintext, t.target.keys, t.target.compression);
  await t.limit?.take(frame.length);
  t.interruption.check();
  await t.dataWriter.add(frame, { kind: KIND_DATA, flags: frame.readUInt8(5), rawLength: plaintext.length, id });
  t.counters.chunksSent += 1;
  t.counters.bytesSent += frame.length;
}

/** Map pages as Repository.pageStore writes them, counted and within the upload limit. */
function storePageThrough(t: Transfer): StorePage {
  return async (kind, page) => {
    const id = t.target.blobId(page);
    if (id.equals(ZERO_ID)) return id;
    const [known] = await t.metaWriter.known([id]);
    if (!known) {
      t.metaWriter.claim(id);
      const frame = sealBlobToBuffer(kind, id, page, t.target.keys, t.target.compression);
      await t.limit?.take(frame.length);
      await t.metaWriter.add(frame, { kind, flags: frame.readUInt8(5), rawLength: page.length, id });
      t.counters.pagesSent += 1;
      t.counters.bytesSent += frame.length;
    }
    return id;
  };
}

/** Runs `work` on each item, at most CHUNKS_IN_FLIGHT at once; the first failure stops new work and is thrown once the rest settle. */
async function eachLimited<T>(items: readonly T[], work: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  let failure: { error: unknown } | undefined;
  const lane = async (): Promise<void> => {
    while (next < items.length && !failure) {
      const item = items[next++]!;
      try {
        await work(item);
      } catch (error) {
        failure ??= { error };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(CHUNKS_IN_FLIGHT, items.length) }, lane));
  if (failure) throw failure.error;
}
