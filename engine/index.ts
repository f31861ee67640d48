/** The engine's public API: what the CLI, bench/ and test/ (and backup vendors) call. */
export { initRepository } from './catalogue/init.js';
export { backup, type BackupOptions, type BackupResult } from './backup/backup.js';
export type { BackupDisk, BackupFrom, ChainPolicy, QuiesceRequest } from './backup/request.js';
export type { RequestedMode, ChainArgs, CbtProvision, CbtSession } from './cbt/chain.js';
export { restore, type RestoreOptions, type RestoreResult, type RestoredDisk, type RestoreProgress } from './restore/restore.js';
export type { RestoreTarget, RollbackPolicy, WritePolicy } from './restore/request.js';
export type { TargetWriter } from './restore/target-writer.js';
export { verify, type VerifyOptions, type VerifyReport, type VerifyProblem } from './verify/verify.js';
export { verifyBoot, type BootVerifyOptions, type BootVerifyResult } from './verify/boot.js';
export { latestBootResults, type BootSummary } from './catalogue/catalogue.js';
export { describeBackup, listBackups, showBackup } from './catalogue/catalogue.js';
export { prune, type PruneOptions, type PruneReport, type PrunedBackup } from './retention/prune.js';
export { applyRetention, isoWeek, periodOf, KEEP_RULES, type RetentionPolicy, type KeepRule, type RetentionDecision } from './retention/policy.js';
export { setProtection, type ProtectResult } from './catalogue/protect.js';
export { gc, type GcOptions, type GcReport } from './gc/gc.js';
export { repair, type RepairOptions, type RepairReport, type DamagedReference } from './repair/repair.js';
export { unlock, type UnlockOptions, type UnlockReport, type UnlockItem } from './catalogue/unlock.js';
export { forget, type ForgetOptions, type ForgetResult } from './catalogue/forget.js';
export { runDemo, type DemoOptions, type DemoResult } from './demo/demo.js';
export { generateImage, mutateImage, SeededRandom, VM_DISK_MIX, type ImageMix, type Mutation } from './demo/synthetic-image.js';
export { parseSize, formatBytes } from './common/units.js';
export { ENGINE_VERSION } from './version.js';
export { primitivesReport, runPrimitives, type Row as PrimitiveRow } from './demo/primitives-bench.js';
export type { DiskProgress } from './pipeline/backup-disk.js';
export {
  type Remedy,
  SourceUnreadableError,
  SourceChangedError,
  TargetTooSmallError,
  TargetUnwritableError,
  DiskNotFoundError,
  InterruptedError,
  CorruptChunkError,
} from './errors.js';
export { stopProcess } from './host/process.js';
export { NbdClient, type NbdClientOptions } from './nbd/client.js';
export { NbdServer, MAX_REQUEST_BYTES, type NbdServerOptions, type ListenAddress } from './nbd/server.js';
export { ExportError, type NbdExport, type ReadPiece, type AllocationExtent } from './nbd/export.js';
export { mount, umount, type MountOptions, type MountResult, type MountedFilesystem, type UmountResult, type VmMountResult } from './mount/mount.js';
export { mountVm } from './file-restore/fuse-mount.js';
export { filesList, filesExtract, withFileRestore, FileRestoreSession, type FilesOptions, type FileEntry, type Volume, type FilesListResult, type FilesExtractResult } from './file-restore/files.js';
export { readPartitionTable, type Partition, type PartitionTable } from './mount/partition-table.js';
export { findQemu, qemuVersion, VirtualMachine, type StartedProcess } from './vm/qemu.js';
export { acceleratorChoice, kvmUsable, withAccelerator, KvmFailedError, type AcceleratorChoice } from './vm/accelerator.js';
export { qemuArgs, type VmSpec, type VmDisk } from './vm/qemu-args.js';
export { GuestAgentClient, type GuestFilesystem } from './vm/agent.js';
export { QmpClient } from './vm/qmp.js';
export { ConsoleFollower } from './vm/console.js';
export { VmRunJournal, type CleanedRun } from './vm/journal.js';
export { serve, DEFAULT_CACHE_BYTES, type ServeOptions, type ServeHandle, type ServedExport } from './serve/serve.js';
export { OvirtClient, type OvirtClientOptions, type OvirtCredentials } from './ovirt/client.js';
export { ovirtApplianceBackup, type OvirtApplianceBackupOptions } from './ovirt/appliance-backup.js';
export { ovirtCleanup } from './ovirt/cleanup.js';
export { ovirtRestoreVm, type OvirtRestoreOptions, type OvirtRestoreResult } from './ovirt/restore-vm.js';
export { ovirtIncrementalBackup, type OvirtIncrementalBackupOptions } from './ovirt/incremental-backup.js';
export * from '../repo-format/index.js';
