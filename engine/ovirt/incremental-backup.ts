/**
 * oVirt 4.4+ incremental backup API: `POST /vms/{id}/backups` (with `from_checkpoint_id` for an
 * incremental) → wait for phase `ready` → per disk read `backup_mode` → a download image transfer
 * (format raw) → read through ovirt-imageio (zero extents skipped; for incremental disks only the dirty
 * extents) → finalize the transfers → finalize the backup. `to_checkpoint_id` is kept at once (in the
 * journal, then in the record: the engine purges backups after 15 minutes).
 *
 * A missing or invalid checkpoint (400 from the engine) or a failed incremental (event 10791) is retried
 * as a full backup, said in `modeReason`. oVirt cannot mix full and incremental disks in one backup: if a
 * disk has no valid chain, every disk is read in full.
 */
import { readFile } from 'node:fs/promises';
import { Journal, type JournalEntry } from '../../repo-format/journal.js';
import type { DiskCbt } from '../../repo-format/backup-record.js';
import { backup, openBackupRepository, type BackupResult } from '../backup.js';
import { chooseChain, settleChain, type CbtDiskJob, type CbtSession, type Chain, type ChainArgs, type RequestedMode } from '../cbt/chain.js';
import { OvirtFaultError } from '../errors.js';
import type { OvirtClient } from './client.js';
import { ImageioSource } from './imageio-source.js';
import { finalizeTransfer, startTransfer } from './transfers.js';
import { connectAndCleanUp, undo } from './cleanup.js';
import { vmIdByName, waitOf, type OvirtBackupRunOptions, type Wait } from './common.js';
import { attribute, child, children, text } from './xml.js';

export interface OvirtIncrementalBackupOptions extends OvirtBackupRunOptions {
  mode?: RequestedMode | undefined;
}

interface VmDisk {
  id: string;
  name: string;
  size: number;
}

async function vmDisks(client: OvirtClient, vmId: string): Promise<VmDisk[]> {
  const ids = children(child((await client.get(`vms/${vmId}/diskattachments`)).xml, 'disk_attachments'), 'disk_attachment').map((a) => attribute(child(a, 'disk'), 'id') ?? attribute(a, 'id')!);
  const disks: VmDisk[] = [];
  for (const id of ids) {
    const disk = child((await client.get(`disks/${id}`)).xml, 'disk');
    disks.push({ id, name: text(disk, 'alias') ?? text(disk, 'name') ?? id, size: Number(text(disk, 'provisioned_size')) });
  }
  // Disk names must be unique in a backup: aliases when they are, ids otherwise.
  if (new Set(disks.map((d) => d.name)).size !== disks.length) for (const d of disks) d.name = d.id;
  return disks;
}

export async function ovirtIncrementalBackup(options: OvirtIncrementalBackupOptions): Promise<BackupResult> {
  const notice = options.onNotice ?? (() => undefined);
  const wait = waitOf(options);
  await openBackupRepository(options.repo, options.passphrase, 'read'); // a clear error before anything is created
  const { client } = await connectAndCleanUp(options.repo, options.ovirt, wait, notice);
  const vmId = await vmIdByName(client, options.vm);
  const disks = await vmDisks(client, vmId);
  const ovf = text(child(child(child((await client.get(`vms/${vmId}`, { all_content: 'true' })).xml, 'vm'), 'initialization'), 'configuration'), 'data');
  return backup({
    repo: options.repo,
    passphrase: options.passphrase,
    name: options.vm,
    mode: options.mode ?? 'auto',
    workers: options.workers,
    signal: options.signal,
    onProgress: options.onProgress,
    onNotice: options.onNotice,
    attachments: [
      ...(ovf ? [{ name: 'ovf', mediaType: 'application/ovf+xml', data: ovf }] : []),
      { name: 'ovirt-vm', mediaType: 'application/json', data: JSON.stringify({ vmId, vmName: options.vm, disks: disks.map((d) => ({ id: d.id, alias: d.name, size: d.size })) }) },
    ],
    provider: async (args) => openOvirtBackup(client, vmId, disks, args, wait, options.repo, options.ovirt.caFile ? await readFile(options.ovirt.caFile) : undefined),
  });
}

