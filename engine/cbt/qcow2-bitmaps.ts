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
    'format-specific'?: { data?: { bitmaps?: { name: string; granularity: number; flags: string[] }[] } };
  };
  const bitmaps = info['format-specific']?.data?.bitmaps ?? [];
  return {
    format: info.format,
    virtualSize: info['virtual-size'],
    bitmaps: bitmaps.map((b) => ({ name: b.name, granularity: b.granularity, flags: b.flags })),
  };
}

export async function addBitmap(image: string, name: string): Promise<void> {
  await runTool('qemu-img', ['bitmap', '--add', '--enable', image, name]);
}

export async function removeBitmap(image: string, name: string): Promise<void> {
  await runTool('qemu-img', ['bitmap', '--remove', image, name]);
}
