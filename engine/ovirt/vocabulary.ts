/**
 * The enum values of oVirt's API that the engine sends or compares against, by the name of their type in
 * the API model (ovirt-engine-api-model, src/main/java/types/<Name>.java). Every comparison with a value
 * oVirt answers goes through these constants, and test/ovirt-contract checks each of them against the
 * model's extract: a misspelt phase or an invented status fails a test without any simulator.
 */

export const BackupPhase = {
  ready: 'ready',
  finalizing: 'finalizing',
  succeeded: 'succeeded',
  failed: 'failed',
} as const;

export const ImageTransferPhase = {
  initializing: 'initializing',
  transferring: 'transferring',
  pausedSystem: 'paused_system',
  finishedSuccess: 'finished_success',
  finishedFailure: 'finished_failure',
} as const;

export const ImageTransferDirection = { download: 'download', upload: 'upload' } as const;
export type ImageTransferDirectionValue = (typeof ImageTransferDirection)[keyof typeof ImageTransferDirection];

/** The SDK's backup example cancels an idle download (examples/backup_vm.py, `--timeout-policy` default). */
export const ImageTransferTimeoutPolicy = { cancel: 'cancel' } as const;

export const DiskFormat = { cow: 'cow', raw: 'raw' } as const;

export const DiskStatus = { ok: 'ok', illegal: 'illegal' } as const;

export const DiskBackupMode = { full: 'full', incremental: 'incremental' } as const;

export const DiskInterface = {
  virtio: 'virtio',
  virtioScsi: 'virtio_scsi',
  ide: 'ide',
  sata: 'sata',
  spaprVscsi: 'spapr_vscsi',
} as const;
export type DiskInterfaceValue = (typeof DiskInterface)[keyof typeof DiskInterface];

export const SnapshotStatus = { ok: 'ok', locked: 'locked' } as const;

export const CheckpointState = { created: 'created', invalid: 'invalid' } as const;

export const VmStatus = { up: 'up' } as const;

export const StorageDomainStatus = { active: 'active' } as const;

export const StorageDomainType = { data: 'data' } as const;

/** Block storage: a sparse qcow2 volume is a logical volume allocated up front (initial_size). */
export const StorageType = { iscsi: 'iscsi', fcp: 'fcp' } as const;

export const ConfigurationType = { ovf: 'ovf' } as const;

/** StorageConstants.BACKUP_VM_AUTO_GENERATED_SNAPSHOT_DESCRIPTION (ovirt-engine): a hybrid backup's snapshot. */
export const BACKUP_SNAPSHOT_DESCRIPTION = 'Auto-generated for Backup VM';
