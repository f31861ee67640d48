/**
 * `engine migrate REPO` (SPEC.md 19.11): a version-1 or -2 repository on a folder becomes version 3 in place,
 * under the version-1/2 lock. Packs, records, key file, markers stay as they are (19.1); what changes is the
 * index (LevelDB → segments), the config, and the host-side files version 3 has no use for. In order, each
 * step durable before the next:
 *
 * 1. segments naming every blob entry of the LevelDB index are written into `tmp/migrate-index/` (each
 *    durable), then `leases/`, then the empty marker `tmp/migrate-index.done`;
 * 2. `index/` is renamed `index.v2/`, then `tmp/migrate-index/` renamed `index/`, the directory fsynced;
 * 3. the version-3 config replaces the old one (temporary file, fsync, rename, fsync): the commit point;
 * 4. `index.v2/`, `readers/`, `writers/`, `journal/` (empty), `tmp/`, `reserve` are deleted, and last `lock`.
 *
 * A crash leaves one of 19.11's rows: before 2 a version-1/2 repository (tmp/ is any lock holder's to
 * clear); between the renames one without `index/`, rebuilt from the packs at the next open; after 2 and
 * before 3 a repository *mid-migration* (`index.v2/` beside an `index/` that is no LevelDB), which every
 * command but migrate refuses (Repository.open) and migrate takes on from 3; after 3 a version-3 repository
 * whose leftovers version 3 ignores and migrate, run again, removes.
 */
import { mkdir, readdir, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { LAYOUT } from '../constants.js';
import { configCompression, encodeConfig, isManyWriters, newConfig, type RepositoryConfig } from '../config.js';
import { fsyncDirectory, writeFileDurably } from '../durable-file.js';
import { createPrivateDirectory, PRIVATE_DIRECTORY_MODE } from '../file-modes.js';
import { crashPoint } from '../crash-points.js';
import { LocalStorage } from '../storage/local.js';
import type { IndexEntry } from '../index-entry.js';
import { encodeSegment, type SegmentEntry } from './segment.js';
import { FLUSH_ENTRIES } from './segment-writer.js';

/** Where step 1 builds the segments, and the marker that they are complete (relative to the root). */
export const MIGRATE_INDEX = `${LAYOUT.tmp}/migrate-index`;
export const MIGRATE_DONE = `${LAYOUT.tmp}/migrate-index.done`;
/** Where step 2 puts the LevelDB index aside until step 4. */
export const OLD_INDEX = 'index.v2';
/** What version 3 has no use for (step 4), `lock` excepted: it goes last, with the lock's release. */
const LEFTOVERS = [OLD_INDEX, LAYOUT.readers, LAYOUT.writers, 'journal', LAYOUT.reserve, LAYOUT.tmp];

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    () => true,
    () => false,
  );
}

/**
 * Whether a folder repository is mid-migration (19.11, after step 2 and before step 3): `index.v2/` beside an
 * `index/` that holds no LevelDB. An interrupted step 2 (no `index/`) is not: its index is rebuilt from the
 * packs, as any lost index.
 */
export async function isMidMigration(root: string): Promise<boolean> {
  if (!(await exists(join(root, OLD_INDEX)))) return false;
  if (!(await exists(join(root, LAYOUT.index)))) return false;
  return !(await exists(join(root, LAYOUT.index, 'CURRENT')));
}

/** Leftovers of an earlier migration cut short before step 2 ended (under the lock, before starting over). */
export async function clearEarlierAttempt(root: string): Promise<void> {
  await rm(join(root, MIGRATE_INDEX), { recursive: true, force: true });
  await rm(join(root, MIGRATE_DONE), { force: true });
  // index/ is the live LevelDB here (Repository.open rebuilt it if a crash between the renames lost it).
  await rm(join(root, OLD_INDEX), { recursive: true, force: true });
}

/**
 * Step 1: every entry of the index, in id order, as segments of one new writer (sealed with the data key
 * of an encrypted repository, under their final keys `index/<writer>-<seq>`), then `leases/` and the marker.
 * Memory: one segment's entries (FLUSH_ENTRIES).
 */
