/**
 * `init` of a version-3 repository (SPEC.md 19.1, 19.2), on a folder or on S3: the key file (encrypted),
 * then the config, each create-if-absent; the config last, so that a crashed init leaves no repository. Of
 * two inits of one place at once, one creates the config and the other fails with ENGINE_REPOSITORY_EXISTS.
 * Nothing else is created: packs/, index/, backups/ and leases/ appear with their first object.
 */
import { randomBytes } from 'node:crypto';
import { CIPHER_ID, LAYOUT } from '../constants.js';
import { encodeConfig, newConfig, type ObjectLockConfig, type RepositoryConfig } from '../config.js';
import { INIT_COMPRESSION, type Compression } from '../compression.js';
import { RepositoryExistsError } from '../errors.js';
import { newRepositoryKeys } from '../crypto.js';
import { checkPassphrase, createKeyFile, encodeKeyFile, keyFileName } from '../key-file.js';
import type { Passphrase } from '../passphrase.js';
import { isStorageError } from '../storage/storage-error.js';
import type { Storage } from '../storage/storage.js';
import { CONFIG_KEY } from '../store.js';

export interface InitV3Options {
  blockSize: number;
  passphrase?: Passphrase | undefined;
  /** What the writers compress with: the default (INIT_COMPRESSION) unless given. */
  compression?: Compression | undefined;
  /** S3 only, the bucket checked by the caller: every object but the leases locked (SPEC.md 20.5). */
  objectLock?: ObjectLockConfig | undefined;
}

/**
 * Creates the repository in `storage`, which must hold nothing (a folder: the caller has made it new or
 * checked it empty; a bucket's prefix: checked here, as a bucket is shared with other programs).
 */
export async function initV3(storage: Storage, options: InitV3Options): Promise<RepositoryConfig> {
  const where = storage.properties.location;
  if (options.passphrase !== undefined) checkPassphrase(options.passphrase);
  for await (const found of storage.list('')) throw new RepositoryExistsError(where, found.key);
  const repositoryId = randomBytes(16).toString('hex');
  const keyId = randomBytes(8).toString('hex');
  const encryption = options.passphrase === undefined ? undefined : { cipher: CIPHER_ID, keyFile: `${LAYOUT.keys}/${keyFileName(keyId)}` };
  const config: RepositoryConfig = { ...newConfig(repositoryId, options.blockSize, new Date(), encryption, true, options.compression ?? INIT_COMPRESSION), ...(options.objectLock ? { objectLock: options.objectLock } : {}) };
  try {
    if (encryption && options.passphrase !== undefined) {
      const keyFile = await createKeyFile(newRepositoryKeys(), options.passphrase, repositoryId, keyId);
      await storage.put(encryption.keyFile, encodeKeyFile(keyFile), { ifAbsent: true });
    }
    await storage.put(CONFIG_KEY, encodeConfig(config), { ifAbsent: true });
  } catch (error) {
    if (isStorageError(error, 'exists')) throw new RepositoryExistsError(where);
    throw error;
  }
  return config;
}
