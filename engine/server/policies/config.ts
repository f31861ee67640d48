/**
 * The `policies` block of the server config (SPEC.md 23.1): per policy, which VMs, the repository, the
 * schedule and its time zone, the level rules, retention, verify, boot test, copy target and notification
 * hooks. Strict as the rest of the config: unknown fields are refused, each mistake is one line naming the
 * field. Nothing here reads a file or asks a hypervisor; which VMs a selector means is decided at each run
 * (select.ts).
 */
import { isAbsolute, resolve, dirname } from 'node:path';
import { InvalidArgumentError } from '../../../repo-format/errors.js';
import { checkLocalPath } from '../../../repo-format/local-path.js';
import { checkName } from '../../../repo-format/names.js';
import { KEEP_RULES, policyIsEmpty, type RetentionPolicy } from '../../retention/policy.js';
import { isNbdUri } from '../../nbd/uri.js';
import type { BackupDisk } from '../../backup/request.js';
import { checkTimeZone, localTimeZone, parseCron, type CronSchedule } from './cron.js';

export type Level = 'auto' | 'full' | 'incremental' | 'differential';
export const LEVELS: readonly Level[] = ['auto', 'full', 'incremental', 'differential'];

/** One VM of an explicit list: its backup name and disks (files, qcow2 images, NBD URIs). */
export interface SourceVm {
  name: string;
  disks: BackupDisk[];
}

export type VmSelector =
  | { kind: 'sources'; vms: SourceVm[] }
  /** Domains of the server's libvirt connection (virsh's default: LIBVIRT_DEFAULT_URI, else qemu:///system for root). */
  | { kind: 'libvirt'; domains: string[]; pattern: string | undefined; quiesce: 'required' | 'try' | undefined }
  | { kind: 'ovirt'; url: string; credentialsFile: string; caFile: string | undefined; insecureHttp: boolean; cluster: string | undefined; tag: string | undefined; pattern: string | undefined; quiesce: 'required' | 'try' | undefined };

export interface NotifyConfig {
  on: ReadonlySet<'failure' | 'success'>;
  /** An executable and its arguments: the run's JSON on its stdin. */
  command: string[] | undefined;
  /** An http(s) URL: the run's JSON POSTed to it. */
  url: string | undefined;
  timeoutMs: number;
}

export interface Policy {
  name: string;
  repository: string;
  vms: VmSelector;
  schedule: CronSchedule;
  timeZone: string;
  /** First rule whose `when` matches the slot's wall time gives the level; none: `auto`. */
  levels: { when: CronSchedule; level: Level }[];
  retention: RetentionPolicy | undefined;
  verify: { readData: boolean; subset: number | undefined } | undefined;
  bootTest: { timeoutSeconds: number | undefined; memoryBytes: number | undefined; expectConsole: string | undefined } | undefined;
  copyTo: string | undefined;
  notify: NotifyConfig | undefined;
  workers: number | undefined;
}

/** Policy names appear in URLs, as repository names do. */
export const POLICY_NAME = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$/;
/** A name pattern: `*` any run of characters, `?` one; nothing else is special. */
export function globMatches(pattern: string, name: string): boolean {
  const regex = new RegExp(`^${pattern.replace(/[.+^${}()|[\]\\]/g, '\\$&').replace(/\*/g, '.*').replace(/\?/g, '.')}$`, 's');
  return regex.test(name);
}

const DEFAULT_HOOK_TIMEOUT_MS = 10_000;

type Json = Record<string, unknown>;

class PolicyParser {
  constructor(
    private readonly file: string,
    private readonly policy: string,
  ) {}

  fail(where: string, message: string): never {
    throw new InvalidArgumentError(`server config ${this.file}: policies.${this.policy}${where ? `.${where}` : ''} ${message}`, { path: this.file, field: `policies.${this.policy}${where ? `.${where}` : ''}` });
  }

  object(value: unknown, where: string, allowed: readonly string[], required: readonly string[] = []): Json {
    if (typeof value !== 'object' || value === null || Array.isArray(value)) this.fail(where, 'must be an object');
    const unknown = Object.keys(value).filter((k) => !allowed.includes(k));
    if (unknown.length > 0) this.fail(where, `has unknown field ${JSON.stringify(unknown[0]!.slice(0, 64))} (known: ${allowed.join(', ')})`);
    for (const key of required) if ((value as Json)[key] === undefined) this.fail(where, `needs ${key}`);
    return value as Json;
  }

