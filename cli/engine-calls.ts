/**
 * Each command loads only the engine modules it runs: the whole engine (oVirt XML, NBD server, mount, gc …)
 * costs start-up time that a nightly `backup` of a disk should not pay.
 */
type AnyFunction = (...args: never[]) => unknown;
function lazy<M, K extends keyof M>(importer: () => Promise<M>, name: K): M[K] extends AnyFunction ? (...args: Parameters<M[K]>) => Promise<Awaited<ReturnType<M[K]>>> : never {
  const call = async (...args: unknown[]): Promise<unknown> => ((await importer())[name] as (...a: unknown[]) => unknown)(...args);
  return call as never;
}

export const engine = {
  initRepository: lazy(() => import('../engine/catalogue/init.js'), 'initRepository'),
  ovirtApplianceBackup: lazy(() => import('../engine/ovirt/appliance-backup.js'), 'ovirtApplianceBackup'),
  ovirtIncrementalBackup: lazy(() => import('../engine/ovirt/incremental-backup.js'), 'ovirtIncrementalBackup'),
  backup: lazy(() => import('../engine/backup/backup.js'), 'backup'),
  listBackups: lazy(() => import('../engine/catalogue/catalogue.js'), 'listBackups'),
  describeBackup: lazy(() => import('../engine/catalogue/catalogue.js'), 'describeBackup'),
  ovirtRestoreVm: lazy(() => import('../engine/ovirt/restore-vm.js'), 'ovirtRestoreVm'),
  copyBackups: lazy(() => import('../engine/copy/copy.js'), 'copyBackups'),
  restore: lazy(() => import('../engine/restore/restore.js'), 'restore'),
  liveRestore: lazy(() => import('../engine/restore/live-restore.js'), 'liveRestore'),
  liveRestoreResume: lazy(() => import('../engine/restore/live-restore.js'), 'liveRestoreResume'),
  verify: lazy(() => import('../engine/verify/verify.js'), 'verify'),
  verifyBoot: lazy(() => import('../engine/verify/boot.js'), 'verifyBoot'),
  serve: lazy(() => import('../engine/serve/serve.js'), 'serve'),
  mount: lazy(() => import('../engine/mount/mount.js'), 'mount'),
  umount: lazy(() => import('../engine/mount/mount.js'), 'umount'),
  mountVm: lazy(() => import('../engine/file-restore/fuse-mount.js'), 'mountVm'),
  filesList: lazy(() => import('../engine/file-restore/files.js'), 'filesList'),
  filesExtract: lazy(() => import('../engine/file-restore/files.js'), 'filesExtract'),
  prune: lazy(() => import('../engine/retention/prune.js'), 'prune'),
  setProtection: lazy(() => import('../engine/catalogue/protect.js'), 'setProtection'),
  gc: lazy(() => import('../engine/gc/gc.js'), 'gc'),
  repair: lazy(() => import('../engine/repair/repair.js'), 'repair'),
  migrate: lazy(() => import('../engine/migrate/migrate.js'), 'migrate'),
  unlock: lazy(() => import('../engine/catalogue/unlock.js'), 'unlock'),
  forget: lazy(() => import('../engine/catalogue/forget.js'), 'forget'),
  ovirtCleanup: lazy(() => import('../engine/ovirt/cleanup.js'), 'ovirtCleanup'),
  primitivesReport: lazy(() => import('../engine/demo/primitives-bench.js'), 'primitivesReport'),
  runDemo: lazy(() => import('../engine/demo/demo.js'), 'runDemo'),
};
