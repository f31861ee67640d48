/**
 * Persistent dirty bitmaps of an offline qcow2 image, through qemu-img (the image must be closed: no VM
 * and no qemu-nbd may hold it). The engine names its bitmaps (and libvirt checkpoints)
 * `engine-<first 8 hex of the repository id>-<backup id>`: a repository only ever prunes its own, so two
 * repositories backing up the same disk do not break each other's chains.
 */
import { runTool, runToolJson } from './run-tool.js';

export interface BitmapInfo {
  name: string;
  granularity: number;
  /** qemu's flags: 'auto' (recording), 'in-use' (inconsistent after an unclean close). */
  flags: string[];
}

export interface ImageInfo {
  format: string;
  virtualSize: number;
  /** The image's cluster size (qcow2), undefined when the format has none. */
  clusterSize: number | undefined;
  bitmaps: BitmapInfo[];
}

export function bitmapPrefix(repositoryId: string): string {
  return `engine-${repositoryId.slice(0, 8)}-`;
}

export function bitmapName(repositoryId: string, backupId: string): string {
  return `${bitmapPrefix(repositoryId)}${backupId}`;
}

export async function imageInfo(image: string): Promise<ImageInfo> {
  const info = (await runToolJson('qemu-img', ['info', '--output=json', image])) as {
    format: string;
    'virtual-size': number;
    'cluster-size'?: number;
    'format-specific'?: { data?: { bitmaps?: { name: string; granularity: number; flags: string[] }[] } };
  };
  const bitmaps = info['format-specific']?.data?.bitmaps ?? [];
  return {
    format: info.format,
    virtualSize: info['virtual-size'],
    clusterSize: info['cluster-size'],
    bitmaps: bitmaps.map((b) => ({ name: b.name, granularity: b.granularity, flags: b.flags })),
  };
}

/**
 * The granularity qemu gives a new bitmap of this image when asked for none (bdrv_get_default_bitmap_granularity:
 * the cluster size, kept within 4 KiB and 64 KiB; 64 KiB without one). The engine asks for it by name (addBitmap),
 * so the record states what the image holds without a second `qemu-img info` after the add.
 */
export function defaultGranularity(info: ImageInfo): number {
  return Math.min(65536, Math.max(4096, info.clusterSize ?? 65536));
}

export async function addBitmap(image: string, name: string, granularity: number): Promise<void> {
  await runTool('qemu-img', ['bitmap', '--add', '--enable', '-g', String(granularity), image, name]);
}

export async function removeBitmap(image: string, name: string): Promise<void> {
  await runTool('qemu-img', ['bitmap', '--remove', image, name]);
}