async function openOvirtBackup(client: OvirtClient, vmId: string, disks: VmDisk[], args: ChainArgs, wait: Wait, repo: string, ca: Buffer | undefined): Promise<CbtSession & { disks: CbtDiskJob[] }> {
  const checkpoints = new Map(
    children(child((await client.get(`vms/${vmId}/checkpoints`)).xml, 'checkpoints'), 'checkpoint').map((c) => [attribute(c, 'id')!, text(c, 'state') ?? 'created']),
  );
  const baseProblem = (base: string): string | null => {
    const state = checkpoints.get(base);
    if (state === undefined) return `checkpoint ${base} no longer exists in oVirt`;
    return state === 'invalid' ? `checkpoint ${base} is invalid in oVirt` : null;
  };
  let chains = disks.map((d) => chooseChain(d.name, args.requested, { size: d.size, baseProblem, addedDisk: true }, args.history));
  const allFull = (why: (chain: Chain) => string | null): void => {
    chains = chains.map((c) => ({ mode: 'full', reason: c.mode === 'full' ? c.reason : why(c), base: null, parent: null, previous: null }));
  };
  const bases = new Set(chains.map((c) => c.base));
  if (chains.some((c) => c.mode === 'full') || bases.size > 1) {
    allFull(() => 'oVirt cannot mix full and incremental disks in one backup, and another disk of the VM needs a full backup');
  }

  const journal = await Journal.create(repo, { flow: 'ovirt-backup-api', vm: vmId });
  const entries: JournalEntry[] = [];
  const track = async (entry: JournalEntry): Promise<void> => {
    await journal.add(entry);
    entries.push(entry);
  };

  // Start the backup; a checkpoint the engine refuses, or a failed incremental, is retried as a full.
  const start = async (from: string | null): Promise<{ id: string; to: string; phase: string }> => {
    const answer = child(
      (await client.post(`vms/${vmId}/backups`, 'backup', {
        ...(from ? { from_checkpoint_id: from } : {}),
        disks: { disk: disks.map((d) => ({ '@_id': d.id })) },
      })).xml,
      'backup',
    );
    const id = attribute(answer, 'id')!;
    await track({ kind: 'backup', vm: vmId, backup: id });
    // Kept from the first answer: the engine purges finished backups (and their ids) after 15 minutes.
    const to = text(answer, 'to_checkpoint_id') ?? '';
    const phase = await client.waitFor(`backup ${id} to be ready`, async () => {
      const current = text(child((await client.get(`vms/${vmId}/backups/${id}`)).xml, 'backup'), 'phase');
      return current === 'ready' || current === 'failed' ? current : undefined;
    }, wait);
    return { id, to, phase };
  };
  let started: { id: string; to: string; phase: string };
  const base = chains[0]?.base ?? null;
  try {
    started = await start(base);
  } catch (error) {
    if (!(base && error instanceof OvirtFaultError && error.status === 400 && /checkpoint/i.test(error.message))) throw error;
    allFull(() => `oVirt refused the checkpoint: ${error.message}`);
    started = await start(null);
  }
  if (started.phase === 'failed' && base && chains[0]?.mode !== 'full') {
    await undo(client, entries.at(-1)!, wait);
    allFull(() => 'oVirt failed the incremental backup (event 10791: a full backup is needed)');
    started = await start(null);
  }
  if (started.phase !== 'ready') throw new OvirtFaultError(`backup of VM ${vmId}`, 200, `the backup ended in phase ${started.phase}`, 'see the engine events for the reason');
  const backupId = started.id;
  const modes = new Map(
    children(child((await client.get(`vms/${vmId}/backups/${backupId}/disks`)).xml, 'disks'), 'disk').map((d) => [attribute(d, 'id')!, text(d, 'backup_mode') ?? 'full']),
  );

  const transfers: { id: string; entry: JournalEntry }[] = [];
  const sources: ImageioSource[] = [];
  const jobs: CbtDiskJob[] = [];
  try {
    for (const [i, disk] of disks.entries()) {
      let chain = chains[i]!;
      if (chain.mode !== 'full' && modes.get(disk.id) !== 'incremental') {
        chain = { mode: 'full', reason: 'oVirt chose a full backup for this disk', base: null, parent: null, previous: null };
      }
      const { url } = await startTransfer(client, { disk: disk.id, backup: backupId, direction: 'download' }, async (id) => {
        const entry: JournalEntry = { kind: 'transfer', transfer: id };
        await track(entry);
        transfers.push({ id, entry });
      }, wait);
      // imageio's certificate is signed by the engine's CA, like the API's.
      const source = await ImageioSource.open(url, disk.size, { name: disk.name, description: { kind: 'ovirt-imageio', path: `${vmId}/${disk.id}` }, ca });
      sources.push(source);
      const settled = await settleChain({
        chain,
        source,
        dirty: () => source.dirtyExtents(),
        what: 'checkpoint',
        checkpoint: started.to,
        backupId: args.backupId,
        granularity: 65536,
        loadPage: args.loadPage,
        blockSize: args.blockSize,
        blockId: args.blockId,
        available: args.available,
      });
      const cbt: DiskCbt = settled.cbt;
      jobs.push({ name: disk.name, source, plan: settled.plan, mode: settled.chain.mode, modeReason: settled.chain.reason, parent: settled.chain.parent?.record.id ?? null, cbt });
    }
  } catch (error) {
    for (const source of sources) await source.dispose();
    for (const entry of [...entries].reverse()) await undo(client, entry, wait).catch(() => undefined);
    await journal.remove(() => true);
    throw error;
  }

  let released = false;
  const release = async (): Promise<void> => {
    if (released) return;
    released = true;
    for (const source of sources) await source.dispose();
    // Transfers first: the engine refuses to finalize a backup with an active transfer.
    for (const { id, entry } of transfers) {
      await finalizeTransfer(client, id, wait);
      await journal.remove((e) => e === entry);
    }
    const backupEntry = entries.find((e) => e.kind === 'backup' && e.backup === backupId)!;
    await undo(client, backupEntry, wait);
    await journal.remove(() => true);
  };
  return {
    disks: jobs,
    release,
    finish: async () => undefined,
    rollback: async () => {
      await release().catch(() => undefined);
    },
  };
}
