/**
 * The LevelDB options of every database the engine opens, in one place, per use (SPEC.md 19.4, "Memory").
 *
 * What makes a LevelDB process's resident memory grow with the number of entries is not its caches but its
 * table files: LevelDB maps each table it holds open (up to 1000 of them) into memory, and every page a
 * lookup or a compaction touches stays resident (counted in RSS) for as long as the table stays open. With
 * the default table cache (1000 open files of 2 MiB) that is the whole database: ~127 MiB at 2M entries,
 * growing linearly. Capping the open tables and their size caps it: at most (maxOpenFiles - 10) tables are
 * mapped (LevelDB keeps 10 of its open files for its logs and manifest), of maxFileSize bytes as
 * compactions write them (level-0 tables, a memtable flushed whole, hold up to writeBufferSize; there are
 * a few of them at a time), whatever the number of entries; a table evicted from the cache is unmapped, and opened again (one open, one mmap, its index
 * and filter read) when a lookup needs it. The block cache (cacheSize) serves only tables read with pread,
 * which mapped tables are not: it stays at LevelDB's default.
 */
export type LevelUse = 'index-cache' | 'index-store' | 'gc-index';

export interface LevelOptions {
  keyEncoding: 'buffer';
  valueEncoding: 'buffer';
  /** Tables held open (and mapped) at once, plus 10: the bound of the mapped part of RSS. */
  maxOpenFiles: number;
  /** Bytes per table file: with maxOpenFiles, the bound of the mapped part of RSS. */
  maxFileSize: number;
  /** The memtable's size (LevelDB holds at most two: the one written and the one being flushed). */
  writeBufferSize: number;
  /** The block cache's size (LevelDB's default 8 MiB where absent). */
  cacheSize?: number;
  /** Snappy on table blocks (LevelDB's default, on, where absent). */
  compression?: boolean;
}

/** LevelDB's own reserve of open files outside its table cache (its log, manifest, lock and current). */
const NON_TABLE_FILES = 10;
const MiB = 1024 * 1024;

/**
 * Every use holds at most this many tables mapped: 64 × 1 MiB (plus the few level-0 tables of up to 4 MiB)
 * of RSS, under 100 MiB whatever the entry count.
 * 64 is the fewest LevelDB allows (it raises a smaller maxOpenFiles to 74), so the bound is set by the
 * table size: 1 MiB rather than LevelDB's 2 MiB. Measured at 2M entries (bench/v3-index-memory.ts, paired,
 * load 30-40): catch-up 423 -> 300 MiB peak (with the cache's chained batches); a fresh process's lookup
 * 21 -> 35 CPU-µs per new id, 41 -> 55 per indexed one (one round each, loaded): ~0.015 CPU-s more per GiB of 1 MiB blocks.
 */
const TABLE_FILES: Record<LevelUse, number> = { 'index-cache': 64, 'index-store': 64, 'gc-index': 64 };
const TABLE_FILE_SIZE = 1 * MiB;

/**
 * gc's working index is a scratch database written once and read in order, never looked up at random: a small
 * block cache (the default is 8 MiB) and no compression (keys are random ids, values locations: snappy finds
 * nothing to take and costs CPU).
 */
const PER_USE: Record<LevelUse, Pick<LevelOptions, 'cacheSize' | 'compression'>> = {
  'index-cache': {},
  'index-store': {},
  'gc-index': { cacheSize: 1 * MiB, compression: false },
};

/** The options to open a database for `use` with (and `extra`: createIfMissing, errorIfExists). */
export function levelOptions<T extends object>(use: LevelUse, extra: T): LevelOptions & T {
  return {
    keyEncoding: 'buffer',
    valueEncoding: 'buffer',
    maxOpenFiles: TABLE_FILES[use] + NON_TABLE_FILES,
    maxFileSize: TABLE_FILE_SIZE,
    writeBufferSize: 4 * MiB,
    ...PER_USE[use],
    ...testOverride(),
    ...extra,
  };
}

/**
 * For the benches only, like ENGINE_TEST_CACHE_BATCH: ENGINE_TEST_LEVEL_OPTIONS='{"maxOpenFiles":74}'
 * overrides the numbers above, so that the trade-off of each can be measured on one build.
 */
function testOverride(): Partial<Pick<LevelOptions, 'maxOpenFiles' | 'maxFileSize' | 'writeBufferSize'>> {
  const text = process.env.ENGINE_TEST_LEVEL_OPTIONS;
  if (!text) return {};
  const parsed = JSON.parse(text) as Record<string, unknown>;
  const picked: Record<string, number> = {};
  for (const name of ['maxOpenFiles', 'maxFileSize', 'writeBufferSize']) {
    const value = parsed[name];
    if (typeof value === 'number' && Number.isSafeInteger(value) && value > 0) picked[name] = value;
  }
  return picked;
}
