/**
 * What filesystem a partition (or a whole disk) holds, from its superblock magic; only the kinds
 * `engine mount` mounts are told apart (ext2/3/4 by the ext magic 0xEF53 at byte 1080, xfs by "XFSB" at
 * byte 0), with the read-only mount options each needs to mount a guest's possibly unclean filesystem
 * from a read-only device: no journal replay (ext4 noload, xfs norecovery), and for xfs nouuid.
 */
import type { ReadAt } from './partition-table.js';

export interface FilesystemKind {
  type: 'ext4' | 'xfs';
  mountOptions: string;
}

export async function probeFilesystem(readAt: ReadAt, offset: number, length: number): Promise<FilesystemKind | undefined> {
  if (length < 2048) return undefined;
  const head = await readAt(offset, 2048);
  // nouuid: xfs refuses a second filesystem with the UUID of one already mounted, and two backups of one
  // disk (or a backup and the live disk) carry the same UUID. ext4 has no such check.
  if (head.toString('latin1', 0, 4) === 'XFSB') return { type: 'xfs', mountOptions: 'ro,norecovery,nouuid' };
  if (head.readUInt16LE(1024 + 56) === 0xef53) return { type: 'ext4', mountOptions: 'ro,noload' };
  return undefined;
}
