/**
 * A writer's side of the index (SPEC.md 19.7): the entries of the packs it made, written as its segments
 * before its record. The order is the format's invariants, so it lives in one place:
 *
 * - `addPack` takes the entries of a pack only once the pack is durable in the store (invariant 1');
 * - segments are written create-if-absent, at the latest by `commitRecord`, and every FLUSH_ENTRIES entries
 *   before that, so that memory stays bounded whatever the size of the backup (and other writers can
 *   deduplicate against a long backup's blobs while it runs);
 * - `commitRecord` writes what is pending, confirms the lease in the store (read back and rewritten) and
 *   checks it, then creates the record: a record is never
 *   written before the segments naming its new blobs, nor after its writer lost its lease (invariant 2').
 */
import { randomBytes } from 'node:crypto';
import { crashPoint } from '../crash-points.js';
import type { Storage } from '../storage/storage.js';
import { encodeSegment, segmentKey, type Segment, type SegmentEntry, type SegmentName } from './segment.js';

/** Entries held before a segment is written: 65536 entries, a 4 MiB segment, 64 GiB of new 1 MiB chunks. */
export const FLUSH_ENTRIES = 65536;

export interface SegmentWriterOptions {
  storage: Storage;
  /** Encrypted repositories seal segments. */
  dataKey?: Uint8Array | undefined;
  /** The writer's lease: checked before every segment and the record (HeldLease.assertHeld). */
  assertHeld: () => void;
  /**
   * The lease confirmed in the store just before the record (HeldLease.refresh: read back, still this
   * process's, rewritten): a lease removed behind the writer (`unlock --force`) stops it before it commits.
   */
  confirmHeld?: (() => Promise<void>) | undefined;
  /** Told of each segment once durable (the cache ingests it: IndexCache.ingest). */
  onSegment?: ((segment: Segment) => Promise<void>) | undefined;
  /** 32 hex; random by default. */
  writer?: string | undefined;
  flushEntries?: number | undefined;
  signal?: AbortSignal | undefined;
}

export class SegmentWriter {
  readonly writer: string;
  private seq = 0;
  private pending = new Map<string, SegmentEntry>();
  private readonly written: string[] = [];

  constructor(private readonly options: SegmentWriterOptions) {
    this.writer = options.writer ?? testWriter() ?? randomBytes(16).toString('hex');
  }

  /** Keys of the segments written so far. */
  get segments(): readonly string[] {
    return this.written;
  }

  /** The entries of one pack, durable in the store. A blob this writer already named keeps its first entry. */
  async addPack(entries: readonly SegmentEntry[]): Promise<void> {
    for (const entry of entries) {
      const id = entry.id.toString('hex');
      if (!this.pending.has(id)) this.pending.set(id, entry);
    }
    if (this.pending.size >= (this.options.flushEntries ?? FLUSH_ENTRIES)) await this.flush();
  }

  /** Where a blob this writer named but has not yet written in a segment is (deduplication sees its own pending blobs). */
  pendingEntry(id: Uint8Array): SegmentEntry | undefined {
    return this.pending.get(Buffer.from(id.buffer, id.byteOffset, id.byteLength).toString('hex'));
  }

  /** Writes what is pending as one segment (none when nothing is). */
  async flush(): Promise<void> {
    if (this.pending.size === 0) return;
    const entries = [...this.pending.values()].sort((a, b) => Buffer.compare(a.id, b.id));
    const segment: Segment = { name: { writer: this.writer, seq: this.seq }, supersedes: [], entries };
    await this.put(segment);
    crashPoint('segment-written');
    this.pending = new Map();
    await this.options.onSegment?.(segment);
  }

  /**
   * Replaces the effective segment `old` by a copy holding only `entries` (a subset of its own), in one put
   * that supersedes it (SPEC.md 19.7, step 3a): entries that provably name nothing leave the index. The copy
   * is not told to `onSegment`: a cache that ingested `old` must meet the supersession at its next catch-up
   * (and rebuild), which it would not if it had ingested the copy as its own.
   */
  async replace(old: SegmentName, entries: SegmentEntry[]): Promise<string> {
    const segment: Segment = { name: { writer: this.writer, seq: this.seq }, supersedes: [old], entries };
    const key = await this.put(segment);
    crashPoint('segment-replaced');
    return key;
  }

  /** Puts one of this writer's segments (create-if-absent), under its lease, checked before and after. */
  private async put(segment: Segment): Promise<string> {
    this.options.assertHeld();
    const key = segmentKey(segment.name);
    await this.options.storage.put(key, encodeSegment(segment, { dataKey: this.options.dataKey }), { ifAbsent: true, signal: this.options.signal });
    try {
      // A put that landed after the lease lapsed (a process paused between the check and the request) may
      // name packs a gc has deleted meanwhile: take it back rather than leave entries that shadow good ones.
      this.options.assertHeld();
    } catch (error) {
      await this.options.storage.delete(key).catch(() => undefined);
      throw error;
    }
    this.seq++;
    this.written.push(key);
    return key;
  }

  /**
   * The commit point of a backup: pending entries are written, the lease checked, and the record created
   * if absent (its `key` under backups/, `bytes` as section 9 or 18.4 give them).
   */
  async commitRecord(key: string, bytes: Uint8Array): Promise<void> {
    await this.flush();
    await this.options.confirmHeld?.();
    this.options.assertHeld();
    await this.options.storage.put(key, bytes, { ifAbsent: true, signal: this.options.signal });
    try {
      // As for a segment: a record that landed after the lease lapsed may reference packs a gc deleted as
      // dead meanwhile (this writer's segments named them, no record did). It is taken back: not committed.
      this.options.assertHeld();
    } catch (error) {
      await this.options.storage.delete(key).catch(() => undefined);
      throw error;
    }
  }
}

/**
 * Tests only: ENGINE_TEST_SEGMENT_WRITER (32 hex digits) names this process's segments, so that a test can put
 * them before or after another writer's in key order rather than retry until chance does. A writer id is
 * otherwise random (19.3), and no two processes may share one: a test gives each process its own.
 */
function testWriter(): string | undefined {
  const value = process.env.ENGINE_TEST_SEGMENT_WRITER;
  return value !== undefined && /^[0-9a-f]{32}$/.test(value) ? value : undefined;
}
