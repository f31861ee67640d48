/**
 * The holes of a sparse regular file, so that a backup records them as zeros without reading them: a 100 GiB
 * thin image holding 2 GiB of data is read for 2 GiB, not for 100 GiB of zero-filled pages.
 *
 * Node has no lseek(), so SEEK_DATA/SEEK_HOLE are asked through `qemu-img map` (qemu's file driver walks the
 * file with exactly those calls), the tool the engine already runs for qcow2 images. Its JSON comes one
 * extent per line and is read as it comes, so memory stays flat however fragmented the file; a file whose
 * blocks cover its whole size has no holes and is not mapped at all.
 *
 * The map is an optimisation only: where it is missing, cut short or not understood (qemu-img not installed,
 * a file system without SEEK_DATA, an answer out of order), the rest of the file is read, which is always
 * correct. Offsets are plain numbers compared and added, never combined with bitwise operators.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { createInterface } from 'node:readline';
import type { Extent } from './source.js';

/** What `qemu-img map --output=json` says of one extent (the fields read here). */
interface MapLine {
  start: number;
  length: number;
  /** Reads as zeros (a hole); `data` alone says nothing about the bytes. */
  zero: boolean;
}

function isMapLine(value: unknown): value is MapLine {
  if (typeof value !== 'object' || value === null) return false;
  const line = value as Record<string, unknown>;
  return Number.isSafeInteger(line.start) && Number.isSafeInteger(line.length) && (line.length as number) > 0 && typeof line.zero === 'boolean';
}

/** One line of the answer: `[{…},`, `{…},` or `{…}]`; undefined when it is not an extent. */
function parseMapLine(text: string): MapLine | undefined {
  const trimmed = text.trim().replace(/^\[/, '').replace(/[,\]]$/, '');
  if (trimmed === '') return undefined;
  try {
    const value = JSON.parse(trimmed) as unknown;
    return isMapLine(value) ? value : undefined;
  } catch {
    return undefined;
  }
}

/** Whether a regular file has fewer allocated bytes than its size: only then can it have holes worth a map. */
export function mayHaveHoles(stats: { size: number; blocks: number }): boolean {
  return stats.blocks * 512 < stats.size;
}

/**
 * Walks a file's allocation map once, lazily. `stop` ends a walk that is not finished (the backup failed or
 * stopped early), so that no qemu-img is left waiting on a full pipe.
 */
export class FileHoleMap {
  private child: ChildProcess | undefined;

  /** `path` must be absolute: qemu-img would take a relative `name:rest` for a protocol. */
  constructor(private readonly path: string) {}

  async *extents(): AsyncGenerator<Extent> {
    // -f raw: the bytes are the disk, whatever they look like (never probed as qcow2); -U: read-only, no lock
    // taken that a running qemu or a restore's in-use check would see.
    const child = spawn('qemu-img', ['map', '--output=json', '-U', '-f', 'raw', this.path], { stdio: ['ignore', 'pipe', 'ignore'] });
    this.child = child;
    // A qemu-img that cannot start (not installed) ends the map: the rest of the file is read.
    child.on('error', () => undefined);
    const lines = createInterface({ input: child.stdout, crlfDelay: Infinity });
    let end = 0;
    try {
      for await (const text of lines) {
        const line = parseMapLine(text);
        // Out of order or not understood: stop here, the rest is read.
        if (!line || line.start < end) return;
        end = line.start + line.length;
        yield { offset: line.start, length: line.length, zero: line.zero };
      }
    } finally {
      lines.close();
      this.stop();
    }
  }

  stop(): void {
    const child = this.child;
    this.child = undefined;
    if (child && child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }
}
