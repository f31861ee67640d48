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
import { realpath } from 'node:fs/promises';
import type { DiskCbt } from '../../repo-format/backup-record.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { withRemedies } from '../errors.js';
import { NbdSource } from '../sources/nbd-source.js';
import { addBitmap, bitmapName, bitmapPrefix, defaultGranularity, imageInfo, removeBitmap, type ImageInfo } from './qcow2-bitmaps.js';
import { serveImage, type RunningExport } from './qemu-nbd-server.js';
import { chooseChain, settleChain, type CbtDiskJob, type CbtSession, type ChainArgs, type ChainFacts } from './chain.js';
import type { BackupRecord } from '../../repo-format/backup-record.js';

/** One image's disk and its bitmap bookkeeping (release stops the export before the bitmaps change). */
export type ImageDiskSession = CbtDiskJob & CbtSession;

/** The checks of a qcow2 bitmap before it is trusted as an incremental's base (pure: exported for its unit test). */
export function bitmapProblem(info: ImageInfo): (base: string, previous: DiskCbt) => string | null {
  return (base, previous) => {
    const bitmap = info.bitmaps.find((b) => b.name === base);
    if (!bitmap) return `bitmap ${base} is missing from the image`;
    if (bitmap.flags.includes('in-use')) return `bitmap ${base} is inconsistent (the image was not closed cleanly)`;
    if (!bitmap.flags.includes('auto')) return `bitmap ${base} is disabled: it stopped recording writes`;
    if (bitmap.granularity !== previous.granularity) return `bitmap ${base} changed granularity from ${previous.granularity} to ${bitmap.granularity}`;
    return null;
  };
}

/**
 * Which earlier backups read this image: those whose checkpoint bitmap it holds. The bitmap names carry
 * the repository and the backup id (qcow2-bitmaps.ts), so an image's own bitmaps are its identity in this
 * repository, whatever its file name, and wherever it was moved: two VMs whose images share a base name
 * never share a chain. Chains made before this rule continue as they were: their records name the same
 * bitmaps.
 */
export function imageIdentity(info: ImageInfo, repositoryId: string, image: string, backupName: string, diskName: string, history: BackupRecord[]): Pick<ChainFacts, 'isThisDisk' | 'whyNoPrevious'> {
  const held = new Set(info.bitmaps.map((b) => b.name).filter((n) => n.startsWith(bitmapPrefix(repositoryId))));
  return {
    isThisDisk: (disk) => disk.cbt !== null && held.has(disk.cbt.checkpoint),
    whyNoPrevious: () => {
      // The old key (backup name and disk name) finds what a user may expect to continue: say why it does not.
      const sameName = history.find((r) => r.name === backupName && r.disks.some((d) => d.name === diskName && d.cbt !== null));
      const disk = sameName?.disks.find((d) => d.name === diskName);
      if (!sameName || !disk?.cbt) return undefined;
      const elsewhere = disk.source.realPath !== undefined && disk.source.realPath !== image ? `, which read ${disk.source.realPath}` : '';
      return `bitmap ${disk.cbt.checkpoint} is missing from the image (the checkpoint of the last backup named ${backupName}, ${sameName.id}${elsewhere}; the image holds none of this repository's: another image of the same name, or its bitmaps were removed)`;
    },
  };
}

export async function openImageDisk(args: ChainArgs & { image: string; name: string; backupName: string; info?: Promise<ImageInfo> | undefined }): Promise<ImageDiskSession> {
  const { image, name, backupId } = args;
  // `info`: the image's `qemu-img info`, started while the repository opened (backup.ts).
  const before = await (args.info ?? imageInfo(image));
  if (before.format !== 'qcow2') {
    throw new InvalidArgumentError(`${image} is a ${before.format} image: an image disk must be qcow2 (persistent dirty bitmaps)`, withRemedies({ path: image }, { kind: 'disk-kind', use: 'raw' }));
  }
  const identity = imageIdentity(before, args.repositoryId, await realpath(image), args.backupName, name, args.history);
  const chosen = chooseChain(name, args.requested, { size: before.virtualSize, baseProblem: bitmapProblem(before), ...identity }, args.history);
  const checkpoint = bitmapName(args.repositoryId, backupId);
  // Asked for by name, so known without a second `qemu-img info` (each run of qemu-img costs ~10-20 ms of CPU and
  // more of wall time on a loaded host). A bitmap qemu-img failed to add without saying so is missing at the next
  // backup, whose chain check then reads the disk in full and says why (bitmapProblem).
  const granularity = defaultGranularity(before);
  await addBitmap(image, checkpoint, granularity);
  let exported: RunningExport | undefined;
  let opened: NbdSource | undefined;
  try {
    exported = await serveImage(image, 'qcow2', { bitmap: chosen.base ?? undefined });
    const source = await NbdSource.open(exported.uri, {
      dirtyContext: chosen.base ? `qemu:dirty-bitmap:${chosen.base}` : undefined,
      description: { kind: 'qcow2-image', path: image, realPath: await realpath(image) },
    });
    opened = source;
    const { chain, cbt, plan, workBytes } = await settleChain({
      chain: chosen,
      source,
      dirty: () => source.dirtyExtents(),
      what: 'bitmap',
      checkpoint,
      backupId,
      granularity,
      loadPage: args.loadPage,
      blockSize: args.blockSize,
      blockId: args.blockId,
      available: args.available,
      countWork: true,
    });
    const running = exported;
    return {
      name,
      source,
      plan,
      mode: chain.mode,
      modeReason: chain.reason,
      parent: chain.parent?.record.id ?? null,
      cbt,
      workBytes,
      release: async () => {
        await source.dispose();
        await running.stop();
      },
      finish: async () => {
        // The bitmaps the image had when this backup began, not a third `qemu-img info`: one that another backup
        // added since is that backup's to keep or remove.
        const keep = new Set([cbt.checkpoint, cbt.chainCheckpoint]);
        for (const bitmap of before.bitmaps) {
          if (bitmap.name.startsWith(bitmapPrefix(args.repositoryId)) && !keep.has(bitmap.name)) await removeBitmap(image, bitmap.name);
        }
      },
      rollback: async () => {
        await removeBitmap(image, checkpoint).catch(() => undefined);
      },
    };
  } catch (error) {
    await opened?.dispose();
    await exported?.stop();
    await removeBitmap(image, checkpoint).catch(() => undefined);
    throw error;
  }
}
