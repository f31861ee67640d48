/**
 * The guest disks and trees of the file-restore tests (files-vm.test.ts, files-fuse.test.ts): the disks built once
 * per machine and version of their script (filesDisks), and a folder's files by name with their bytes' hash,
 * modes, owners, times and symlink targets, compared with the guest's originals.
 */
import { expect } from 'vitest';
import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { lstat, readdir, readFile, readlink, rm } from 'node:fs/promises';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { CACHE_ROOT } from './guest/tiny-guest.js';

const BUILD = fileURLToPath(new URL('./guest/build-files-disks.sh', import.meta.url));
/** Held while the disks are built: test files that start at once build them once, the others wait and take them. */
const LOCK = '/run/lock/engine-test-files-disks.lock';

let building: Promise<string> | undefined;

/**
 * The folder of test/guest/build-files-disks.sh's output (src/, vda.img, vdb.img, vdc.img), built once per version
 * of the script and kept in the tests' cache folder (as the tiny guest is): ~10 s of loop devices, mkfs and copies
 * that every file-restore test file needs the same. Shared: read it, never write to it.
 */
export function filesDisks(): Promise<string> {
  building ??= buildOnce();
  return building;
}

async function buildOnce(): Promise<string> {
  const version = createHash('sha256').update(await readFile(BUILD)).digest('hex').slice(0, 16);
  const dir = join(CACHE_ROOT, `files-disks-${version}`);
  // Built aside and renamed into place under the lock: a folder there is whole.
  const script = 'set -e; mkdir -p "$(dirname "$2")"; exec 8>"$1"; flock 8; [ -d "$2" ] && exit 0; rm -rf "$3"; bash "$4" "$3"; mv -T "$3" "$2"';
  await new Promise<void>((resolve, reject) =>
    execFile('bash', ['-c', script, 'build-files-disks', LOCK, dir, `${dir}.${process.pid}.tmp`, BUILD], { maxBuffer: 16 * 1024 * 1024 }, (error, _stdout, stderr) =>
      error ? reject(new Error(`building the file-restore disks failed: ${stderr.trim() || error.message}`)) : resolve(),
    ),
  );
  // Disks of older versions of the script are of no further use (~200 MB each).
  for (const name of await readdir(CACHE_ROOT)) {
    if (name.startsWith('files-disks-') && name !== `files-disks-${version}` && !name.endsWith('.tmp')) await rm(join(CACHE_ROOT, name), { recursive: true, force: true });
  }
  return dir;
}

export interface Node {
  type: 'file' | 'directory' | 'symlink';
  sha256?: string;
  target?: string;
  mode: number;
  uid: number;
  gid: number;
  mtimeNs: bigint;
}

export async function tree(root: string, rename: (name: string) => string = (name) => name): Promise<Map<string, Node>> {
  const nodes = new Map<string, Node>();
  const walk = async (at: string, relative: string): Promise<void> => {
    for (const name of (await readdir(at)).sort()) {
      const path = join(at, name);
      const key = relative ? `${relative}/${rename(name)}` : rename(name);
      const info = await lstat(path, { bigint: true });
      const common = { mode: Number(info.mode) % 0o10000, uid: Number(info.uid), gid: Number(info.gid), mtimeNs: info.mtimeNs };
      if (info.isSymbolicLink()) nodes.set(key, { type: 'symlink', target: await readlink(path), ...common });
      else if (info.isDirectory()) {
        nodes.set(key, { type: 'directory', ...common });
        await walk(path, key);
      } else nodes.set(key, { type: 'file', sha256: createHash('sha256').update(await readFile(path)).digest('hex'), ...common });
    }
  };
  await walk(root, '');
  return nodes;
}

/** Same names, types and bytes; with `exact`, also modes, owners, symlink targets and times (to the microsecond). */
export function expectSameTree(got: Map<string, Node>, want: Map<string, Node>, exact: boolean): void {
  expect([...got.keys()].sort()).toEqual([...want.keys()].sort());
  for (const [name, node] of want) {
    const other = got.get(name)!;
    expect({ name, type: other.type, sha256: other.sha256 }).toEqual({ name, type: node.type, sha256: node.sha256 });
    if (!exact) continue;
    if (node.type === 'symlink') {
      expect({ name, target: other.target }).toEqual({ name, target: node.target });
      continue;
    }
    expect({ name, mode: other.mode.toString(8), uid: other.uid, gid: other.gid }).toEqual({ name, mode: node.mode.toString(8), uid: node.uid, gid: node.gid });
    const drift = other.mtimeNs > node.mtimeNs ? other.mtimeNs - node.mtimeNs : node.mtimeNs - other.mtimeNs;
    expect({ name, withinAMicrosecond: drift < 1000n }).toEqual({ name, withinAMicrosecond: true });
  }
}

/** QEMU processes whose parent is `pid` (setpriv execs QEMU, so the command is its parent). */
export async function qemuChildrenOf(pid: number): Promise<number[]> {
  const found: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const status = await readFile(`/proc/${name}/status`, 'utf8').catch(() => '');
    const cmdline = await readFile(`/proc/${name}/cmdline`, 'utf8').catch(() => '');
    // QEMU runs under setpriv, which execs it: the same pid, its parent the command (argv[0] QEMU's path once exec'd).
    if (/^(\S*\/)?qemu-system-x86_64\0/.test(cmdline) && Number(/PPid:\s+(\d+)/.exec(status)?.[1]) === pid) found.push(Number(name));
  }
  return found;
}
