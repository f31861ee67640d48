/**
 * Each job kind as one call of the engine's library API: the same function, options and result the CLI's
 * command uses (cli/commands/*.ts), so a job's result is that command's --json object (SPEC.md 14.2) and its
 * cancellation is what SIGINT does to the command (the call's AbortSignal: it stops within a second, and
 * nothing is committed half).
 */
import { backup } from '../backup/backup.js';
import { restore } from '../restore/restore.js';
import { verify } from '../verify/verify.js';
import { prune } from '../retention/prune.js';
import { gc } from '../gc/gc.js';
import { backupJson, restoreJson } from '../catalogue/json.js';
import { readSecretFile } from '../host/secret-file.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import type { JobRequest, OvirtRestoreTarget, OvirtSource } from './job-requests.js';
import type { JobProgress } from './journal.js';
import { BootTestFailedError } from './errors.js';
import type { PoolLender } from '../pipeline/block-pool.js';

export interface JobRun {
  repo: string;
  passphrase: Buffer | undefined;
  signal: AbortSignal;
  onProgress: (progress: JobProgress) => void;
  onLog: (message: string) => void;
  /** Another repository of the config (a copy's target): its location and passphrase. */
  repository?: ((name: string) => { location: string; passphrase: Buffer | undefined } | undefined) | undefined;
  /** The server's one worker pool: every job's pipeline runs on a lease of it (shared-pool.ts). */
  sharedPool: PoolLender;
}

export async function runJob(request: JobRequest, run: JobRun): Promise<Record<string, unknown>> {
  const { repo, passphrase, signal } = run;
  switch (request.kind) {
    case 'backup': {
      const onProgress = (p: { disk: string; diskIndex: number; diskCount: number; bytesDone: number; bytesTotal: number }): void =>
        run.onProgress({ phase: `backup ${p.disk} (${p.diskIndex + 1}/${p.diskCount})`, done: p.bytesDone, total: p.bytesTotal, unit: 'bytes' });
      const common = { repo, passphrase, workers: request.workers, sharedPool: run.sharedPool, signal, onProgress, onNotice: run.onLog };
      if (request.from.kind === 'ovirt') return backupJson(await ovirtBackup(request.from.ovirt, request.chain.mode, request.name, common));
      const { record } = await backup({ ...common, from: request.from, chain: request.chain, name: request.name });
      return backupJson(record);
    }
    case 'restore': {
      if (request.target.kind === 'ovirt') return (await ovirtRestore(request.target, request.backup, request.disk, { repo, passphrase, signal, onNotice: run.onLog })) as unknown as Record<string, unknown>;
      if (request.target.kind === 'libvirt') {
        // As `restore --live --libvirt DOMAIN --to DIR --json`: the result is that command's object.
        const { liveRestore } = await import('../restore/live-restore.js');
        return (await liveRestore({
          repo,
          passphrase,
          backupId: request.backup,
          disk: request.disk,
          libvirt: request.target.domain,
          imageDir: request.target.dir,
          signal,
          onNotice: run.onLog,
          onProgress: (p) => run.onProgress({ phase: `hydrate ${p.disk}`, done: p.bytesDone, total: p.bytesTotal, unit: 'bytes' }),
        })) as unknown as Record<string, unknown>;
      }
      const result = await restore({
        repo,
        passphrase,
        backupId: request.backup,
        disk: request.disk,
        target: request.target,
        write: { force: request.force },
        workers: request.workers,
        sharedPool: run.sharedPool,
        signal,
        onProgress: (p) => run.onProgress({ phase: `restore ${p.disk}`, done: p.bytesDone, total: p.bytesTotal, unit: 'bytes' }),
      });
      return restoreJson(result);
    }
    case 'verify': {
      const report = await verify({ repo, passphrase, readData: request.readData, subset: request.subset, seed: request.seed, workers: request.workers, sharedPool: run.sharedPool, signal, onProgress: (p) => run.onProgress({ phase: p.phase, done: p.done, total: p.total, unit: 'items' }) });
      return report as unknown as Record<string, unknown>;
    }
    case 'prune':
      return (await prune({ repo, passphrase, policy: request.policy, dryRun: request.dryRun, names: request.names, signal })) as unknown as Record<string, unknown>;
    case 'copy': {
      const target = run.repository?.(request.to);
      if (!target) throw new InvalidArgumentError(`no repository named ${JSON.stringify(request.to)} in this server's config`, { field: 'to' });
      const { copyBackups } = await import('../copy/copy.js');
      const report = await copyBackups({
        from: repo,
        to: target.location,
        fromPassphrase: passphrase,
        toPassphrase: target.passphrase,
        selection: request.selection,
        signal,
        onProgress: (p) => run.onProgress({ phase: `copy ${p.name} ${p.disk} (${p.index + 1}/${p.count})`, done: p.bytesDone, total: p.bytesTotal, unit: 'bytes' }),
        onNotice: run.onLog,
      });
      return report as unknown as Record<string, unknown>;
    }
    case 'boot': {
      const { verifyBoot } = await import('../verify/boot.js');
      const result = await verifyBoot({
        repo,
        passphrase,
        backupId: request.backup,
        timeoutSeconds: request.timeoutSeconds,
        memoryBytes: request.memoryBytes,
        expect: request.expectConsole !== undefined ? { kind: 'console', regex: request.expectConsole } : { kind: 'agent' },
        signal,
        onLog: run.onLog,
      });
      if (result.record.result !== 'passed') throw new BootTestFailedError(request.backup, result.record.result);
      return { ...result.record, key: result.key } as unknown as Record<string, unknown>;
    }
    case 'gc': {
      // As `gc --json`: every notice of the run, in order, in `notices`.
      const notices: string[] = [];
      const report = await gc({
        repo,
        passphrase,
        rewriteBelow: request.rewriteBelow,
        dryRun: request.dryRun,
        signal,
        onNotice: (message) => {
          notices.push(message);
          run.onLog(message);
        },
      });
      return { ...report, notices };
    }
  }
}