  text(value: unknown, where: string, max = 4096): string {
    if (typeof value !== 'string' || value === '' || value.length > max || value.includes('\0')) this.fail(where, `must be a non-empty string of at most ${max} characters`);
    return value;
  }

  path(value: unknown, where: string): string {
    const text = this.text(value, where);
    return isAbsolute(text) ? text : resolve(dirname(this.file), text);
  }

  flag(value: unknown, where: string): boolean {
    if (value === undefined) return false;
    if (typeof value !== 'boolean') this.fail(where, 'must be true or false');
    return value;
  }

  integer(value: unknown, where: string, min: number, max: number): number | undefined {
    if (value === undefined) return undefined;
    if (typeof value !== 'number' || !Number.isInteger(value) || value < min || value > max) this.fail(where, `must be an integer from ${min} to ${max}`);
    return value;
  }

  oneOf<T extends string>(value: unknown, where: string, choices: readonly T[]): T | undefined {
    if (value === undefined) return undefined;
    if (typeof value !== 'string' || !choices.includes(value as T)) this.fail(where, `must be one of ${choices.join(', ')}`);
    return value as T;
  }

  cron(value: unknown, where: string): CronSchedule {
    const text = this.text(value, where, 256);
    try {
      return parseCron(text);
    } catch (error) {
      this.fail(where, `is not a cron schedule: ${(error as Error).message}`);
    }
  }

  /** Runs `check` (an engine check that throws its own message) with the field named. */
  checked<T>(where: string, check: () => T): T {
    try {
      return check();
    } catch (error) {
      this.fail(where, `is refused: ${(error as Error).message}`);
    }
  }
}

export function parsePolicies(file: string, given: unknown, repositories: ReadonlySet<string>): Map<string, Policy> {
  const policies = new Map<string, Policy>();
  if (given === undefined) return policies;
  if (typeof given !== 'object' || given === null || Array.isArray(given)) throw new InvalidArgumentError(`server config ${file}: policies must be an object: name -> { vms, repository, schedule, … }`, { path: file });
  for (const [name, value] of Object.entries(given as Json)) {
    if (!POLICY_NAME.test(name)) throw new InvalidArgumentError(`server config ${file}: policy name ${JSON.stringify(name.slice(0, 64))}: use letters, digits, '.', '_' and '-', at most 64, not starting with '.'`, { path: file });
    policies.set(name, parsePolicy(new PolicyParser(file, name), name, value, repositories));
  }
  return policies;
}

function parsePolicy(p: PolicyParser, name: string, value: unknown, repositories: ReadonlySet<string>): Policy {
  const top = p.object(value, '', ['vms', 'repository', 'schedule', 'timeZone', 'levels', 'retention', 'verify', 'bootTest', 'copyTo', 'notify', 'workers'], ['vms', 'repository', 'schedule']);
  const repository = p.text(top.repository, 'repository', 64);
  if (!repositories.has(repository)) p.fail('repository', `names no repository of this config: ${JSON.stringify(repository)}`);
  const copyTo = top.copyTo === undefined ? undefined : p.text(top.copyTo, 'copyTo', 64);
  if (copyTo !== undefined && !repositories.has(copyTo)) p.fail('copyTo', `names no repository of this config: ${JSON.stringify(copyTo)}`);
  if (copyTo === repository) p.fail('copyTo', 'is the policy\'s own repository: a copy goes to another one');
  const timeZone = top.timeZone === undefined ? localTimeZone() : p.checked('timeZone', () => checkTimeZone(p.text(top.timeZone, 'timeZone', 64)));
  if (top.levels !== undefined && !Array.isArray(top.levels)) p.fail('levels', 'must be a list of {when, level}, the first match deciding');
  const levels = ((top.levels ?? []) as unknown[]).map((rule, i) => {
    const r = p.object(rule, `levels[${i}]`, ['when', 'level'], ['when', 'level']);
    return { when: p.cron(r.when, `levels[${i}].when`), level: p.oneOf(r.level, `levels[${i}].level`, LEVELS)! };
  });
  let retention: RetentionPolicy | undefined;
  if (top.retention !== undefined) {
    const keep = p.object(p.object(top.retention, 'retention', ['keep'], ['keep']).keep, 'retention.keep', KEEP_RULES);
    retention = {};
    for (const rule of KEEP_RULES) {
      const n = p.integer(keep[rule], `retention.keep.${rule}`, 0, 1_000_000);
      if (n !== undefined) retention[rule] = n;
    }
    if (policyIsEmpty(retention)) p.fail('retention.keep', 'names no rule: prune would remove every unprotected backup of the policy\'s VMs');
  }
  let verify: Policy['verify'];
  if (top.verify !== undefined) {
    const v = p.object(top.verify, 'verify', ['readData', 'subset']);
    const readData = p.flag(v.readData, 'verify.readData');
    let subset: number | undefined;
    if (v.subset !== undefined) {
      if (typeof v.subset !== 'number' || !(v.subset > 0 && v.subset <= 1)) p.fail('verify.subset', 'must be a number above 0, up to 1 (a fraction of the packs, 0.1 for 10%)');
      if (!readData) p.fail('verify.subset', 'chooses which packs readData reads: set readData too');
      subset = v.subset;
    }
    verify = { readData, subset };
  }
  let bootTest: Policy['bootTest'];
  if (top.bootTest !== undefined) {
    const b = p.object(top.bootTest, 'bootTest', ['timeoutSeconds', 'memoryMiB', 'expectConsole']);
    const expectConsole = b.expectConsole === undefined ? undefined : p.text(b.expectConsole, 'bootTest.expectConsole', 1024);
    if (expectConsole !== undefined) p.checked('bootTest.expectConsole', () => new RegExp(expectConsole));
    const memory = p.integer(b.memoryMiB, 'bootTest.memoryMiB', 16, 1024 * 1024);
    bootTest = { timeoutSeconds: p.integer(b.timeoutSeconds, 'bootTest.timeoutSeconds', 1, 86_400), memoryBytes: memory === undefined ? undefined : memory * 1024 * 1024, expectConsole };
  }
  return {
    name,
    repository,
    vms: parseVms(p, top.vms),
    schedule: p.cron(top.schedule, 'schedule'),
    timeZone,
    levels,
    retention,
    verify,
    bootTest,
    copyTo,
    notify: top.notify === undefined ? undefined : parseNotify(p, top.notify),
    workers: p.integer(top.workers, 'workers', 0, 256),
  };
}

