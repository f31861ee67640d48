/**
 * A backup source: one disk's bytes. File and block-device sources come first; NBD sources (CBT)
 * implement the same interface and add extents.
 */
export interface SourceDescription {
  kind: string;
  path: string;
  /** A local source's absolute path, symlinks resolved: what restore compares a target with (write-guard.ts). */
  realPath?: string;
}

/** A region of the source; `zero` means it reads as zeros and need not be read (holes, zero clusters). */
export interface Extent {
  offset: number;
  length: number;
  zero: boolean;
}

export interface BlockSource {
  readonly size: number;
  readonly description: SourceDescription;
  /** Default disk name in a backup: the source's file name. */
  readonly defaultName: string;
  /** Fills `target` with the bytes at `offset`; a source that ends early throws SourceChangedError. */
  read(target: Buffer, offset: number): Promise<void>;
  /**
   * Optional: fills `targets` one after another with the bytes from `offset` on, as one large read in order
   * (one preadv; NBD requests sent in order at once). Storage reads ahead for one reader going forward in
   * large steps; many small reads at once at scattered offsets defeat its readahead (issue 15: 1 MiB reads
   * from 32 slots at once ran at 222–341 MiB/s cold where 8 MiB reads two at a time ran at 582).
   */
  readRun?(targets: readonly Buffer[], offset: number): Promise<void>;
  /** Optional allocation map: lets a backup skip regions it knows to be zero. */
  extents?(): AsyncIterable<Extent>;
  /** Checks that the source still has the size it had when opened, then releases it. */
  close(): Promise<void>;
  /** Releases the source without any check (after another failure). */
  dispose(): Promise<void>;
}

/** Fills `targets` with the bytes from `offset` on: in one run where the source can, else one read per target, all at once. */
export async function readRun(source: BlockSource, targets: readonly Buffer[], offset: number): Promise<void> {
  if (source.readRun) return source.readRun(targets, offset);
  let at = offset;
  const reads = targets.map((target) => {
    const read = source.read(target, at);
    at += target.length;
    return read;
  });
  await Promise.all(reads);
}
