/**
 * The quick-start job on an embedded default: a generated VM-like disk image and a local repository.
 * Full backup, change some blocks, second backup (deduplicated), restore both, compare byte for byte,
 * verify every chunk. Fails loudly if any restored byte differs.
 */
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { chmod, mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EngineError } from '../../repo-format/errors.js';
import { checkLocalPath } from '../../repo-format/local-path.js';
import { ensurePrivateDirectory, PRIVATE_DIRECTORY_MODE } from '../../repo-format/file-modes.js';
import { backup } from '../backup/backup.js';
import { initRepository } from '../catalogue/init.js';
import { restore } from '../restore/restore.js';
import { generateImage, mutateImage } from './synthetic-image.js';
import { verify, type VerifyReport } from '../verify/verify.js';
import { Interruption } from '../host/interrupt.js';
import { InterruptedError } from '../errors.js';
import { refuseInsideRepository } from '../host/write-guard.js';
import { defaultCacheRoot } from '../../repo-format/v3/session.js';
import type { BackupRecord } from '../../repo-format/backup-record.js';

export interface DemoOptions {
  dir?: string | undefined;
  size?: number | undefined;
  keep?: boolean | undefined;
  /** SIGINT/SIGTERM: the demo stops (ENGINE_INTERRUPTED) and removes its temporary directory. */
  signal?: AbortSignal | undefined;
  onStep?: ((message: string) => void) | undefined;
}

export interface DemoResult {
  dir: string;
  backups: BackupRecord[];
  verify: VerifyReport;
}

async function fileSha256(path: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(path, { highWaterMark: 4 * 1024 * 1024 })) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

export async function runDemo(options: DemoOptions = {}): Promise<DemoResult> {
  const step = options.onStep ?? (() => undefined);
  if (options.dir !== undefined) checkLocalPath(options.dir, 'demo directory');
  const signal = options.signal;
  const interruption = new Interruption(signal, 'demo', () => (options.dir === undefined ? 'its temporary directory was removed' : `what it made so far stays in ${options.dir}`));
  // The demo makes a repository, an image and restores in its directory: never inside a repository.
  if (options.dir !== undefined) await refuseInsideRepository(options.dir, 'demo directory');
  const dir = options.dir ?? (await mkdtemp(join(tmpdir(), 'engine-demo-')));
  if (options.dir === undefined) await chmod(dir, PRIVATE_DIRECTORY_MODE);
  else await ensurePrivateDirectory(dir);
  const image = join(dir, 'vm-disk.img');
  const repo = join(dir, 'repo');
  // Not a multiple of the block size on purpose: the last block is short.
  const size = options.size ?? 512 * 1024 * 1024 + 4097;
  const keep = options.keep ?? options.dir !== undefined;
  // The repository is of format 3 (the default): this host's cache of it goes with it (SPEC.md 19.4).
  let hostCache: string | undefined;
  // Say first whether the files named below outlive the demo: a temporary directory does not.
  step(keep ? `working in ${dir} (kept afterwards)` : `working in ${dir}, a temporary directory removed when the demo ends (give the demo a directory to keep the image and the repository)`);
  try {
    step(`generating a ${size}-byte VM-like disk image at ${image}`);
    await generateImage(image, size, 'engine-demo', undefined, signal);
    interruption.check();
    const firstHash = await fileSha256(image);
    step(`creating a repository at ${repo}`);
    hostCache = join(defaultCacheRoot(), (await initRepository(repo)).id);
    const first = (await backup({ repo, from: { kind: 'disks', disks: [{ kind: 'raw', path: image }] }, name: 'demo-monday', signal })).record;
    step(`backup ${first.id.slice(0, 8)}: read ${first.disks[0]!.stats.bytesRead} bytes, stored ${first.disks[0]!.stats.bytesStored} new bytes`);
    const writes = await mutateImage(image, 0.02, 'engine-demo/tuesday');
    interruption.check();
    step(`the guest wrote ${writes.length === 1 ? 'once' : `${writes.length} times`} (2% of the disk)`);
    const secondHash = await fileSha256(image);
    const second = (await backup({ repo, from: { kind: 'disks', disks: [{ kind: 'raw', path: image }] }, name: 'demo-tuesday', signal })).record;
    step(`backup ${second.id.slice(0, 8)}: read ${second.disks[0]!.stats.bytesRead} bytes, stored ${second.disks[0]!.stats.bytesStored} new bytes (the rest deduplicated)`);
    for (const [record, expected] of [[first, firstHash], [second, secondHash]] as const) {
      const target = join(dir, `restored-${record.id.slice(0, 8)}.img`);
      await restore({ repo, backupId: record.id, target: { kind: 'file', path: target }, signal });
      const actual = await fileSha256(target);
      if (actual !== expected) throw new EngineError('ENGINE_INTERNAL', `restore of ${record.id} differs from the image it backed up`);
      await rm(target);
      step(`restored ${record.id.slice(0, 8)} to ${target}: identical to the image it backed up (sha256 ${actual.slice(0, 16)}…); the copy is deleted again`);
    }
    const report = await verify({ repo, readData: true, signal });
    step(`verify, reading every chunk: ${report.ok ? 'no problems' : `${report.problems.length} problems`} in ${report.packs} packs, ${report.blobs} blobs`);
    if (!report.ok) throw new EngineError('ENGINE_INTERNAL', `verify found problems: ${report.problems[0]!.message}`);
    return { dir, backups: [first, second], verify: report };
  } catch (error) {
    // Whichever step was interrupted, the demo as a whole is what stopped.
    if (error instanceof InterruptedError) throw interruption.error();
    throw error;
  } finally {
    if (!keep) {
      await rm(dir, { recursive: true, force: true });
      if (hostCache !== undefined) await rm(hostCache, { recursive: true, force: true });
      step(`removed the temporary directory ${dir}`);
    }
  }
}
