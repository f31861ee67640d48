/**
 * The reader registry: processes that read packs without holding the repository lock (an `engine serve`
 * exporting a backup for hours, a mount) say so in `readers/<token>.json`. They resolved their chunk
 * locations under the lock and then let it go, so that nightly backups are not blocked; in exchange,
 * whatever deletes or rewrites packs (gc) must keep every pack alive while a live reader is registered.
 */
import { LAYOUT } from './constants.js';
import { listRegistrations, register, removeStaleRegistrations, type Registered, type Registration } from './registry.js';

export type ReaderRegistration = Registration;
export type RegisteredReader = Registered;

export function registerReader(root: string, command: string, backupIds: string[]): Promise<RegisteredReader> {
  return register(root, LAYOUT.readers, command, backupIds);
}

export function listReaders(root: string): Promise<{ live: (ReaderRegistration | { unreadable: string })[]; stale: ReaderRegistration[] }> {
  return listRegistrations(root, LAYOUT.readers);
}

export function removeStaleReaders(root: string): Promise<number> {
  return removeStaleRegistrations(root, LAYOUT.readers);
}
