/**
 * The bodies of `POST /api/v1/jobs`, checked and turned into the engine's typed requests (the same ones the
 * CLI builds from its flags: engine/backup/request.ts, engine/restore/request.ts). Strict: an unknown field is
 * refused (a misspelt "dryRun" must not prune for real), and so is a secret: passphrases and oVirt passwords
 * come from the files the server's config and the request name, never from a body a proxy may log.
 */
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { checkLocalPath } from '../../repo-format/local-path.js';
import { checkName } from '../../repo-format/names.js';
import { isNbdUri } from '../nbd/uri.js';
import { KEEP_RULES, policyIsEmpty, type RetentionPolicy } from '../retention/policy.js';
import type { BackupDisk, BackupFrom, ChainPolicy, QuiesceRequest } from '../backup/request.js';
import type { RestoreTarget } from '../restore/request.js';
import type { Selection } from '../copy/select.js';

export type JobKind = 'backup' | 'restore' | 'verify' | 'prune' | 'gc' | 'copy';
export const JOB_KINDS: readonly JobKind[] = ['backup', 'restore', 'verify', 'prune', 'gc', 'copy'];

export interface OvirtSource {
  url: string;
  vm: string;
  /** File with the user on its first line and the password on its second (as `--ovirt-credentials`). */
  credentialsFile: string;
  caFile: string | undefined;
  insecureHttp: boolean;
  /** The disk-attachment flow through this appliance VM (full backups); without it the incremental backup API. */
  appliance: string | undefined;
  deviceRoot: string;
  quiesce: 'required' | 'try' | undefined;
}

export type JobRequest =
  | { kind: 'backup'; repository: string; name: string | undefined; chain: ChainPolicy; workers: number | undefined; from: BackupFrom | { kind: 'ovirt'; ovirt: OvirtSource } }
  | { kind: 'restore'; repository: string; backup: string; disk: string | undefined; target: RestoreTarget | LibvirtRestoreTarget | OvirtRestoreTarget; force: boolean; workers: number | undefined }
  | { kind: 'verify'; repository: string; readData: boolean; subset: number | undefined; seed: string | undefined; workers: number | undefined }
  | { kind: 'prune'; repository: string; policy: RetentionPolicy; dryRun: boolean; names?: string[] | undefined }
  | { kind: 'gc'; repository: string; rewriteBelow: number | undefined; dryRun: boolean }
  /** `engine copy` of backups to another repository of the config (a policy's copy step too: policies/scheduler.ts). */
  | { kind: 'copy'; repository: string; to: string; selection: Selection }
  /** A policy's own step (policies/scheduler.ts), not offered by POST /jobs: `verify --boot`. */
  | { kind: 'boot'; repository: string; backup: string; timeoutSeconds: number | undefined; memoryBytes: number | undefined; expectConsole: string | undefined };

/**
 * As `restore --live --libvirt DOMAIN --to DIR`: a new domain defined from the backup's libvirt definition and
 * started at once on new qcow2 images in `dir`, QEMU streaming the data in under it; the job ends when every disk
 * is hydrated. Only new images and a new domain, so nothing to force.
 */
export interface LibvirtRestoreTarget {
  kind: 'libvirt';
  domain: string;
  dir: string;
}

/**
 * As `restore --ovirt URL --new-vm NAME | --to-vm NAME`: a new VM from the backup's OVF, or one disk (`disk`)
 * into a new disk of an existing VM; written through this appliance or uploaded by imageio transfers.
 */
export interface OvirtRestoreTarget {
  kind: 'ovirt';
  /** The connection as an oVirt backup job's: credentials from a file on the server. */
  ovirt: Omit<OvirtSource, 'vm' | 'appliance' | 'deviceRoot' | 'quiesce'>;
  newVm: string | undefined;
  toVm: string | undefined;
  via: 'appliance' | 'transfer';
  appliance: string | undefined;
  deviceRoot: string;
  cluster: string | undefined;
  storageDomain: string | undefined;
  keepDiskIds: boolean;
}

type Json = Record<string, unknown>;

function fields(value: unknown, where: string, allowed: readonly string[], required: readonly string[] = []): Json {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) throw new InvalidArgumentError(`${where} must be a JSON object`, { field: where });
  const unknown = Object.keys(value).filter((k) => !allowed.includes(k));
  if (unknown.length > 0) throw new InvalidArgumentError(`${where}: unknown field ${JSON.stringify(unknown[0]!.slice(0, 64))} (known: ${allowed.join(', ')})`, { field: `${where}.${unknown[0]!.slice(0, 64)}` });
  for (const key of required) if ((value as Json)[key] === undefined) throw new InvalidArgumentError(`${where}.${key} is required`, { field: `${where}.${key}` });
  return value as Json;
}

