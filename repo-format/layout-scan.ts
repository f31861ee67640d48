/**
 * What packs/ and backups/ hold, told apart from what merely lies there: a README, an editor's backup
 * file, a directory named like a pack, a copy with a pack's name. Everything that is not a regular file
 * under a pack's or a record's name is a *stray*: listed (verify warns about each), never opened as a
 * pack or record, never deleted. SPEC.md, section 2.
 */
import { readdir, readFile, stat } from 'node:fs/promises';
import type { Dirent } from 'node:fs';
import { join } from 'node:path';
import { CONFIG_FORMAT_NAME, LAYOUT } from './constants.js';
import { EngineError } from './errors.js';

export interface StrayFile {
  /** Relative to the repository root. */
  path: string;
  why: string;
}

const PACK_DIR = /^[0-9a-f]{2}$/;
const PACK_NAME = /^[0-9a-f]{32}$/;
const RECORD_NAME = /^[0-9a-f]{32}$/;

function kindOf(entry: Dirent): string {
  if (entry.isDirectory()) return 'a directory';
  if (entry.isSymbolicLink()) return 'a symbolic link';
  if (entry.isFile()) return 'a file';
  return 'a special file';
}

/**
 * The entries of a directory, sorted, or the errno that stopped the read. A directory that is absent holds
 * nothing: a copy made by a tool that keeps no empty directory (git, some sync tools) lacks the empty ones.
 */
async function entries(path: string): Promise<Dirent[] | string> {
  try {
    return (await readdir(path, { withFileTypes: true })).sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    return code === 'ENOENT' ? [] : (code ?? String(error));
  }
}

function unreadable(root: string, dir: string, errno: string): EngineError {
  return new EngineError('ENGINE_CORRUPT_METADATA', `${join(root, dir)} cannot be read (${errno})`, { path: join(root, dir), errno });
}

/** The packs (ids, sorted) and the strays of packs/. */
export async function scanPackFiles(root: string): Promise<{ packs: string[]; strays: StrayFile[] }> {
  const packs: string[] = [];
  const strays: StrayFile[] = [];
  const top = await entries(join(root, LAYOUT.packs));
  if (typeof top === 'string') throw unreadable(root, LAYOUT.packs, top);
  for (const dir of top) {
    const where = `${LAYOUT.packs}/${dir.name}`;
    if (!dir.isDirectory() || !PACK_DIR.test(dir.name)) {
      strays.push({ path: where, why: `${kindOf(dir)} that is not one of the 256 pack directories (00 … ff)` });
      continue;
    }
    const inside = await entries(join(root, where));
    if (typeof inside === 'string') {
      strays.push({ path: where, why: `the pack directory cannot be read (${inside})` });
      continue;
    }
    for (const entry of inside) {
      const path = `${where}/${entry.name}`;
      if (!PACK_NAME.test(entry.name) || !entry.name.startsWith(dir.name)) strays.push({ path, why: `${kindOf(entry)} not named like a pack of this directory` });
      else if (!entry.isFile()) strays.push({ path, why: `${kindOf(entry)} named like a pack` });
      else packs.push(entry.name);
    }
  }
  return { packs, strays };
}

/** The backup records (ids) and the strays of backups/. */
export async function scanRecordFiles(root: string): Promise<{ records: string[]; strays: StrayFile[] }> {
  const records: string[] = [];
  const strays: StrayFile[] = [];
  const all = await entries(join(root, LAYOUT.backups));
  if (typeof all === 'string') throw unreadable(root, LAYOUT.backups, all);
  for (const entry of all) {
    const path = `${LAYOUT.backups}/${entry.name}`;
    if (!RECORD_NAME.test(entry.name)) strays.push({ path, why: `${kindOf(entry)} not named like a backup record` });
    else if (!entry.isFile()) strays.push({ path, why: `${kindOf(entry)} named like a backup record` });
    else records.push(entry.name);
  }
  return { records, strays };
}

/**
 * The folders of the repository folder at `root` that hold its data, for checks by device and inode
 * (host/write-guard.ts: nothing a user names is written inside a repository): the root, its top-level
 * folders (the store's and the host's), packs/<xx>.
 */
export async function repositoryFolderPaths(root: string): Promise<string[]> {
  const top = [LAYOUT.packs, LAYOUT.backups, LAYOUT.index, LAYOUT.tmp, LAYOUT.readers, LAYOUT.writers, LAYOUT.keys, LAYOUT.protected, LAYOUT.quarantine, 'journal'];
  const packs = await readdir(join(root, LAYOUT.packs)).catch(() => [] as string[]);
  return [root, ...top.map((dir) => join(root, dir)), ...packs.map((dir) => join(root, LAYOUT.packs, dir))];
}

/** Whether `dir` is the root of a repository folder: its config file says it is an engine repository's. */
export async function isRepositoryFolder(dir: string): Promise<boolean> {
  const config = join(dir, LAYOUT.config);
  const stats = await stat(config).catch(() => undefined);
  if (!stats?.isFile() || stats.size > 64 * 1024) return false;
  try {
    return (JSON.parse(await readFile(config, 'utf8')) as { format?: unknown }).format === CONFIG_FORMAT_NAME;
  } catch {
    return false;
  }
}
