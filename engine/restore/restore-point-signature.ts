/**
 * What `blkid -p` finds at the start of a restore point: its filesystem or partition-table UUID, so that
 * a rollback onto a device can tell the same disk (an older state of it: same UUID, no --force needed)
 * from another disk that happens to hold data (--force).
 *
 * The first MiB of the disk (or the whole of a smaller one) is written into a sparse scratch file of the
 * disk's size in a private temporary directory (every signature blkid knows lies there: MBR, GPT, LVM,
 * md, ext*, xfs, btrfs at 64 KiB, swap), probed, and removed.
 */
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import { MUTABLE_FILE_MODE, openNewFile, PRIVATE_DIRECTORY_MODE } from '../../repo-format/file-modes.js';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { mapRootOf, type DiskRecord } from '../../repo-format/backup-record.js';
import { readMap, runChunks } from '../../repo-format/block-map.js';
import type { Repository } from '../../repo-format/repository.js';
import { probeSignature, type Signature } from './target-in-use.js';

const PROBED_BYTES = 1024 * 1024;

export async function restorePointSignature(repo: Repository, disk: DiskRecord): Promise<Signature> {
  const scratch = await mkdtemp(join(tmpdir(), 'engine-probe-'));
  try {
    // The head of a backed-up disk: private, as every file the engine makes (SPEC.md, 2.1).
    await chmod(scratch, PRIVATE_DIRECTORY_MODE);
    const image = join(scratch, 'head.img');
    const handle = await openNewFile(image, 'wx', MUTABLE_FILE_MODE);
    try {
      await handle.truncate(disk.size);
      const wanted = Math.min(PROBED_BYTES, disk.size);
      for await (const run of readMap(mapRootOf(disk), repo.loadPage)) {
        if (run.firstBlock * repo.blockSize >= wanted) break;
        const { ids, blocks } = runChunks(run);
        for (const [i, block] of blocks.entries()) {
          if (block * repo.blockSize >= wanted) break;
          await handle.write(await repo.readBlob(ids[i]!, `chunk of backup disk ${disk.name} at offset ${block * repo.blockSize}`), 0, undefined, block * repo.blockSize);
        }
      }
    } finally {
      await handle.close();
    }
    return await probeSignature(image);
  } finally {
    await rm(scratch, { recursive: true, force: true });
  }
}
