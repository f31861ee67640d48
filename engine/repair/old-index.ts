/**
 * What repair takes from the old index, whatever state it is in (missing, unreadable, readable but
 * wrong): the good copies of damaged records in its catalogue, and which blob each damaged place held.
 * It is read as far as it can be, streamed (never all in memory), and replaced afterwards all the same.
 */
import { IndexStore } from '../../repo-format/index-store.js';
import { NoSpaceError } from '../../repo-format/errors.js';
import { quarantineKey, type QuarantinedFrame } from '../../repo-format/quarantine.js';
import type { IndexEntry } from '../../repo-format/index-entry.js';
import type { Repository } from '../../repo-format/repository.js';
import { restoreRecordsFromCatalogue, type RestoredRecord } from '../catalogue/record-recovery.js';
import { InterruptedError } from '../errors.js';
import type { Interruption } from '../host/interrupt.js';
import type { CheckedPacks } from './check-packs.js';
import type { RepairReport } from './report.js';

/** Restores damaged records from the old index's catalogue, when that index can be opened at all. */
export async function restoreFromOldCatalogue(repo: Repository, path: string): Promise<RestoredRecord[]> {
  let index: IndexStore;
  try {
    index = await IndexStore.open(path, { create: false });
  } catch (error) {
    if (error instanceof NoSpaceError) throw error;
    return [];
  }
  try {
    return await restoreRecordsFromCatalogue(repo, index);
  } finally {
    await index.close().catch(() => undefined);
  }
}

/**
 * Completes `checked.found` from the old index: the blob a damaged frame held (the header of a damaged
 * frame may itself be what is damaged), and the blobs the old index placed where no good frame is left (a
 * truncated pack), when no good copy of them is anywhere. Returns what the old index was.
 */
export async function placeDamage(path: string, checked: CheckedPacks, already: ReadonlyMap<string, QuarantinedFrame>, interruption: Interruption): Promise<RepairReport['previousIndex']> {
  return forEachOldEntry(path, interruption, damagePlacer(checked, already));
}

/** placeDamage's rule for one entry of the old index (version 3: the entries of its effective segments). */
export function damagePlacer(checked: CheckedPacks, already: ReadonlyMap<string, QuarantinedFrame>): (entry: IndexEntry) => void {
  const byPlace = new Map(checked.found.map((f) => [quarantineKey(f.pack, f.offset), f]));
  return (entry) => {
    const place = quarantineKey(entry.packId, entry.offset);
    if (checked.goodPlaces.has(entry.packId, entry.offset) || already.has(place)) return;
    const damage = byPlace.get(place);
    if (damage) {
      damage.blob = entry.id.toString('hex');
    } else if (!checked.good.has(entry.id)) {
      const lost: QuarantinedFrame = { pack: entry.packId, offset: entry.offset, blob: entry.id.toString('hex'), why: 'no good frame is left at this place of the pack (damaged or cut short)', since: checked.since };
      checked.found.push(lost);
      byPlace.set(place, lost);
    }
  };
}

/**
 * Streams the old index's entries to `visit` (never all in memory at once), as far as they can be read:
 * a missing or unreadable index has none, one that fails half-way those before the failure.
 */
async function forEachOldEntry(path: string, interruption: Interruption, visit: (entry: IndexEntry) => void): Promise<RepairReport['previousIndex']> {
  let index: IndexStore;
  try {
    index = await IndexStore.open(path, { create: false });
  } catch (error) {
    if (error instanceof NoSpaceError) throw error; // not damage: say so rather than repair without the old entries
    const missing = String((error as { cause?: unknown }).cause ?? error).includes('does not exist');
    return missing ? 'missing' : 'unreadable';
  }
  try {
    for await (const entry of index.blobs()) {
      await interruption.tick();
      visit(entry);
    }
    return 'readable';
  } catch (error) {
    if (error instanceof InterruptedError) throw error;
    return 'unreadable';
  } finally {
    await index.close().catch(() => undefined);
  }
}
