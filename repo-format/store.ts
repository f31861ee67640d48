/**
 * The repository's store: where its objects (config, key file, packs, records, markers) live, behind the
 * one Storage interface (storage/storage.ts). A v1/v2 repository's store is its folder (storage/local.ts),
 * file for file today's layout, with tmp/ as the folder of temporary files. What belongs to the host and not
 * to the store stays local files beside it and never goes through here: the lock, the LevelDB index, the
 * reader and writer registrations, the space reserve, tmp/ and the journals (SPEC.md, section 2).
 *
 * The keys of the layout are made here and nowhere else: engine/ never names a pack, a record or a marker
 * by its place, it asks the repository (repository.ts) for the object.
 */
import { join } from 'node:path';
import { LAYOUT } from './constants.js';
import { LocalStorage } from './storage/local.js';
import type { Storage } from './storage/storage.js';

/** Opens the store of the repository at `root`. */
export type StoreOpener = (root: string) => Storage;

const localStore: StoreOpener = (root) => new LocalStorage(root, { tempDir: join(root, LAYOUT.tmp) });
let opener: StoreOpener = localStore;

export function openStore(root: string): Storage {
  return opener(root);
}

/**
 * Puts the objects of every repository opened in this process in another store (undefined: back to the
 * folder). For tests that prove every object is reached through the store: with the objects elsewhere,
 * any code that reads or writes them as files under the repository's folder fails.
 */
export function useStoreOpener(replacement: StoreOpener | undefined): void {
  opener = replacement ?? localStore;
}

/**
 * The store itself, or that of the repository folder at a path: the public functions that took a
 * repository's path (listQuarantine, listProtected, scanPack …) still do, for tools and scripts.
 */
export function storeAt(where: Storage | string): Storage {
  return typeof where === 'string' ? openStore(where) : where;
}

export const CONFIG_KEY = LAYOUT.config;

export function packKey(packId: string): string {
  return `${LAYOUT.packs}/${packId.slice(0, 2)}/${packId}`;
}

export function recordKey(backupId: string): string {
  return `${LAYOUT.backups}/${backupId}`;
}

/** The listing prefixes of the layout's object folders. */
export const PACKS_PREFIX = `${LAYOUT.packs}/`;
export const RECORDS_PREFIX = `${LAYOUT.backups}/`;
export const QUARANTINE_PREFIX = `${LAYOUT.quarantine}/`;
export const PROTECTED_PREFIX = `${LAYOUT.protected}/`;

const PACK_KEY = /^packs\/([0-9a-f]{2})\/([0-9a-f]{32})$/;
const RECORD_KEY = /^backups\/([0-9a-f]{32})$/;

/** The pack id a key names, or undefined for anything else lying in packs/ (a stray: never a pack). */
export function packIdOfKey(key: string): string | undefined {
  const match = PACK_KEY.exec(key);
  return match && match[2]!.startsWith(match[1]!) ? match[2] : undefined;
}

export function recordIdOfKey(key: string): string | undefined {
  return RECORD_KEY.exec(key)?.[1];
}
