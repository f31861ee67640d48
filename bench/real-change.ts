/**
 * The real image's incremental change (issue 15): about 1% of the image's allocated bytes rewritten in place,
 * as a package upgrade rewrites files, by a recipe that gives the same bytes on every run on one image.
 *
 * Recipe: the regular files directly in /usr/bin and /usr/lib/x86_64-linux-gnu of the ext4 image (listed by
 * `debugfs -R 'ls -p DIR'`, no mount, no root), sorted by path, shuffled with SeededRandom('real-change'); files
 * up to 4 MiB are taken in that order until their sizes reach `fraction` of the image's allocated bytes. Every
 * 4 KiB data block of each taken file (`debugfs -R 'blocks PATH'`) is XORed with 0x5a in the image: the
 * content changes in every block, its compressibility does not (XOR with a constant keeps every repeat), the
 * file system's metadata is untouched (the image stays a valid ext4).
 */
import { open, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { SeededRandom } from '../engine/index.js';
import { run } from './tools.js';

const DIRECTORIES = ['/usr/bin', '/usr/lib/x86_64-linux-gnu'];
const LARGEST_FILE = 4 * 1024 * 1024;
const FS_BLOCK = 4096;

export interface RealChange {
  files: number;
  /** Bytes of the data blocks XORed (whole 4 KiB blocks, a file's last partial block included). */
  bytes: number;
}

/** Regular files directly in `dir` of the ext4 image, with their sizes, as debugfs lists them. */
async function listFiles(image: string, dir: string): Promise<{ path: string; size: number }[]> {
  const { stdout } = await run('debugfs', ['-R', `ls -p ${dir}`, image]);
  const files: { path: string; size: number }[] = [];
  for (const line of stdout.split('\n')) {
    // /inode/mode/uid/gid/name/size/
    const fields = line.split('/');
    if (fields.length < 7 || !fields[2]!.startsWith('100')) continue;
    files.push({ path: `${dir}/${fields[5]}`, size: Number(fields[6]) });
  }
  return files;
}

export async function applyRealChange(image: string, allocatedBytes: number, fraction: number, scratch: string): Promise<RealChange> {
  const candidates = (await Promise.all(DIRECTORIES.map((dir) => listFiles(image, dir))))
    .flat()
    .filter((f) => f.size > 0 && f.size <= LARGEST_FILE)
    .sort((a, b) => (a.path < b.path ? -1 : a.path > b.path ? 1 : 0));
  const random = new SeededRandom('real-change');
  for (let i = candidates.length - 1; i > 0; i -= 1) {
    const j = random.below(i + 1);
    [candidates[i], candidates[j]] = [candidates[j]!, candidates[i]!];
  }
  const chosen: string[] = [];
  let planned = 0;
  for (const file of candidates) {
    if (planned >= allocatedBytes * fraction) break;
    chosen.push(file.path);
    planned += file.size;
  }
  const commands = join(scratch, 'real-change.debugfs');
  await writeFile(commands, chosen.map((path) => `blocks ${path}\n`).join(''));
  const { stdout } = await run('debugfs', ['-f', commands, image]);
  await rm(commands, { force: true });
  const blocks = stdout
    .split('\n')
    .filter((line) => /^\d+( \d+)*\s*$/.test(line.trim()) && line.trim() !== '')
    .flatMap((line) => line.trim().split(/\s+/).map(Number));
  const handle = await open(image, 'r+');
  const buffer = Buffer.alloc(FS_BLOCK);
  try {
    for (const block of blocks) {
      const offset = block * FS_BLOCK;
      await handle.read(buffer, 0, FS_BLOCK, offset);
      for (let i = 0; i < FS_BLOCK; i += 1) buffer[i] = buffer[i]! ^ 0x5a;
      await handle.write(buffer, 0, FS_BLOCK, offset);
    }
    await handle.sync();
  } finally {
    await handle.close();
  }
  return { files: chosen.length, bytes: blocks.length * FS_BLOCK };
}
