/**
 * Where the engine may write what a user names. Every command that creates or overwrites a file, a
 * directory, a socket or a device a user named (restore targets of every kind, a mount point, a serve
 * socket or overlay directory, the demo's directory, a new repository) asks here first:
 *
 * - never inside a repository: not the one the command reads, nor any other (a `config` that is an engine
 *   repository's in any directory above the path), through whatever path: symlinks are resolved, and
 *   directories are compared by device and inode, so a bind mount of the repository (or of its packs/)
 *   elsewhere is recognised; an existing file with other hard links is compared with the repository's files;
 * - not onto the source a backup was read from (restore only): a plain restore over its own source is
 *   refused unless forced (a failure half-way would leave neither the old disk nor the backup's), and a qcow2
 *   image is never overwritten with raw bytes unless forced. Rolling a source back (a rollback restore) is
 *   what rollback is for and is allowed.
 *
 * Paths can lie (symlinks, bind mounts, hard links, `..`); device and inode numbers cannot.
 */
import { readdir, realpath, stat } from 'node:fs/promises';
import type { BigIntStats } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { isRepositoryFolder, repositoryFolderPaths } from '../../repo-format/layout-scan.js';
import { isErrnoException } from '../../repo-format/errors.js';
import { isS3Url } from '../../repo-format/storage/s3-url.js';
import type { BackupRecord } from '../../repo-format/backup-record.js';
import { TargetProtectedError, TargetUnwritableError, withRemedies } from '../errors.js';

type Identity = string;

function identityOf(stats: BigIntStats): Identity {
  return `${stats.dev}:${stats.ino}`;
}

/** The path's stats, undefined when it does not exist; a path that cannot be checked is refused, said. */
async function statOrUndefined(path: string): Promise<BigIntStats | undefined> {
  try {
    return await stat(path, { bigint: true });
  } catch (error) {
    if (isErrnoException(error) && (error.code === 'ENOENT' || error.code === 'ENOTDIR')) return undefined;
    throw new TargetUnwritableError(path, `it cannot be checked (${isErrnoException(error) ? error.code : String(error)})`);
  }
}

/** Device and inode of every directory of the repository at `root` (about 270 stats), each with its path. */
async function repositoryDirectories(root: string): Promise<Map<Identity, string>> {
  const found = new Map<Identity, string>();
  const add = async (path: string): Promise<void> => {
    const stats = await statOrUndefined(path);
    if (stats?.isDirectory()) found.set(identityOf(stats), path);
  };
  for (const path of await repositoryFolderPaths(root)) await add(path);
  return found;
}

/** Whether `dir` is the root of an engine repository folder (its config says so). */
const isRepositoryRoot = isRepositoryFolder;

/**
 * The real path of `path` as far as it exists, and the directories from there up to `/` (the path itself
 * first when it exists). A path that does not exist yet is judged by the directory it would be created in.
 */
async function existingChain(path: string): Promise<{ real: string; exists: boolean; chain: string[] }> {
  let at = resolve(path);
  let exists = true;
  while ((await statOrUndefined(at)) === undefined) {
    exists = false;
    const parent = dirname(at);
    if (parent === at) break;
    at = parent;
  }
  const real = await realpath(at).catch(() => at);
  const chain: string[] = [];
  for (let dir = real; ; dir = dirname(dir)) {
    chain.push(dir);
    if (dirname(dir) === dir) break;
  }
  return { real, exists, chain };
}

/** The repository files with the same device and inode as `target` (a hard link into the repository). */
async function linkedRepositoryFile(root: string, target: BigIntStats): Promise<string | undefined> {
  const rootStats = await statOrUndefined(root);
  if (!rootStats || rootStats.dev !== target.dev) return undefined;
  const wanted = identityOf(target);
  const visit = async (dir: string, depth: number): Promise<string | undefined> => {
    for (const name of await readdir(dir).catch(() => [] as string[])) {
      const path = join(dir, name);
      const stats = await stat(path, { bigint: true }).catch(() => undefined);
      if (!stats) continue;
      if (stats.isFile() && identityOf(stats) === wanted) return path;
      if (stats.isDirectory() && depth < 3) {
        const found = await visit(path, depth + 1);
        if (found) return found;
      }
    }
    return undefined;
  };
  return visit(root, 0);
}

/**
 * Refuses (ENGINE_TARGET_PROTECTED) a path inside `repository` (the one the command works on, if any) or
 * inside any other engine repository. `what` names the path in the message ("restore target").
 */