function parseVms(p: PolicyParser, value: unknown): VmSelector {
  const vms = p.object(value, 'vms', ['sources', 'libvirt', 'ovirt']);
  const given = Object.keys(vms);
  if (given.length !== 1) p.fail('vms', 'must name one of: sources (disks of files, qcow2 images, NBD URIs), libvirt (domains or a pattern), ovirt (a cluster, tag or pattern)');
  if (vms.sources !== undefined) {
    if (!Array.isArray(vms.sources) || vms.sources.length === 0 || vms.sources.length > 1000) p.fail('vms.sources', 'must be a list of 1 to 1000 {name, disks}');
    const seen = new Set<string>();
    return {
      kind: 'sources',
      vms: vms.sources.map((entry: unknown, i): SourceVm => {
        const where = `vms.sources[${i}]`;
        const vm = p.object(entry, where, ['name', 'disks'], ['name', 'disks']);
        const vmName = p.text(vm.name, `${where}.name`, 256);
        p.checked(`${where}.name`, () => checkName(vmName, 'backup', 'name'));
        if (seen.has(vmName)) p.fail(`${where}.name`, `${JSON.stringify(vmName)} is named twice`);
        seen.add(vmName);
        if (!Array.isArray(vm.disks) || vm.disks.length === 0 || vm.disks.length > 64) p.fail(`${where}.disks`, 'must be a list of 1 to 64 disks');
        const disks = vm.disks.map((value: unknown, j): BackupDisk => {
          const at = `${where}.disks[${j}]`;
          const disk = p.object(value, at, ['kind', 'path', 'uri', 'name'], ['kind']);
          const kind = p.oneOf(disk.kind, `${at}.kind`, ['raw', 'image', 'nbd'] as const)!;
          const diskName = disk.name === undefined ? undefined : p.text(disk.name, `${at}.name`, 256);
          if (diskName !== undefined) p.checked(`${at}.name`, () => checkName(diskName, 'disk', 'name'));
          const named = diskName === undefined ? {} : { name: diskName };
          if (kind === 'nbd') {
            const uri = p.text(disk.uri, `${at}.uri`);
            if (!isNbdUri(uri)) p.fail(`${at}.uri`, 'must be an nbd://, nbds://, nbd+unix:// or nbds+unix:// URI');
            return { kind, uri, ...named };
          }
          const path = p.path(disk.path, `${at}.path`);
          p.checked(`${at}.path`, () => checkLocalPath(path, `${at}.path`));
          return { kind, path, ...named };
        });
        return { name: vmName, disks };
      }),
    };
  }
  const quiesceOf = (v: Json, where: string): 'required' | 'try' | undefined => p.oneOf(v.quiesce, `${where}.quiesce`, ['required', 'try'] as const);
  if (vms.libvirt !== undefined) {
    const l = p.object(vms.libvirt, 'vms.libvirt', ['domains', 'pattern', 'quiesce']);
    if (l.domains !== undefined && (!Array.isArray(l.domains) || l.domains.length > 1000)) p.fail('vms.libvirt.domains', 'must be a list of domain names');
    const domains = ((l.domains ?? []) as unknown[]).map((d, i) => p.text(d, `vms.libvirt.domains[${i}]`, 256));
    const pattern = l.pattern === undefined ? undefined : p.text(l.pattern, 'vms.libvirt.pattern', 256);
    if (domains.length === 0 && pattern === undefined) p.fail('vms.libvirt', 'needs domains (a list) or pattern (web-*), or both');
    return { kind: 'libvirt', domains, pattern, quiesce: quiesceOf(l, 'vms.libvirt') };
  }
  const o = p.object(vms.ovirt, 'vms.ovirt', ['url', 'credentialsFile', 'caFile', 'insecureHttp', 'cluster', 'tag', 'pattern', 'quiesce'], ['url', 'credentialsFile']);
  const cluster = o.cluster === undefined ? undefined : p.text(o.cluster, 'vms.ovirt.cluster', 256);
  const tag = o.tag === undefined ? undefined : p.text(o.tag, 'vms.ovirt.tag', 256);
  const pattern = o.pattern === undefined ? undefined : p.text(o.pattern, 'vms.ovirt.pattern', 256);
  if (cluster === undefined && tag === undefined && pattern === undefined) p.fail('vms.ovirt', 'needs cluster, tag or pattern (or several: all must match)');
  // oVirt's search language gives these words meaning; a value that holds them would search for something else.
  for (const [key, v] of [['cluster', cluster], ['tag', tag], ['pattern', pattern]] as const) if (v !== undefined && /[\s=<>!"]/.test(v)) p.fail(`vms.ovirt.${key}`, 'must not hold spaces, quotes or = < > !');
  return {
    kind: 'ovirt',
    url: p.text(o.url, 'vms.ovirt.url'),
    credentialsFile: p.path(o.credentialsFile, 'vms.ovirt.credentialsFile'),
    caFile: o.caFile === undefined ? undefined : p.path(o.caFile, 'vms.ovirt.caFile'),
    insecureHttp: p.flag(o.insecureHttp, 'vms.ovirt.insecureHttp'),
    cluster,
    tag,
    pattern,
    quiesce: quiesceOf(o, 'vms.ovirt'),
  };
}

function parseNotify(p: PolicyParser, value: unknown): NotifyConfig {
  const n = p.object(value, 'notify', ['on', 'command', 'url', 'timeoutSeconds']);
  if (n.on !== undefined && (!Array.isArray(n.on) || n.on.length === 0)) p.fail('notify.on', 'must be a list: ["failure"] or ["failure", "success"]');
  const on = new Set(((n.on ?? ['failure']) as unknown[]).map((v, i) => p.oneOf(v, `notify.on[${i}]`, ['failure', 'success'] as const)!));
  let command: string[] | undefined;
  if (n.command !== undefined) {
    if (!Array.isArray(n.command) || n.command.length === 0 || n.command.length > 64) p.fail('notify.command', 'must be a list: the executable (an absolute path) and its arguments');
    command = n.command.map((a: unknown, i) => p.text(a, `notify.command[${i}]`));
    if (!isAbsolute(command[0]!)) p.fail('notify.command[0]', 'must be an absolute path: the server does not search PATH for a hook');
  }
  let url: string | undefined;
  if (n.url !== undefined) {
    url = p.text(n.url, 'notify.url', 2048);
    let parsed: URL;
    try {
      parsed = new URL(url);
    } catch {
      p.fail('notify.url', 'is not a URL');
    }
    if (parsed.protocol !== 'http:' && parsed.protocol !== 'https:') p.fail('notify.url', 'must be http:// or https://');
  }
  if (command === undefined && url === undefined) p.fail('notify', 'needs command or url (or both)');
  const seconds = p.integer(n.timeoutSeconds, 'notify.timeoutSeconds', 1, 600);
  return { on, command, url, timeoutMs: seconds === undefined ? DEFAULT_HOOK_TIMEOUT_MS : seconds * 1000 };
}
