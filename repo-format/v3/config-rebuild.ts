/**
 * A lost or damaged config of a version-3 repository (a folder or S3), rebuilt by repair from the rest
 * (SPEC.md 19.12): version 3 with init's lease timing; the block size every readable record states; the
 * encryption of the one key file in keys/. The repository id is kept nowhere else in the store: a plain
 * repository gets a new one (the host caches, named by the old id, are left behind and rebuilt under the new
 * one); an encrypted one's id is bound to its key file's seal, and is found among the ids this host's cache
 * directory holds (a host that used the repository), else repair refuses. A damaged config is kept beside
 * the new one as `config.damaged-<time>`; a missing one is created only if absent.
 */
import { randomBytes } from 'node:crypto';
import { readdir } from 'node:fs/promises';
import { CIPHER_ID, DEFAULT_BLOCK_SIZE, KEY_FILE_LIMIT, RECORD_FILE_LIMIT, SEALED_METADATA_MAGIC } from '../constants.js';
import { encodeConfig, newConfig, validateBlockSize, type RepositoryConfig } from '../config.js';
import { DEFAULT_COMPRESSION } from '../compression.js';
import { NotARepositoryError, PassphraseRequiredError } from '../errors.js';
import { decodeKeyFile, unlockKeyFile } from '../key-file.js';
import { decodeBackupRecord } from '../backup-record.js';
import { openMetadata } from '../sealed-metadata.js';
import type { Passphrase } from '../passphrase.js';
import type { RepositoryKeys } from '../crypto.js';
import type { Storage } from '../storage/storage.js';
import { isStorageError } from '../storage/storage-error.js';
import type { RecoveredConfig } from '../config-recovery.js';

async function keys(storage: Storage, prefix: string): Promise<string[]> {
  const out: string[] = [];
  for await (const info of storage.list(prefix)) out.push(info.key);
  return out;
}

/** Whether the store holds a version-3 repository's objects (packs, records or segments) besides its config. */
export async function hasVersion3Objects(storage: Storage): Promise<boolean> {
  for (const prefix of ['index/', 'packs/', 'backups/']) {
    for await (const _ of storage.list(prefix)) return true;
  }
  return false;
}

export async function rebuildVersion3Config(storage: Storage, where: string, why: string, options: { passphrase: Passphrase | undefined; cacheRoot: string }): Promise<RecoveredConfig> {
  const keyFiles = (await keys(storage, 'keys/')).filter((key) => /^keys\/[0-9a-f]{16}\.json$/.test(key));
  if (keyFiles.length > 1) throw new NotARepositoryError(where, `its config is lost (${why}), and keys/ holds ${keyFiles.length} key files with no config to say which is the repository's`);
  const keyFile = keyFiles[0];
  let id: string | undefined;
  let unlocked: RepositoryKeys | undefined;
  if (keyFile) {
    if (options.passphrase === undefined) throw new PassphraseRequiredError(where);
    const file = decodeKeyFile(await storage.get(keyFile, { maxSize: KEY_FILE_LIMIT }), `key file ${keyFile}`);
    const candidates = (await readdir(options.cacheRoot).catch(() => [] as string[])).filter((name) => /^[0-9a-f]{32}$/.test(name));
    for (const candidate of candidates) {
      try {
        unlocked = await unlockKeyFile(file, options.passphrase, candidate, where);
        id = candidate;
        break;
      } catch {
        // Another repository's cache, or a wrong passphrase: the next candidate.
      }
    }
    if (!id) {
      throw new NotARepositoryError(where, `its config is lost (${why}); the repository id, to which the key file's seal is bound, is kept only there and in the index cache of a host that used the repository (none here, or the passphrase is wrong): run repair on such a host, or restore the config from a copy`);
    }
  }
  const sizes = new Set<number>();
  let oldest: string | undefined;
  for (const key of await keys(storage, 'backups/')) {
    try {
      const bytes = await storage.get(key, { maxSize: RECORD_FILE_LIMIT });
      // A sealed record with no key file: the repository is encrypted and its key file lost. A plain config
      // written now would make every command misread it (and the key file, restored later, would not count).
      if (!unlocked && bytes.subarray(0, SEALED_METADATA_MAGIC.length).equals(SEALED_METADATA_MAGIC)) {
        throw new NotARepositoryError(where, `its config is lost (${why}), and its records are encrypted (${key} is sealed) while keys/ holds no key file: restore the key file (keys/<id>.json) from a copy, then run repair again`);
      }
      const plaintext = unlocked ? openMetadata(unlocked.dataKey, bytes, key) : bytes;
      if (typeof plaintext === 'string') continue;
      const record = decodeBackupRecord(plaintext, key);
      validateBlockSize(record.blockSize);
      sizes.add(record.blockSize);
      if (oldest === undefined || record.startTime < oldest) oldest = record.startTime;
    } catch (error) {
      if (error instanceof NotARepositoryError) throw error;
      // A damaged record says nothing; repair reports it afterwards.
    }
  }
  if (sizes.size > 1) throw new NotARepositoryError(where, `its config is lost (${why}), and the records state ${sizes.size} different block sizes`);
  const blockSize = sizes.values().next().value ?? DEFAULT_BLOCK_SIZE;
  // Compression: the default of a new repository. Its frames read whatever they hold; naming zstd keeps
  // engines that predate it out (they would take its zstd frames for damage), which lz4 would not.
  const config: RepositoryConfig = newConfig(id ?? randomBytes(16).toString('hex'), blockSize, oldest ? new Date(oldest) : new Date(), keyFile ? { cipher: CIPHER_ID, keyFile } : undefined, true, DEFAULT_COMPRESSION);

  let keptAs: string | null = null;
  const present = await storage.get('config', { maxSize: 1024 * 1024 }).catch((error: unknown) => {
    if (isStorageError(error, 'not-found')) return undefined;
    if (isStorageError(error, 'too-large')) return Buffer.from('(larger than 1 MiB: not kept)');
    throw error;
  });
  if (present) {
    keptAs = `config.damaged-${new Date().toISOString().replace(/[^0-9]/g, '')}`;
    await storage.put(keptAs, present, { ifAbsent: true });
    await storage.put('config', encodeConfig(config));
  } else {
    await storage.put('config', encodeConfig(config), { ifAbsent: true });
  }
  return {
    config,
    why,
    sources: { id: id ? 'index' : 'new', blockSize: sizes.size > 0 ? 'records' : 'default', created: oldest ? 'records' : 'now', encryption: keyFile ? 'key file' : 'none' },
    keptAs,
  };
}
