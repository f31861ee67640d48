/**
 * Which packs exist, and how long they are: asked once per pack per run (one stat of the store, cached), before an
 * index entry is trusted by a reader that would otherwise build on it without reading the frame
 * (deduplication, an incremental reusing its parent's map entries). The index is a cache of the packs
 * (SPEC.md, section 6); a pack lost from the disk, or cut short, leaves entries that name nothing. Such an
 * entry is treated like a quarantined frame: the blob counts as absent, so the next backup that meets the
 * block stores it again, and its new entry replaces the dead one.
 *
 * A stat does not see damage inside a pack that is still whole in length; verify --read-data and repair do.
 */
import type { BlobLocation } from './index-entry.js';
import type { Storage } from './storage/storage.js';
import { isStorageError } from './storage/storage-error.js';
import { packKey } from './store.js';

/** Whether an index entry provably names nothing: its pack is gone, or ends before the entry's frame. */
export type DeadEntryTest = (location: BlobLocation) => boolean;

export class PackPresence {
  /** Pack id → its size in bytes, or null when it cannot be found (or read by stat). */
  private readonly sizes = new Map<string, Promise<number | null>>();
  /** Packs found missing or shorter than an index entry needs, this run: what a backup says in a notice. */
  readonly unavailable = new Map<string, string>();
  /**
   * Packs proven absent (the store said not found: null) or short (their size), this run. Unlike
   * `unavailable`, a stat that failed otherwise (permissions, a store down) proves nothing and is not here:
   * what is here may be dropped from the index (SPEC.md 19.7, step 3a).
   */
  private readonly proven = new Map<string, number | null>();

  constructor(private readonly store: Storage) {}

  /** Whether the pack behind `location` exists and reaches past the frame's end. */
  async holds(location: BlobLocation): Promise<boolean> {
    let size = this.sizes.get(location.packId);
    if (size === undefined) {
      const packId = location.packId;
      size = this.store.stat(packKey(packId)).then(
        (s) => s.size,
        (error: unknown) => {
          if (isStorageError(error, 'not-found')) this.proven.set(packId, null);
          return null;
        },
      );
      this.sizes.set(location.packId, size);
    }
    const bytes = await size;
    if (bytes === null) {
      this.unavailable.set(location.packId, 'missing');
      return false;
    }
    if (location.offset + location.length > bytes) {
      this.proven.set(location.packId, bytes);
      this.unavailable.set(location.packId, `cut short (${bytes} bytes; the index names a frame ending at ${location.offset + location.length})`);
      return false;
    }
    return true;
  }

  /**
   * The entries this run proved dead (undefined when none): a pack the store said is not there, or a frame
   * past the end of its pack. Packs never asked about, or whose stat failed otherwise, are not judged.
   */
  provenDead(): DeadEntryTest | undefined {
    if (this.proven.size === 0) return undefined;
    return (location) => {
      if (!this.proven.has(location.packId)) return false;
      const size = this.proven.get(location.packId);
      return size === null || size === undefined || location.offset + location.length > size;
    };
  }

  /** How many packs this run proved gone or short (grows as stats answer). */
  get provenCount(): number {
    return this.proven.size;
  }

  /** The locations whose pack holds them; the others become undefined. */
  async filter(locations: readonly (BlobLocation | undefined)[]): Promise<(BlobLocation | undefined)[]> {
    return Promise.all(locations.map(async (location) => (location && (await this.holds(location)) ? location : undefined)));
  }
}
