/** Storage only: packs, frames, index, block maps, backup records, locks. Knows nothing of VMs. */
export * from './constants.js';
export * from './errors.js';
export { Repository, type OpenOptions, type OpenReport } from './repository.js';
export { type RepositoryConfig, validateBlockSize } from './config.js';
export { type BackupRecord, type Consistency, type DiskRecord, type DiskStats, type BackupType, mapRootOf } from './backup-record.js';
export { readMap, mapDepth, MapBuilder, type MapRoot, type MapRun } from './block-map.js';
export { DiskGeometry, blockCount, blockAt, blockOffset } from './disk-geometry.js';
export { packPath, scanPack } from './pack-file.js';
export { readLockHolder } from './lock.js';
export { registerReader, listReaders, removeStaleReaders, type ReaderRegistration, type RegisteredReader } from './readers.js';
export { isProcessAlive, processIdentity, holderLiveness, type HolderLiveness } from './process-alive.js';
export { setNoticeSink, type NoticeSink } from './notices.js';
export { listProtected } from './protection.js';
export { listQuarantine, type QuarantinedFrame } from './quarantine.js';
export * from './verification-record.js';
