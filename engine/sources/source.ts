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

/** How a source read at a constant depth wants to be read (BlockSource.depth). */
export interface ReadDepth {
  /** The largest request: a `read` of at most this many bytes is one request. */
  requestSize: number;
  /** Bytes in flight at once. */
  bytes: number;
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
   * (one preadv). Storage reads ahead for one reader going forward in
   * large steps; many small reads at once at scattered offsets defeat its readahead (issue 15: 1 MiB reads
   * from 32 slots at once ran at 222–341 MiB/s cold where 8 MiB reads two at a time ran at 582).
   */
  readRun?(targets: readonly Buffer[], offset: number): Promise<void>;
  /**
   * Optional, for a source whose reads are requests to a server (NBD): it is read at a constant depth, one
   * request of at most `requestSize` at a time at its offset (`read` sends exactly one request for that much),
   * with `bytes` kept in flight, the next request sent as each reply lands (backup-disk.ts). Runs of large
   * reads that complete as a whole let the depth sag to one run while its slowest request is awaited (issue
   * 15: 8 MiB runs two at a time took 10× nbdcopy's time on a libvirt pull export). Sources without it are
   * read in runs (`readRun`): storage's readahead wants one reader going forward in large steps.
   */
  readonly depth?: ReadDepth | undefined;
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
