/**
 * Changed-block tracking for an offline qcow2 image (a stopped VM, oVirt's cold backup): the engine owns
 * the bitmap lifecycle.
 *
 * Every backup adds an enabled bitmap `engine-<backup id>` before reading (its checkpoint: it records the
 * writes that come after this backup). An incremental reads the blocks dirty in the previous backup's
 * checkpoint; a differential those dirty in the chain's full checkpoint, which is kept for that. After the
 * record is committed, every other `engine-*` bitmap is removed; after a failure, the new one is.
 *
 * Before trusting a chain the engine checks it; anything wrong means a full read of the disk, said in
 * `modeReason` and never silently an incomplete incremental.
 */
import { mapRootOf, type BackupRecord, type BackupType, type DiskCbt, type DiskRecord } from '../../repo-format/backup-record.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { NbdSource } from '../sources/nbd-source.js';
import type { IncrementalPlan } from '../pipeline/backup-disk.js';
import { addBitmap, bitmapName, bitmapPrefix, imageInfo, removeBitmap, type ImageInfo } from './qcow2-bitmaps.js';
import { serveImage, type RunningExport } from './qemu-nbd-server.js';
import { auditCleanBlocks } from './audit.js';
import type { LoadPage } from '../../repo-format/block-map.js';

export type RequestedMode = 'full' | 'incremental' | 'differential' | 'auto';

export interface ImageDiskSession {
  name: string;
  source: NbdSource;
  plan: IncrementalPlan | undefined;
  mode: BackupType;
  modeReason: string | null;
  parent: string | null;
  cbt: DiskCbt;
  /** Stops the export (before the image's bitmaps can change). */
  release(): Promise<void>;
  /** After the backup record is committed: drop the bitmaps no chain needs any more. */
  finish(): Promise<void>;
  /** After a failure: drop the bitmap this backup added. */
  rollback(): Promise<void>;
}

interface Chain {
  mode: BackupType;
  reason: string | null;
  base: string | null;
  parent: { record: BackupRecord; disk: DiskRecord } | null;
  previous: DiskRecord | null;
}

/** Decides what can be done for this disk, and why not more. `history` is newest first. */
function chooseChain(name: string, requested: RequestedMode, info: ImageInfo, history: BackupRecord[]): Chain {
  const full = (reason: string | null): Chain => ({ mode: 'full', reason, base: null, parent: null, previous: null });
  if (requested === 'full') return full(null);
  const previousRecord = history.find((r) => r.disks.some((d) => d.name === name && d.cbt !== null));
  const previous = previousRecord?.disks.find((d) => d.name === name) ?? null;
  if (!previousRecord || !previous?.cbt) return full('no earlier backup of this disk with changed-block tracking');
  const wanted: BackupType = requested === 'differential' ? 'differential' : 'incremental';
  const base = wanted === 'differential' ? previous.cbt.chainCheckpoint : previous.cbt.checkpoint;
  const parentId = wanted === 'differential' ? previous.cbt.chainFull : previousRecord.id;
  if (info.virtualSize !== previous.size) return full(`the disk size changed from ${previous.size} to ${info.virtualSize} bytes`);
  const bitmap = info.bitmaps.find((b) => b.name === base);
  if (!bitmap) return full(`bitmap ${base} is missing from the image`);
  if (bitmap.flags.includes('in-use')) return full(`bitmap ${base} is inconsistent (the image was not closed cleanly)`);
  if (!bitmap.flags.includes('auto')) return full(`bitmap ${base} is disabled: it stopped recording writes`);
  if (bitmap.granularity !== previous.cbt.granularity) return full(`bitmap ${base} changed granularity from ${previous.cbt.granularity} to ${bitmap.granularity}`);
  const parentRecord = history.find((r) => r.id === parentId);
  const parentDisk = parentRecord?.disks.find((d) => d.name === name);
  if (!parentRecord || !parentDisk) return full(`parent backup ${parentId} of this disk is no longer in the repository`);
  if (parentDisk.size !== info.virtualSize) return full(`the disk size changed since parent backup ${parentId}`);
  return { mode: wanted, reason: null, base, parent: { record: parentRecord, disk: parentDisk }, previous };
}

export async function openImageDisk(args: {
  image: string;
  name: string;
  backupId: string;
  requested: RequestedMode;
  history: BackupRecord[];
  repositoryId: string;
  loadPage: LoadPage;
  blockSize: number;
}): Promise<ImageDiskSession> {
  const { image, name, backupId } = args;
  const before = await imageInfo(image);
  if (before.format !== 'qcow2') {
    throw new InvalidArgumentError(`${image} is a ${before.format} image: --image needs qcow2 (persistent dirty bitmaps); back up raw images with --source`);
  }
  let chain = chooseChain(name, args.requested, before, args.history);
  const checkpoint = bitmapName(args.repositoryId, backupId);
  await addBitmap(image, checkpoint);
  let exported: RunningExport | undefined;
  try {
    const granularity = (await imageInfo(image)).bitmaps.find((b) => b.name === checkpoint)?.granularity;
    if (granularity === undefined) throw new Error(`bitmap ${checkpoint} did not appear in ${image}`);
    exported = await serveImage(image, 'qcow2', chain.base ?? undefined);
    const source = await NbdSource.open(exported.uri, {
      dirtyContext: chain.base ? `qemu:dirty-bitmap:${chain.base}` : undefined,
      description: { kind: 'qcow2-image', path: image },
    });
    // Audit the bitmap before trusting it; a mismatch turns this disk into a full read.
    let audited = 0;
    if (chain.parent && chain.base) {
      const audit = await auditCleanBlocks({ source, parent: mapRootOf(chain.parent.disk), loadPage: args.loadPage, dirty: source.dirtyExtents(), blockSize: args.blockSize });
      audited = audit.audited;
      if (audit.mismatch) {
        chain = {
          ...chain,
          mode: 'full',
          reason: `CBT audit: the block at offset ${audit.mismatch.offset} differs from parent backup ${chain.parent.record.id} although bitmap ${chain.base} calls it clean`,
          base: null,
          parent: null,
        };
        audited = 0;
      }
    }
    const previousCbt = chain.previous?.cbt;
    const cbt: DiskCbt = {
      checkpoint,
      base: chain.base,
      chainFull: chain.mode === 'full' || !previousCbt ? backupId : previousCbt.chainFull,
      chainCheckpoint: chain.mode === 'full' || !previousCbt ? checkpoint : previousCbt.chainCheckpoint,
      granularity,
      audited,
    };
    const running = exported;
    return {
      name,
      source,
      plan: chain.parent ? { parent: mapRootOf(chain.parent.disk), dirty: source.dirtyExtents() } : undefined,
      mode: chain.mode,
      modeReason: chain.reason,
      parent: chain.parent?.record.id ?? null,
      cbt,
      release: async () => {
        await source.dispose();
        await running.stop();
      },
      finish: async () => {
        const keep = new Set([cbt.checkpoint, cbt.chainCheckpoint]);
        for (const bitmap of (await imageInfo(image)).bitmaps) {
          if (bitmap.name.startsWith(bitmapPrefix(args.repositoryId)) && !keep.has(bitmap.name)) await removeBitmap(image, bitmap.name);
        }
      },
      rollback: async () => {
        await removeBitmap(image, checkpoint).catch(() => undefined);
      },
    };
  } catch (error) {
    await exported?.stop();
    await removeBitmap(image, checkpoint).catch(() => undefined);
    throw error;
  }
}
