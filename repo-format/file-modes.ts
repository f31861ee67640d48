/**
 * File modes of everything the engine creates (SPEC.md, section 2.1): private to its owner, whatever the
 * umask. A repository holds every backed-up disk in the clear (plain repositories) and the key file that
 * passphrases are guessed against (encrypted ones); restore targets, mounts and overlays hold disk content.
 *
 *   directories                                  0700
 *   files written once, never changed in place   0400   (packs, records, config, key file, markers, lock, registrations)
 *   files changed in place, or by their owner    0600   (the LevelDB index, journals, restore targets, overlays, state)
 *
 * mkdir() and open() apply the process umask, which can only remove bits (a umask of 0277 leaves a
 * directory its non-root owner cannot write into), so every creation here is followed by an explicit chmod.
 */
import { chmod, lstat, mkdir, open, readdir, type FileHandle } from 'node:fs/promises';
import { dirname, join, relative, resolve } from 'node:path';

export const PRIVATE_DIRECTORY_MODE = 0o700;
export const IMMUTABLE_FILE_MODE = 0o400;
export const MUTABLE_FILE_MODE = 0o600;
/** Permission bits of the group and of other users: none of them is set on what the engine creates. */
export const GROUP_OTHER_BITS = 0o077;

/**
 * Creates `path` and any missing parents as private directories (0700 each, whatever the umask). An existing
 * directory is left as it is. Returns the first directory created (as mkdir does), or undefined.
 */
export async function ensurePrivateDirectory(path: string): Promise<string | undefined> {
  const first = await mkdir(path, { recursive: true, mode: PRIVATE_DIRECTORY_MODE });
  if (first === undefined) return undefined;
  // chmod every directory this call created: from `path` up to (and including) `first`.
  const top = resolve(first);
  for (let dir = resolve(path); ; dir = dirname(dir)) {
    await chmod(dir, PRIVATE_DIRECTORY_MODE);
    if (dir === top || dirname(dir) === dir) break;
  }
  return first;
}

/** Creates one new private directory; fails (EEXIST) if it exists. */
export async function createPrivateDirectory(path: string): Promise<void> {
  await mkdir(path, { mode: PRIVATE_DIRECTORY_MODE });
  await chmod(path, PRIVATE_DIRECTORY_MODE);
}

/**
 * Opens a file that this call creates (`flags` 'wx' or 'w'), with exactly `mode` whatever the umask. The
 * handle stays writable whatever the mode: permissions are checked when a file is opened, not on writes.
 */
export async function openNewFile(path: string, flags: string, mode: number): Promise<FileHandle> {
  const handle = await open(path, flags, mode);
  try {
    await handle.chmod(mode);
  } catch (error) {
    await handle.close().catch(() => undefined);
    throw error;
  }
  return handle;
}

/**
 * Makes a directory tree that another program writes (LevelDB creates its files under the umask) private:
 * directories 0700, files 0600. Symbolic links are left alone.
 */
export async function makeTreePrivate(dir: string): Promise<void> {
  await chmod(dir, PRIVATE_DIRECTORY_MODE);
  for (const entry of await readdir(dir, { withFileTypes: true })) {
    const path = join(dir, entry.name);
    if (entry.isDirectory()) await makeTreePrivate(path);
    // A file LevelDB deleted between readdir and chmod is fine.
    else if (entry.isFile()) await chmod(path, MUTABLE_FILE_MODE).catch(() => undefined);
  }
}

export interface LooseMode {
  /** Relative to the directory checked ('.' for the directory itself). */
  path: string;
  /** The permission bits found, e.g. 0o755. */
  mode: number;
}

/**
 * Every file and directory under `root` (and `root` itself) that its group or other users may read, write
 * or enter. Counts them all and keeps the first `keep` as examples: the walk costs one lstat per file.
 */
export async function findLooseModes(root: string, keep = 10): Promise<{ count: number; examples: LooseMode[] }> {
  const found = { count: 0, examples: [] as LooseMode[] };
  const visit = async (path: string): Promise<void> => {
    const stats = await lstat(path).catch(() => undefined);
    // Gone meanwhile (a temp file), or a symbolic link: its own mode means nothing.
    if (!stats || stats.isSymbolicLink()) return;
    const mode = stats.mode & 0o7777;
    if ((mode & GROUP_OTHER_BITS) !== 0) {
      found.count += 1;
      if (found.examples.length < keep) found.examples.push({ path: relative(root, path) || '.', mode });
    }
    if (stats.isDirectory()) {
      const names = await readdir(path).catch(() => [] as string[]);
      for (const name of names.sort()) await visit(join(path, name));
    }
  };
  await visit(root);
  return found;
}

/** 0o755 → "0755". */
export function formatMode(mode: number): string {
  return `0${(mode & 0o777).toString(8).padStart(3, '0')}`;
}
