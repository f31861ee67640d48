/**
 * Removing the lease of a process of this host that is gone, for whoever cleans up after it (`engine umount`
 * of a mount whose background server had to be killed, SPEC.md 16.2). The next acquirer on this host would
 * break it at once anyway (19.5: same host, same boot, process gone), but acquirers on other hosts would wait
 * for its expiry (T + 2B): gc's deletions among them. Only a lease judged dead by that same-host rule is
 * removed: never a live holder's, nor one of another host or boot.
 */
import { isStorageError } from '../storage/storage-error.js';
import { decodeLease, judgeLease, LEASE_MAX_SIZE } from './lease.js';
import { hostIdOf, processProbe, thisProcess } from './host.js';
import { openLocation } from './location.js';
import { defaultCacheRoot } from './session.js';

/** True when the lease at `key` of the repository at `where` was a dead process's of this host and is removed. */
export async function removeDeadProcessLease(where: string, key: string): Promise<boolean> {
  const storage = await openLocation(where);
  try {
    const bytes = await storage.get(key, { maxSize: LEASE_MAX_SIZE }).catch((error: unknown) => {
      if (isStorageError(error, 'not-found')) return undefined;
      throw error;
    });
    if (bytes === undefined) return false;
    const lease = decodeLease(bytes, key);
    if (typeof lease === 'string') return false;
    const me = thisProcess(await hostIdOf(defaultCacheRoot()));
    // An infinite bound: no lease is judged expired here, only dead by the same-host rule.
    if (judgeLease(lease, { host: me.host, boot: me.boot, now: Date.now(), skewBoundMs: Number.POSITIVE_INFINITY }, processProbe) !== 'dead') return false;
    await storage.delete(key);
    return true;
  } finally {
    await storage.close();
  }
}