function text(value: unknown, where: string, max = 4096): string {
  if (typeof value !== 'string' || value === '' || value.length > max || value.includes('\0')) throw new InvalidArgumentError(`${where} must be a non-empty string of at most ${max} characters`, { field: where });
  return value;
}

function optionalText(value: unknown, where: string): string | undefined {
  return value === undefined ? undefined : text(value, where);
}

function flag(value: unknown, where: string): boolean {
  if (value === undefined) return false;
  if (typeof value !== 'boolean') throw new InvalidArgumentError(`${where} must be true or false`, { field: where });
  return value;
}

function integer(value: unknown, where: string, min: number, max: number): number | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) throw new InvalidArgumentError(`${where} must be an integer from ${min} to ${max}`, { field: where });
  return value;
}

function fraction(value: unknown, where: string, allowZero: boolean): number | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'number' || !Number.isFinite(value) || value > 1 || value < 0 || (!allowZero && value === 0)) throw new InvalidArgumentError(`${where} must be a number ${allowZero ? 'from 0' : 'above 0, up'} to 1 (a fraction, 0.1 for 10%)`, { field: where });
  return value;
}

function localPath(value: unknown, where: string, otherwise?: string): string {
  const path = text(value, where);
  checkLocalPath(path, where, otherwise);
  if (!path.startsWith('/')) throw new InvalidArgumentError(`${where} must be an absolute path: the server's working directory is no business of the client's`, { field: where });
  return path;
}

function oneOf<T extends string>(value: unknown, where: string, choices: readonly T[]): T | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'string' || !choices.includes(value as T)) throw new InvalidArgumentError(`${where} must be one of ${choices.join(', ')}`, { field: where });
  return value as T;
}

const COMMON = ['kind', 'repository'];

export function parseJobRequest(body: unknown): JobRequest {
  const kind = oneOf(fields(body, 'the request', Object.keys((body ?? {}) as object), COMMON).kind, 'kind', JOB_KINDS)!;
  const allowed: Record<JobKind, readonly string[]> = {
    backup: ['name', 'mode', 'workers', 'disks', 'libvirt', 'ovirt'],
    restore: ['backup', 'disk', 'target', 'force', 'workers'],
    verify: ['readData', 'subset', 'seed', 'workers'],
    prune: ['keep', 'dryRun'],
    gc: ['rewriteBelow', 'dryRun'],
    copy: ['to', 'backups', 'all', 'name', 'latest'],
  };
  const top = fields(body, `a ${kind} job`, [...COMMON, ...allowed[kind]]);
  const repository = text(top.repository, 'repository', 64);
  const workers = integer(top.workers, 'workers', 0, 256);
  switch (kind) {
    case 'backup':
      return backupRequest(top, repository, workers);
    case 'restore': {
      const targetKind = oneOf(fields(top.target, 'target', Object.keys((top.target ?? {}) as object), ['kind']).kind, 'target.kind', ['path', 'file', 'qcow2', 'nbd', 'libvirt', 'ovirt'] as const)!;
      const target = fields(top.target, 'target', TARGET_FIELDS[targetKind], ['kind']);
      const disk = optionalText(top.disk, 'disk');
      if (disk !== undefined) checkName(disk, 'disk', 'disk');
      const common = { kind, repository, backup: backupId(top.backup), disk };
      if (targetKind === 'libvirt' || targetKind === 'ovirt') {
        // Both make new images or disks only, and neither runs the engine's restore pipeline.
        for (const key of ['force', 'workers'] as const) if (top[key] !== undefined) throw new InvalidArgumentError(`${key} does not go with a ${targetKind} target: it makes a new ${targetKind === 'libvirt' ? 'domain on new images, streamed in by QEMU' : 'VM or new disks'}`, { field: key });
        if (targetKind === 'ovirt') return { ...common, target: ovirtTarget(target, disk), force: false, workers: undefined };
        return { ...common, target: { kind: 'libvirt', domain: domainName(target.domain, 'target.domain'), dir: localPath(target.dir, 'target.dir') }, force: false, workers: undefined };
      }
      const parsed: RestoreTarget =
        targetKind === 'nbd'
          ? { kind: 'nbd', uri: nbdUri(target.uri, 'target.uri') }
          : { kind: targetKind, path: localPath(target.path, 'target.path', targetKind === 'path' ? 'target kind nbd with a uri' : undefined) };
      return { ...common, target: parsed, force: flag(top.force, 'force'), workers };
    }
    case 'verify': {
      const readData = flag(top.readData, 'readData');
      const subset = fraction(top.subset, 'subset', false);
      const seed = optionalText(top.seed, 'seed');
      if ((subset !== undefined || seed !== undefined) && !readData) throw new InvalidArgumentError('subset and seed choose which packs readData reads: set readData too', { field: 'readData' });
      return { kind, repository, readData, subset, seed, workers };
    }
    case 'prune': {
      const keep = fields(top.keep ?? {}, 'keep', KEEP_RULES);
      const policy: RetentionPolicy = {};
      for (const rule of KEEP_RULES) {
        const n = integer(keep[rule], `keep.${rule}`, 0, 1_000_000);
        if (n !== undefined) policy[rule] = n;
      }
      if (policyIsEmpty(policy)) throw new InvalidArgumentError('keep names no rule: prune would remove every unprotected backup; say what to keep', { field: 'keep' });
      return { kind, repository, policy, dryRun: flag(top.dryRun, 'dryRun') };
    }
    case 'gc':
      return { kind, repository, rewriteBelow: fraction(top.rewriteBelow, 'rewriteBelow', true), dryRun: flag(top.dryRun, 'dryRun') };
    case 'copy': {
      const to = text(top.to, 'to', 64);
      if (to === repository) throw new InvalidArgumentError('to is the job\'s own repository: a copy goes to another one', { field: 'to' });
      return { kind, repository, to, selection: copySelection(top) };
    }
  }
}