type Common = { repo: string; passphrase: Buffer | undefined; workers: number | undefined; sharedPool: PoolLender; signal: AbortSignal; onProgress: (p: { disk: string; diskIndex: number; diskCount: number; bytesDone: number; bytesTotal: number }) => void; onNotice: (message: string) => void };

/** The user (first line) and password (second) of an oVirt credentials file, as `--ovirt-credentials` reads it. */
export async function ovirtCredentials(file: string, onNotice: (message: string) => void): Promise<{ username: string; password: string }> {
  const secret = await readSecretFile(file, `ovirt.credentialsFile ${file}`);
  for (const warning of secret.warnings) onNotice(warning);
  const [username, password] = secret.bytes.toString('utf8').split('\n');
  if (!username || password === undefined) throw new InvalidArgumentError(`${file}: expected the user on the first line and the password on the second`, { field: 'ovirt.credentialsFile' });
  return { username: username.trim(), password: password.replace(/\r$/, '') };
}

/** As `backup --ovirt`: the incremental backup API, or with an appliance the disk-attachment flow; credentials from their file. */
async function ovirtBackup(source: OvirtSource, mode: 'auto' | 'full' | 'incremental' | 'differential', name: string | undefined, common: Common): Promise<Parameters<typeof backupJson>[0]> {
  if (name !== undefined) throw new InvalidArgumentError('an oVirt backup is named after its VM: leave out name', { field: 'name' });
  const { checkEngineUrl } = await import('../ovirt/url-policy.js');
  checkEngineUrl(source.url, source.insecureHttp, 'ovirt.url');
  const ovirt = { url: source.url, credentials: await ovirtCredentials(source.credentialsFile, common.onNotice), caFile: source.caFile, insecureHttp: source.insecureHttp };
  const base = { ...common, ovirt, vm: source.vm, quiesce: source.quiesce };
  if (source.appliance !== undefined) {
    const { ovirtApplianceBackup } = await import('../ovirt/appliance-backup.js');
    return (await ovirtApplianceBackup({ ...base, appliance: source.appliance, deviceRoot: source.deviceRoot })).record;
  }
  const { ovirtIncrementalBackup } = await import('../ovirt/incremental-backup.js');
  return (await ovirtIncrementalBackup({ ...base, mode })).record;
}

/** As `restore --ovirt URL --new-vm | --to-vm … --json`: credentials from their file, the result that command's object. */
async function ovirtRestore(target: OvirtRestoreTarget, backupId: string, disk: string | undefined, common: { repo: string; passphrase: Buffer | undefined; signal: AbortSignal; onNotice: (message: string) => void }): Promise<unknown> {
  const { checkEngineUrl } = await import('../ovirt/url-policy.js');
  checkEngineUrl(target.ovirt.url, target.ovirt.insecureHttp, 'target.url');
  const { ovirtRestoreVm } = await import('../ovirt/restore-vm.js');
  return ovirtRestoreVm({
    ...common,
    ovirt: { url: target.ovirt.url, credentials: await ovirtCredentials(target.ovirt.credentialsFile, common.onNotice), caFile: target.ovirt.caFile, insecureHttp: target.ovirt.insecureHttp },
    backupId,
    appliance: target.appliance,
    via: target.via,
    newVm: target.newVm,
    toVm: target.toVm,
    disk,
    cluster: target.cluster,
    storageDomain: target.storageDomain,
    keepDiskIds: target.keepDiskIds,
    deviceRoot: target.deviceRoot,
  });
}
