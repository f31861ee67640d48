/**
 * Undoing what a journal names (SPEC.md 12.1): detach attachments, cancel transfers, finalize backups,
 * remove VMs, snapshots and disks, each idempotently (already gone is fine).
 */
import { Journal, type JournalEntry } from '../../repo-format/journal.js';
import { OvirtClient, type OvirtClientOptions } from './client.js';
import { isNotFound, type Wait } from './common.js';
import { attribute, child, children, text } from './xml.js';

async function deleteIfPresent(client: OvirtClient, path: string): Promise<void> {
  await client.delete(path).catch((error: unknown) => {
    if (!isNotFound(error)) throw error;
  });
}

/** The order cleanup undoes kinds in: what holds a resource goes before the resource. */
const UNDO_ORDER = ['attachment', 'transfer', 'backup', 'vm', 'snapshot', 'disk'];

/** Waits until `probe` sees a terminal state, or the entity is gone (404). */
async function settle(client: OvirtClient, what: string, path: string, root: string, done: (phase: string | undefined) => boolean, wait: Wait): Promise<void> {
  await client.waitFor(what, async () => {
    try {
      return done(text(child((await client.get(path)).xml, root), 'phase')) ? true : undefined;
    } catch (error) {
      if (isNotFound(error)) return true;
      throw error;
    }
  }, wait);
}

/** Removes what a journal entry names, idempotently (already gone is fine). */
export async function undo(client: OvirtClient, entry: JournalEntry, wait: Wait): Promise<void> {
  if (entry.kind === 'attachment') {
    await deleteIfPresent(client, `vms/${entry.vm}/diskattachments/${entry.disk}`);
  } else if (entry.kind === 'vm') {
    await deleteIfPresent(client, `vms/${entry.vm}`);
  } else if (entry.kind === 'disk') {
    await deleteIfPresent(client, `disks/${entry.disk}`);
  } else if (entry.kind === 'transfer') {
    await client.post(`imagetransfers/${entry.transfer}/cancel`, 'action', {}).catch((error: unknown) => {
      if (!isNotFound(error)) throw error;
    });
    await settle(client, `image transfer ${entry.transfer} to end`, `imagetransfers/${entry.transfer}`, 'image_transfer', (p) => p === undefined || p.startsWith('finished') || p.startsWith('cancelled'), wait);
  } else if (entry.kind === 'backup') {
    await client.post(`vms/${entry.vm}/backups/${entry.backup}/finalize`, 'action', {}).catch((error: unknown) => {
      if (!isNotFound(error)) throw error;
    });
    await settle(client, `backup ${entry.backup} to finish`, `vms/${entry.vm}/backups/${entry.backup}`, 'backup', (p) => p === 'succeeded' || p === 'failed', wait);
  } else if (entry.kind === 'snapshot' && !entry.snapshot) {
    // The run died between asking for the snapshot and learning its id: find it by its description.
    const list = children(child((await client.get(`vms/${entry.vm}/snapshots`)).xml, 'snapshots'), 'snapshot');
    for (const found of list.filter((s) => text(s, 'description') === entry.description)) {
      await undo(client, { ...entry, snapshot: attribute(found, 'id')! }, wait);
    }
  } else if (entry.kind === 'snapshot') {
    const path = `vms/${entry.vm}/snapshots/${entry.snapshot}`;
    // A snapshot still being created cannot be removed yet: wait for it to settle (or vanish) first.
    const settled = await client.waitFor(`snapshot ${entry.snapshot} to settle`, async () => {
      try {
        const status = text(child((await client.get(path)).xml, 'snapshot'), 'snapshot_status');
        return status === 'locked' ? undefined : 'present';
      } catch (error) {
        if (isNotFound(error)) return 'gone';
        throw error;
      }
    }, wait);
    if (settled === 'present') {
      await client.delete(path).catch((error: unknown) => {
        if (!isNotFound(error)) throw error;
      });
    }
    await client.waitFor(`snapshot ${entry.snapshot} to be removed`, async () => client.get(path).then(() => undefined, (error: unknown) => {
      if (isNotFound(error)) return true;
      throw error;
    }), wait);
  }
}

/** Undoes every entry of every journal in the repository: attachments first, then snapshots. */
export async function cleanupJournals(repo: string, client: OvirtClient, wait: Wait, notice: (m: string) => void): Promise<number> {
  let removed = 0;
  for (const journal of await Journal.list(repo)) {
    const ordered = [...journal.entries].sort((a, b) => UNDO_ORDER.indexOf(a.kind) - UNDO_ORDER.indexOf(b.kind));
    for (const entry of ordered) {
      await undo(client, entry, wait);
      await journal.remove((e) => e === entry);
      notice(`removed leftover ${entry.kind} ${entry.snapshot || entry.transfer || entry.backup || entry.disk || entry.vm} of an interrupted run`);
      removed += 1;
    }
    await journal.remove(() => true);
  }
  return removed;
}

/**
 * How every oVirt flow starts: log in, then undo what an interrupted run left behind, so that a flow never
 * works beside a previous run's snapshot, attachment or disk. Returns the logged-in client.
 */
export async function connectAndCleanUp(repo: string, clientOptions: OvirtClientOptions, wait: Wait, notice: (m: string) => void): Promise<{ client: OvirtClient; removed: number }> {
  const client = new OvirtClient(clientOptions);
  await client.login();
  return { client, removed: await cleanupJournals(repo, client, wait, notice) };
}

export async function ovirtCleanup(options: { repo: string; ovirt: OvirtClientOptions; onNotice?: (m: string) => void }): Promise<number> {
  return (await connectAndCleanUp(options.repo, options.ovirt, { timeoutMs: 600_000, intervalMs: 1000 }, options.onNotice ?? (() => undefined))).removed;
}