/** As `engine copy`'s arguments: exactly one way of choosing, backups (ids), all, name (with or without latest), or latest. */
function copySelection(top: Json): Selection {
  const ways = [top.backups !== undefined, top.all !== undefined, top.name !== undefined || top.latest !== undefined].filter(Boolean).length;
  if (ways !== 1) throw new InvalidArgumentError('say which backups to copy: backups (ids), all, name, or latest (name with latest: the newest N of that name)', { field: 'backups' });
  if (top.backups !== undefined) {
    if (!Array.isArray(top.backups) || top.backups.length === 0 || top.backups.length > 1000) throw new InvalidArgumentError('backups must be a list of 1 to 1000 backup ids', { field: 'backups' });
    return { kind: 'ids', ids: top.backups.map((id: unknown, i) => backupId(id, `backups[${i}]`)) };
  }
  if (top.all !== undefined) {
    if (top.all !== true) throw new InvalidArgumentError('all must be true (or left out)', { field: 'all' });
    return { kind: 'all' };
  }
  const latest = integer(top.latest, 'latest', 1, 1_000_000);
  if (top.name === undefined) return { kind: 'latest', count: latest! };
  const name = text(top.name, 'name');
  checkName(name, 'backup', 'name');
  return { kind: 'name', name, latest };
}

function backupId(value: unknown, where = 'backup'): string {
  const id = text(value, where, 64);
  if (!/^[0-9a-f]{1,64}$/.test(id)) throw new InvalidArgumentError(`${where} must be a backup id or a prefix of one (hex digits)`, { field: where });
  return id;
}

const TARGET_FIELDS = {
  path: ['kind', 'path', 'uri'],
  file: ['kind', 'path', 'uri'],
  qcow2: ['kind', 'path', 'uri'],
  nbd: ['kind', 'path', 'uri'],
  libvirt: ['kind', 'domain', 'dir'],
  ovirt: ['kind', 'url', 'credentialsFile', 'caFile', 'insecureHttp', 'newVm', 'toVm', 'via', 'appliance', 'deviceRoot', 'cluster', 'storageDomain', 'keepDiskIds'],
} as const;

/** As the CLI's checkOvirtRestoreFlags: an appliance or the transfers; a new VM or an existing one, the latter with one disk. */
function ovirtTarget(target: Json, disk: string | undefined): OvirtRestoreTarget {
  const via = oneOf(target.via, 'target.via', ['appliance', 'transfer'] as const) ?? 'appliance';
  const appliance = optionalText(target.appliance, 'target.appliance');
  if (via === 'appliance' && appliance === undefined) throw new InvalidArgumentError('an oVirt restore goes through this backup appliance (target.appliance) or through imageio transfers (target.via: transfer)', { field: 'target.appliance' });
  const newVm = optionalText(target.newVm, 'target.newVm');
  const toVm = optionalText(target.toVm, 'target.toVm');
  if ((newVm === undefined) === (toVm === undefined)) throw new InvalidArgumentError('an oVirt restore needs either target.newVm (a new VM) or target.toVm (a new disk of an existing VM)', { field: 'target.newVm' });
  if (toVm !== undefined && disk === undefined) throw new InvalidArgumentError('target.toVm restores one disk: name it with disk', { field: 'disk' });
  return {
    kind: 'ovirt',
    ovirt: {
      url: text(target.url, 'target.url'),
      credentialsFile: localPath(target.credentialsFile, 'target.credentialsFile'),
      caFile: target.caFile === undefined ? undefined : localPath(target.caFile, 'target.caFile'),
      insecureHttp: flag(target.insecureHttp, 'target.insecureHttp'),
    },
    newVm,
    toVm,
    via,
    appliance,
    deviceRoot: target.deviceRoot === undefined ? '/dev/disk/by-id' : localPath(target.deviceRoot, 'target.deviceRoot'),
    cluster: optionalText(target.cluster, 'target.cluster'),
    storageDomain: optionalText(target.storageDomain, 'target.storageDomain'),
    keepDiskIds: flag(target.keepDiskIds, 'target.keepDiskIds'),
  };
}

