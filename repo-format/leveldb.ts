/**
 * LevelDB (classic-level), loaded when a database is first opened: its module and native addon cost ~20 ms of
 * CPU, which commands that never open one (init, list, show, forget of a folder repository …) need not pay.
 */
import type { ClassicLevel, DatabaseOptions } from 'classic-level';

export type LevelDb = ClassicLevel<Buffer, Buffer>;

/** A closed LevelDB of Buffer keys and values at `path` (open it with `open()`). */
export async function levelDb(path: string, options: Omit<DatabaseOptions<Buffer, Buffer>, 'keyEncoding' | 'valueEncoding'>): Promise<LevelDb> {
  const { ClassicLevel } = await import('classic-level');
  return new ClassicLevel<Buffer, Buffer>(path, { ...options, keyEncoding: 'buffer', valueEncoding: 'buffer' });
}
