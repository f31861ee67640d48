/**
 * Writes new blobs into packs and makes them visible in the index in the required order:
 * a pack is sealed (fsync, rename, fsync dir) BEFORE its entries enter the index.
 *
 * Blobs written but not yet indexed are "pending": `known()` answers from them first, so a block seen
 * twice in one backup is stored once. Sealing a full pack runs in the background while the next pack
 * fills: one seal at a time into a local folder (fsync and rename: the disk sets the pace), several into
 * an object store, where one PUT at a time leaves most of the store's throughput unused (RGW here: 90 MB/s
 * with one request in flight, 140-180 with four; bench/results/s3-ceiling-latest.md). Packs enter the index
 * in the order they were filled, each once it is durable. When more packs wait than that, a frame's write
 * resolves only once one is done, which holds the pipeline's slot: back-pressure, so the packs waiting on
 * the local disk stay bounded whatever the store's speed.
 */
import { PACK_TARGET_SIZE } from './constants.js';
import type { FrameHeader } from './frame.js';
import type { BlobIndex, IndexEntry } from './index-entry.js';
import { PackWriter, type PackTarget } from './pack-file.js';
import { crashPoint } from './crash-points.js';
import type { PackPresence } from './pack-presence.js';
import { LocalStorage } from './storage/local.js';
import { Semaphore } from './storage/limit.js';

/** Packs uploaded at once to a store that is not a local folder (within its connection limit). */
export const UPLOADS_IN_FLIGHT = 4;
/** Packs that may wait beyond those being sealed before the writer pushes back. */
const WAITING_PACKS = 2;

export class BlobWriter {
  private current: PackWriter | undefined;
  private readonly pending = new Set<string>();
  private sealing: Promise<void> = Promise.resolve();
  private failure: unknown;
  private readonly openPacks = new Set<PackWriter>();
  /** Seals running at once. */
  private readonly uploads: Semaphore;
  /** Packs rotated out and not yet indexed (or given up). */
  private unsealed = 0;
  private readonly roomWaiters: (() => void)[] = [];
  bytesWritten = 0;

  constructor(
    /** Where new packs go (Repository.packTarget). */
    private readonly target: PackTarget,
    private readonly index: BlobIndex,
    private readonly packTargetSize = PACK_TARGET_SIZE,
    /** Entries whose pack is missing or cut short are not trusted: the blob is stored again. */
    private readonly presence?: PackPresence,
  ) {
    const store = target.store;
    this.uploads = new Semaphore(store instanceof LocalStorage ? 1 : Math.max(1, Math.min(UPLOADS_IN_FLIGHT, store.properties.connections)));
  }

  /**
   * For each id: is it already stored (indexed in a pack that is there, or written earlier in this
   * session)? One index batch; one stat per pack per run.
   */
  async known(ids: readonly Buffer[]): Promise<boolean[]> {
    const answer = ids.map((id) => this.pending.has(id.toString('hex')));
    const ask: number[] = [];
    answer.forEach((isPending, i) => {
      if (!isPending) ask.push(i);
    });
    const indexed = await this.index.lookup(ask.map((i) => ids[i]!));
    const locations = this.presence ? await this.presence.filter(indexed) : indexed;
    locations.forEach((location, j) => {
      if (location) answer[ask[j]!] = true;
    });
    return answer;
  }

  /** Claims an id before its frame is built, so concurrent duplicates in one batch are not stored twice. */
  claim(id: Buffer): void {
    this.pending.add(id.toString('hex'));
  }

  /**
   * Appends a frame to the open pack (opening one when needed). Resolves when the frame is written, not
   * when it is durable: `flush` is the durability point. `frame` must stay unchanged until then.
   */
  add(frame: Uint8Array, header: Omit<FrameHeader, 'storedLength'>): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    this.pending.add(header.id.toString('hex'));
    if (!this.current) {
      this.current = new PackWriter(this.target);
      this.openPacks.add(this.current);
    }
    const written = this.current.append(frame, header);
    // Any failed write fails the whole writer: nothing after it may be sealed or indexed.
    written.catch((error: unknown) => {
      this.failure ??= error;
    });
    this.bytesWritten += frame.length;
    if (this.current.byteSize >= this.packTargetSize) this.rotate();
    return this.unsealed > this.uploads.limit + WAITING_PACKS ? written.then(() => this.room()) : written;
  }

  /** Resolves once few enough packs wait for their seal (or the writer failed: the next add says so). */
  private async room(): Promise<void> {
    while (this.unsealed > this.uploads.limit + WAITING_PACKS && this.failure === undefined) {
      await new Promise<void>((resolve) => this.roomWaiters.push(resolve));
    }
  }

  /** Seals whatever is open and waits until every blob written so far is in the index. */
  async flush(): Promise<void> {
    this.rotate();
    await this.sealing;
    if (this.failure) throw this.failure;
  }

  /** Discards open packs. Already sealed packs stay: unreferenced, they are garbage for a later GC. */
  async abort(): Promise<void> {
    // Seals queued behind this point are skipped: an aborted writer indexes nothing more.
    this.failure ??= new Error('blob writer aborted');
    await this.sealing.catch(() => undefined);
    for (const pack of this.openPacks) await pack.abort();
    this.openPacks.clear();
    this.current = undefined;
  }

  private rotate(): void {
    const pack = this.current;
    this.current = undefined;
    if (!pack) return;
    if (pack.isEmpty) {
      this.openPacks.delete(pack);
      void pack.abort();
      return;
    }
    this.unsealed += 1;
    // The seal starts as soon as a slot allows; its entries join the index in the order packs were filled.
    const sealed = this.seal(pack);
    sealed.catch(() => undefined);
    this.sealing = this.sealing.then(async () => {
      try {
        const entries = await sealed;
        if (this.failure || !entries) return;
        await this.index.addEntries(entries);
        crashPoint('index-written');
        for (const entry of entries) this.pending.delete(entry.id.toString('hex'));
      } catch (error) {
        this.failure ??= error;
      } finally {
        this.unsealed -= 1;
        for (const wake of this.roomWaiters.splice(0)) wake();
      }
    });
  }

  /** One pack made durable (undefined when the writer failed before its turn: the pack is left to abort). */
  private async seal(pack: PackWriter): Promise<IndexEntry[] | undefined> {
    await this.uploads.acquire();
    try {
      if (this.failure) return undefined;
      crashPoint('pack-written');
      const entries = await pack.seal();
      this.openPacks.delete(pack);
      crashPoint('pack-sealed');
      return entries;
    } catch (error) {
      this.failure ??= error;
      throw error;
    } finally {
      this.uploads.release();
    }
  }
}
