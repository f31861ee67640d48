/**
 * Which VMs a policy means at a run (SPEC.md 23.1): its explicit sources as written; the libvirt domains of
 * the server's connection (`virsh list --all`: defined domains, running or not; a listed domain that does
 * not exist is kept, so that its run fails visibly instead of the VM going unprotected unnoticed) whose name
 * is listed or matches the pattern; the oVirt VMs that oVirt's search finds by cluster and tag, the pattern
 * checked again here (oVirt's `name=` matches loosely).
 *
 * Each VM has a key naming what is read, the same whichever policy or API job reads it: the scheduler
 * runs one job at a time per key.
 */
import { runTool } from '../../cbt/run-tool.js';
import type { BackupFrom } from '../../backup/request.js';
import type { OvirtSource } from '../job-requests.js';
import { diskSpec } from '../../backup/request.js';
import { globMatches, type Policy, type VmSelector } from './config.js';
import { ovirtCredentials } from '../runners.js';

export interface PolicyVm {
  /** What the VM is called in runs and backups (its backup name; an oVirt backup is named after its VM). */
  name: string;
  key: string;
  from: BackupFrom | { kind: 'ovirt'; ovirt: OvirtSource };
}

/** The key of what a backup reads: the same for a policy's VM and an API job reading the same thing. */
export function vmKey(from: PolicyVm['from'] | Record<string, unknown>): string | undefined {
  const f = from as { kind?: unknown; disks?: { kind: string; path?: string; uri?: string }[]; domain?: unknown; ovirt?: { url?: unknown; vm?: unknown } };
  switch (f.kind) {
    case 'disks':
      return `disks:${(f.disks ?? []).map((d) => diskSpec(d as Parameters<typeof diskSpec>[0])).sort().join('\n')}`;
    case 'libvirt':
      return `libvirt:${String(f.domain)}`;
    case 'ovirt':
      return `ovirt:${String(f.ovirt?.url).replace(/\/+$/, '')}:${String(f.ovirt?.vm)}`;
    default:
      return undefined;
  }
}

/** The domains of the server's libvirt connection, as `virsh list --all --name` prints them. */
export async function libvirtDomains(): Promise<string[]> {
  return (await runTool('virsh', ['-q', 'list', '--all', '--name'], { timeoutMs: 60_000 })).split('\n').map((l) => l.trim()).filter((l) => l !== '');
}

/** Of the domains there are, those the selector means (listed ones first, in their order), plus listed ones that are missing. */
export function chooseDomains(selector: Extract<VmSelector, { kind: 'libvirt' }>, present: readonly string[]): string[] {
  const chosen = [...selector.domains];
  const pattern = selector.pattern;
  if (pattern !== undefined) for (const name of [...present].sort()) if (globMatches(pattern, name) && !chosen.includes(name)) chosen.push(name);
  return chosen;
}

/** oVirt's search for a selector: `cluster=… and tag=… and name=…` (the pattern's `*` is oVirt's wildcard too). */
export function ovirtSearch(selector: Extract<VmSelector, { kind: 'ovirt' }>): string {
  const terms: string[] = [];
  if (selector.cluster !== undefined) terms.push(`cluster=${selector.cluster}`);
  if (selector.tag !== undefined) terms.push(`tag=${selector.tag}`);
  if (selector.pattern !== undefined) terms.push(`name=${selector.pattern}`);
  return terms.join(' and ');
}

export async function selectVms(policy: Policy, onLog: (message: string) => void): Promise<PolicyVm[]> {
  const selector = policy.vms;
  switch (selector.kind) {
    case 'sources':
      return selector.vms.map((vm) => {
        const from: BackupFrom = { kind: 'disks', disks: vm.disks };
        return { name: vm.name, key: vmKey(from)!, from };
      });
    case 'libvirt':
      return chooseDomains(selector, await libvirtDomains()).map((domain) => {
        const from: BackupFrom = { kind: 'libvirt', domain, quiesce: selector.quiesce === undefined ? undefined : { mode: selector.quiesce } };
        return { name: domain, key: vmKey(from)!, from };
      });
    case 'ovirt': {
      const { OvirtClient } = await import('../../ovirt/client.js');
      const { vmList } = await import('../../ovirt/answers.js');
      const client = new OvirtClient({ url: selector.url, credentials: await ovirtCredentials(selector.credentialsFile, onLog), caFile: selector.caFile, insecureHttp: selector.insecureHttp });
      await client.login();
      let names: string[];
      try {
        const found = await client.read('vms', vmList, { search: ovirtSearch(selector) });
        names = [...new Set(found.map((vm) => vm.name).filter((n): n is string => n !== undefined && (selector.pattern === undefined || globMatches(selector.pattern, n))))].sort();
      } finally {
        await client.logout().catch(() => undefined);
      }
      return names.map((vm) => {
        const ovirt: OvirtSource = { url: selector.url, vm, credentialsFile: selector.credentialsFile, caFile: selector.caFile, insecureHttp: selector.insecureHttp, appliance: undefined, deviceRoot: '/dev/disk/by-id', quiesce: selector.quiesce };
        const from = { kind: 'ovirt' as const, ovirt };
        return { name: vm, key: vmKey(from)!, from };
      });
    }
  }
}
