/**
 * What verify says about a pack the index names but the repository no longer holds (deleted, lost with
 * a disk): one PACK_MISSING problem per pack, naming every backup and disk that lost data with it (how
 * many chunks, between which disk offsets; map pages too), however many chunks that is. The per-chunk
 * problems stay too, but they stop at verify's problem limit; this summary never does.
 */
import type { VerifyProblem } from './report.js';

interface Affected {
  backup: string;
  disk: string;
  chunks: number;
  mapPages: number;
  firstOffset: number | null;
  lastOffset: number | null;
}

export interface MissingPackProblem extends VerifyProblem {
  code: 'PACK_MISSING';
  pack: string;
  /** Index entries that name the pack. */
  entries: number;
  affected: Affected[];
}

export class MissingPacks {
  private readonly entries = new Map<string, number>();
  /** Blob id (hex) → the missing pack the index places it in. */
  private readonly blobs = new Map<string, string>();
  private readonly affected = new Map<string, Map<string, Affected>>();

  /** `manyWriters`: format 3, where gc drops the entries of a lost pack that shadow another copy (SPEC.md 19.8). */
  constructor(private readonly manyWriters = false) {}

  /** An index entry naming a pack that does not exist. */
  noteEntry(packId: string, blob: string): void {
    this.entries.set(packId, (this.entries.get(packId) ?? 0) + 1);
    this.blobs.set(blob, packId);
  }

  /** The missing pack a blob is indexed in, if any. */
  packOf(blob: string): string | undefined {
    return this.blobs.get(blob);
  }

  /** A reference to a blob: counted against its pack when that pack is missing. */
  noteReference(blob: string, backup: string, disk: string, offset: number | null): void {
    const pack = this.blobs.get(blob);
    if (pack === undefined) return;
    let byDisk = this.affected.get(pack);
    if (!byDisk) this.affected.set(pack, (byDisk = new Map()));
    const key = `${backup}/${disk}`;
    let entry = byDisk.get(key);
    if (!entry) byDisk.set(key, (entry = { backup, disk, chunks: 0, mapPages: 0, firstOffset: null, lastOffset: null }));
    if (offset === null) {
      entry.mapPages += 1;
      return;
    }
    entry.chunks += 1;
    entry.firstOffset = entry.firstOffset === null ? offset : Math.min(entry.firstOffset, offset);
    entry.lastOffset = entry.lastOffset === null ? offset : Math.max(entry.lastOffset, offset);
  }

  problems(): MissingPackProblem[] {
    return [...this.entries].map(([pack, entries]) => {
      const affected = [...(this.affected.get(pack)?.values() ?? [])];
      const what = (a: Affected): string =>
        [
          a.chunks > 0 ? `${a.chunks} ${a.chunks === 1 ? 'chunk' : 'chunks'} at disk offsets ${a.firstOffset}${a.lastOffset !== a.firstOffset ? ` to ${a.lastOffset}` : ''}` : '',
          a.mapPages > 0 ? `${a.mapPages} map ${a.mapPages === 1 ? 'page' : 'pages'}` : '',
        ]
          .filter(Boolean)
          .join(' and ');
      const backups = new Set(affected.map((a) => a.backup));
      const lost =
        affected.length === 0
          ? 'no backup whose map could be read references what it held'
          : `${backups.size === 1 ? 'backup' : 'backups'} that lost data with it: ${affected.map((a) => `${a.backup} (disk ${a.disk}: ${what(a)})`).join(', ')}`;
      return {
        code: 'PACK_MISSING',
        message: `pack ${pack} is missing (${entries} index ${entries === 1 ? 'entry names' : 'entries name'} it); ${lost}; ${this.manyWriters ? 'engine gc drops its entries whose blobs have another copy and engine repair all of them' : 'engine repair drops its entries'}, and a backup of a source that still holds those blocks stores them again`,
        pack,
        entries,
        affected,
      };
    });
  }
}