/** A libvirt domain name as virsh takes it: no slash (libvirt refuses one), no control characters, at most 256 characters. */
function domainName(value: unknown, where: string): string {
  const name = text(value, where, 256);
  if (name.includes('/') || /[\u0000-\u001f\u007f]/u.test(name)) throw new InvalidArgumentError(`${where} must be a libvirt domain name: no slash, no control characters`, { field: where });
  return name;
}

function nbdUri(value: unknown, where: string): string {
  const uri = text(value, where);
  if (!isNbdUri(uri)) throw new InvalidArgumentError(`${where} must be an nbd://, nbds://, nbd+unix:// or nbds+unix:// URI`, { field: where });
  return uri;
}

function backupRequest(top: Json, repository: string, workers: number | undefined): JobRequest {
  const name = optionalText(top.name, 'name');
  if (name !== undefined) checkName(name, 'backup', 'name');
  const chain: ChainPolicy = { mode: oneOf(top.mode, 'mode', ['auto', 'full', 'incremental', 'differential'] as const) ?? 'auto' };
  const given = (['disks', 'libvirt', 'ovirt'] as const).filter((k) => top[k] !== undefined);
  if (given.length !== 1) throw new InvalidArgumentError('a backup reads one of: disks (files, devices, NBD URIs, qcow2 images), libvirt (a domain) or ovirt (a VM)', { field: 'disks' });
  const base = { kind: 'backup' as const, repository, name, chain, workers };
  if (top.disks !== undefined) {
    if (!Array.isArray(top.disks) || top.disks.length === 0 || top.disks.length > 64) throw new InvalidArgumentError('disks must be a list of 1 to 64 disks', { field: 'disks' });
    const disks = top.disks.map((value: unknown, i): BackupDisk => {
      const where = `disks[${i}]`;
      const disk = fields(value, where, ['kind', 'path', 'uri', 'name'], ['kind']);
      const diskName = optionalText(disk.name, `${where}.name`);
      if (diskName !== undefined) checkName(diskName, 'disk', `${where}.name`);
      const named = diskName === undefined ? {} : { name: diskName };
      const kind = oneOf(disk.kind, `${where}.kind`, ['raw', 'nbd', 'image'] as const)!;
      if (kind === 'nbd') return { kind, uri: nbdUri(disk.uri, `${where}.uri`), ...named };
      return { kind, path: localPath(disk.path, `${where}.path`), ...named };
    });
    return { ...base, from: { kind: 'disks', disks } };
  }
  if (top.libvirt !== undefined) {
    const libvirt = fields(top.libvirt, 'libvirt', ['domain', 'quiesce'], ['domain']);
    const mode = oneOf(libvirt.quiesce, 'libvirt.quiesce', ['required', 'try'] as const);
    const quiesce: QuiesceRequest | undefined = mode === undefined ? undefined : { mode };
    return { ...base, from: { kind: 'libvirt', domain: text(libvirt.domain, 'libvirt.domain', 256), quiesce } };
  }
  const ovirt = fields(top.ovirt, 'ovirt', ['url', 'vm', 'credentialsFile', 'caFile', 'insecureHttp', 'appliance', 'deviceRoot', 'quiesce'], ['url', 'vm', 'credentialsFile']);
  const appliance = optionalText(ovirt.appliance, 'ovirt.appliance');
  if (appliance !== undefined && (chain.mode === 'incremental' || chain.mode === 'differential')) throw new InvalidArgumentError('the disk-attachment flow (ovirt.appliance) makes full backups; leave out appliance for incremental ones', { field: 'ovirt.appliance' });
  return {
    ...base,
    from: {
      kind: 'ovirt',
      ovirt: {
        url: text(ovirt.url, 'ovirt.url'),
        vm: text(ovirt.vm, 'ovirt.vm', 256),
        credentialsFile: localPath(ovirt.credentialsFile, 'ovirt.credentialsFile'),
        caFile: ovirt.caFile === undefined ? undefined : localPath(ovirt.caFile, 'ovirt.caFile'),
        insecureHttp: flag(ovirt.insecureHttp, 'ovirt.insecureHttp'),
        appliance,
        deviceRoot: ovirt.deviceRoot === undefined ? '/dev/disk/by-id' : localPath(ovirt.deviceRoot, 'ovirt.deviceRoot'),
        quiesce: oneOf(ovirt.quiesce, 'ovirt.quiesce', ['required', 'try'] as const),
      },
    },
  };
}