export async function refuseInsideRepository(path: string, what: string, repository?: string): Promise<void> {
  const { real, exists, chain } = await existingChain(path);
  // An s3:// repository has no folder here to write into (it is no path: never resolved as one).
  if (repository !== undefined && isS3Url(repository)) repository = undefined;
  const own = repository === undefined ? new Map<Identity, string>() : await repositoryDirectories(resolve(repository));
  for (const dir of chain) {
    const stats = await statOrUndefined(dir);
    if (!stats) continue;
    const owned = own.get(identityOf(stats));
    const resolved = exists && real !== resolve(path) ? ` (${real})` : '';
    if (owned !== undefined) {
      const where = owned === dir ? `inside the repository ${resolve(repository!)}` : `inside the repository: ${dir} is its ${owned} under another path (a bind mount or a link)`;
      throw new TargetProtectedError(path, `the ${what}${resolved} is ${where}; the engine never writes there`, { repository: resolve(repository!) });
    }
    if (await isRepositoryRoot(dir)) {
      throw new TargetProtectedError(path, `the ${what}${resolved} is inside the engine repository ${dir}; the engine never writes there`, { repository: dir });
    }
  }
  if (exists && repository !== undefined) {
    const stats = await statOrUndefined(real);
    if (stats?.isFile() && stats.nlink > 1n) {
      const linked = await linkedRepositoryFile(resolve(repository), stats);
      if (linked) throw new TargetProtectedError(path, `the ${what} is a hard link to ${linked} of the repository; the engine never writes there`, { repository: resolve(repository) });
    }
  }
}

/**
 * Refuses (ENGINE_TARGET_PROTECTED) a new repository inside an existing one (`init REPO/packs/ab`, or through
 * a symlink into it). An existing repository at the path itself is left to init's own refusal
 * (ENGINE_REPOSITORY_EXISTS), which says so more plainly.
 */
export async function refuseRepositoryInsideRepository(path: string): Promise<void> {
  if (await isRepositoryRoot(resolve(path))) return;
  await refuseInsideRepository(path, 'new repository');
}

/** The local path a disk was read from, where there is one (files, block devices, qcow2 images, libvirt disks). */
function sourcePathOf(source: BackupRecord['disks'][number]['source']): string | undefined {
  const recorded = (source as { realPath?: unknown }).realPath;
  if (typeof recorded === 'string') return recorded;
  if (source.kind === 'libvirt-disk') return /\((\/.*)\)$/.exec(source.path)?.[1];
  if (source.kind !== 'file' && source.kind !== 'block-device' && source.kind !== 'qcow2-image') return undefined;
  // Records made before realPath was recorded hold the path as given: only an absolute one means anything here.
  return source.path.startsWith('/') ? source.path : undefined;
}

/** Same file (device and inode) or, for block devices, same device (major and minor), whatever the path. */
function sameTarget(a: BigIntStats, b: BigIntStats): boolean {
  if (a.isBlockDevice() || b.isBlockDevice()) return a.isBlockDevice() && b.isBlockDevice() && a.rdev === b.rdev;
  return a.dev === b.dev && a.ino === b.ino;
}

/**
 * Refuses to write `path` when it is the source of a disk of `record` (ENGINE_TARGET_PROTECTED), unless
 * `force`, or a rollback of a raw source (`rollback`), which is rollback's purpose.
 */
export async function refuseBackupSource(path: string, record: BackupRecord, options: { force: boolean; rollback: boolean }): Promise<void> {
  if (options.force) return;
  const target = await statOrUndefined(path);
  if (!target) return;
  for (const disk of record.disks) {
    const sourcePath = sourcePathOf(disk.source);
    if (sourcePath === undefined) continue;
    const source = await statOrUndefined(sourcePath).catch(() => undefined);
    if (!source || !sameTarget(source, target)) continue;
    const qcow2 = disk.source.kind === 'qcow2-image' || (disk.source.kind === 'libvirt-disk' && !target.isBlockDevice());
    if (options.rollback && !qcow2) continue;
    const why = qcow2
      ? `it is the image that disk ${disk.name} of backup ${record.id} was read from (${sourcePath}), and raw bytes would destroy it`
      : `it is the source that disk ${disk.name} of backup ${record.id} was read from (${sourcePath}), and a restore that fails half-way would leave neither the old disk nor the backup's`;
    const override = { kind: 'override', option: 'force', to: 'overwrite it all the same' } as const;
    const details = { backup: record.id, disk: disk.name, source: sourcePath };
    throw new TargetProtectedError(path, why, qcow2 ? withRemedies(details, { kind: 'new-image' }, { kind: 'rollback-through-nbd' }, override) : withRemedies(details, { kind: 'rollback' }, override));
  }
}
