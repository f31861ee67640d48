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
  /** Optional allocation map: lets a backup skip regions it knows to be zero. */
  extents?(): AsyncIterable<Extent>;
  /** Checks that the source still has the size it had when opened, then releases it. */
  close(): Promise<void>;
  /** Releases the source without any check (after another failure). */
  dispose(): Promise<void>;
}
