/**
 * verify --read-data (and --subset): every frame of the chosen packs re-read and checked in full in the
 * workers (xxh64, the AES-256-GCM tag when encrypted, lz4, the blob id). It runs alongside the structure
 * check: the structure check hands over each pack it has scanned, one pack per worker at a time, and scans
 * the next while the workers hash. Its findings must be in before the references are checked, which name
 * the backups that use a damaged frame.
 */
import { createHash, randomBytes } from 'node:crypto';
import type { PackScan } from '../../repo-format/pack-file.js';
import { quarantineKey } from '../../repo-format/quarantine.js';
import { jobPool, type BlockPool, type PoolLender } from '../pipeline/block-pool.js';
import { checkPackFrames } from '../pipeline/pack-check.js';
import type { VerifyRun } from './run.js';

/** The packs whose data a --subset run reads: the first ceil(f × n) in the order of SHA-256(seed || pack id). */
export function choosePacks(packIds: readonly string[], fraction: number | undefined, seed: string | undefined): { packs: Set<string>; seed: string } {
  const chosenSeed = seed ?? randomBytes(8).toString('hex');
  const count = fraction === undefined ? packIds.length : Math.ceil(fraction * packIds.length);
  const order = packIds
    .map((id) => ({ id, key: createHash('sha256').update(chosenSeed).update(id).digest('hex') }))
    .sort((a, b) => a.key.localeCompare(b.key));
  return { packs: new Set(order.slice(0, count).map((p) => p.id)), seed: chosenSeed };
}

export class DataCheck {
  private readonly inFlight = new Set<Promise<void>>();
  /** Packs whose check itself failed (a worker died): not verified, which is a problem too. */
  readonly unchecked = new Set<string>();

  private constructor(
    private readonly run: VerifyRun,
    private readonly pool: BlockPool,
    private readonly chosen: ReadonlySet<string>,
  ) {}

  /** Starts the workers, and chooses the packs to read (all, or a --subset: said in the report). */
  static async start(run: VerifyRun, listed: readonly { packId: string; size: number }[], options: { subset?: number | undefined; seed?: string | undefined; workers?: number | undefined; sharedPool?: PoolLender | undefined; signal?: AbortSignal | undefined }): Promise<DataCheck> {
    const { packs, seed } = choosePacks(listed.map((pack) => pack.packId), options.subset, options.seed);
    if (options.subset !== undefined) run.report.subset = { percent: Math.round(options.subset * 10000) / 100, seed, packs: packs.size };
    // No more workers than the bytes of the packs to read can use (block-pool.ts, BYTES_PER_WORKER).
    const workBytes = listed.reduce((sum, pack) => sum + (packs.has(pack.packId) ? pack.size : 0), 0);
    const pool = await jobPool(options.sharedPool, { blockSize: run.repo.blockSize, workers: options.workers, slotCount: 1, keys: run.repo.keys, workBytes, signal: options.signal });
    return new DataCheck(run, pool, packs);
  }

  /** Hands a scanned pack to the workers if it is one to read; waits while every worker has one. */
  async submit(scan: PackScan): Promise<void> {
    if (!this.chosen.has(scan.packId) || scan.frames.length === 0) return;
    while (this.inFlight.size >= this.pool.workers) {
      await Promise.race(this.inFlight);
      this.run.interruption.check();
    }
    const repo = this.run.repo;
    const pack = { locator: repo.locateFrame({ packId: scan.packId, offset: 0, length: scan.size }), readRange: (offset: number, length: number) => repo.readPackRange(scan.packId, offset, length) };
    const check = checkPackFrames(this.pool, pack, scan.frames).then(
        ({ bad }) => this.checked(scan, bad),
        (error: unknown) => this.failed(scan.packId, error),
      );
    this.inFlight.add(check);
    void check.then(
      () => this.inFlight.delete(check),
      () => this.inFlight.delete(check),
    );
  }

  /** Waits for every pack handed over. */
  async drain(): Promise<void> {
    while (this.inFlight.size > 0) {
      await Promise.race(this.inFlight);
      this.run.interruption.check();
    }
  }

  async close(): Promise<void> {
    await this.pool.close().catch(() => undefined);
  }

  private checked(scan: PackScan, bad: readonly { offset: number; why: string }[]): void {
    this.run.report.bytesChecked += scan.size;
    for (const { offset, why } of bad) {
      if (this.run.quarantine.has(quarantineKey(scan.packId, offset))) continue;
      const frame = scan.frames.find((f) => f.offset === offset)!;
      const blob = frame.header.id.toString('hex');
      this.run.blobDamaged({ code: 'FRAME_DAMAGED', message: `pack ${scan.packId} offset ${offset} (blob ${blob.slice(0, 16)}…): ${why}`, pack: scan.packId, packOffset: offset, blob });
    }
  }

  private failed(packId: string, error: unknown): void {
    this.unchecked.add(packId);
    this.run.problem({ code: 'PACK_DAMAGED', message: `pack ${packId} could not be checked: ${(error as Error).message}`, pack: packId });
  }
}