export async function writeMigrationSegments(root: string, entries: AsyncIterable<IndexEntry>, options: { dataKey?: Uint8Array | undefined; tick?: () => Promise<void> }): Promise<{ segments: number; blobs: number }> {
  await createPrivateDirectory(join(root, MIGRATE_INDEX));
  const building = new LocalStorage(join(root, LAYOUT.tmp));
  const writer = randomBytes(16).toString('hex');
  let seq = 0;
  let blobs = 0;
  let pending: SegmentEntry[] = [];
  const flush = async (): Promise<void> => {
    if (pending.length === 0) return;
    const segment = { name: { writer, seq }, supersedes: [], entries: pending };
    await building.put(`migrate-index/${writer}-${seq.toString(16).padStart(8, '0')}`, encodeSegment(segment, { dataKey: options.dataKey }), { ifAbsent: true });
    if (seq === 0) crashPoint('migrate-segment-written');
    seq += 1;
    pending = [];
  };
  try {
    for await (const entry of entries) {
      await options.tick?.();
      pending.push({ id: entry.id, packId: entry.packId, offset: entry.offset, length: entry.length, rawLength: entry.rawLength, kind: entry.kind, flags: entry.flags });
      blobs += 1;
      if (pending.length >= FLUSH_ENTRIES) await flush();
    }
    await flush();
  } finally {
    await building.close();
  }
  await fsyncDirectory(join(root, MIGRATE_INDEX));
  await mkdir(join(root, 'leases'), { mode: PRIVATE_DIRECTORY_MODE }).catch((error: unknown) => {
    if ((error as NodeJS.ErrnoException).code !== 'EEXIST') throw error;
  });
  await fsyncDirectory(root);
  await writeFileDurably(join(root, MIGRATE_DONE), new Uint8Array(0), { tempDir: join(root, LAYOUT.tmp) });
  return { segments: seq, blobs };
}

/** Step 2: the LevelDB index aside, the segments in its place, made durable. */
export async function swapInSegments(root: string): Promise<void> {
  await rename(join(root, LAYOUT.index), join(root, OLD_INDEX));
  crashPoint('migrate-index-aside');
  await rename(join(root, MIGRATE_INDEX), join(root, LAYOUT.index));
  await fsyncDirectory(root);
  crashPoint('migrate-index-swapped');
}

/** The version-3 config of a version-1/2 one: same id, block size, creation time, encryption and compression. */
export function version3Config(old: RepositoryConfig): RepositoryConfig {
  return newConfig(old.id, old.blockSize, new Date(old.created), old.encryption, true, configCompression(old));
}

/** Step 3, the commit point: the config rewritten whole and durably (the one rewrite of a config, as 3.2's). */
export async function writeVersion3Config(root: string, old: RepositoryConfig): Promise<RepositoryConfig> {
  if (isManyWriters(old)) return old;
  const config = version3Config(old);
  await writeFileDurably(join(root, LAYOUT.config), encodeConfig(config), { tempDir: join(root, LAYOUT.tmp), mode: 0o400 });
  await fsyncDirectory(root);
  crashPoint('migrate-config-written');
  return config;
}

/** Step 4 but the lock: what version 3 has no use for. Returns what it removed. */
export async function removeLeftovers(root: string): Promise<string[]> {
  const removed: string[] = [];
  for (const name of LEFTOVERS) {
    if (!(await exists(join(root, name)))) continue;
    await rm(join(root, name), { recursive: true, force: true });
    removed.push(name);
    if (removed.length === 1) crashPoint('migrate-leftover-removed');
  }
  await fsyncDirectory(root);
  return removed;
}

/** A version-3 folder that still has a lock file (a migration cut short after its commit point): removed last. */
export async function removeLeftoverLock(root: string): Promise<boolean> {
  if (!(await exists(join(root, LAYOUT.lock)))) return false;
  await rm(join(root, LAYOUT.lock), { force: true });
  await fsyncDirectory(root);
  return true;
}

/** The names at the top of a folder repository (for the report and tests). */
export async function topLevel(root: string): Promise<string[]> {
  return (await readdir(root)).sort();
}
