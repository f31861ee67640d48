import { Repository, prepareRepositoryRoot } from '../../repo-format/repository.js';
import { DEFAULT_BLOCK_SIZE, FORMAT_VERSION, ENCRYPTED_FORMAT_VERSION, MANY_WRITERS_FORMAT_VERSION } from '../../repo-format/constants.js';
import { validateBlockSize, type ObjectLockConfig, type RepositoryConfig } from '../../repo-format/config.js';
import { prepareLockedBucket, s3Mode, UNLOCKED_PREFIX } from '../../repo-format/v3/object-lock.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import { INIT_COMPRESSION, LZ4, type Compression } from '../../repo-format/compression.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { checkLocalPath } from '../../repo-format/local-path.js';
import { initV3 } from '../../repo-format/v3/init.js';
import { locationKind, openLocation, s3BackendOf, type S3Settings } from '../../repo-format/v3/location.js';
import { refuseRepositoryInsideRepository } from '../host/write-guard.js';

export interface InitOptions {
  blockSize?: number | undefined;
  /** `passphrase` makes an encrypted repository (SPEC.md, section 18). */
  passphrase?: Passphrase | undefined;
  /**
   * The format version: 3 (many writers, SPEC.md 19) by default and always on S3; 1 (plain) or 2
   * (encrypted) on request, for engines older than format 3.
   */
  format?: number | undefined;
  /**
   * What the writers compress with (SPEC.md 3, 13.1): by default zstd level 1 for format 3, and lz4 for
   * formats 1 and 2 (which exist for engines older than format 3, none of which reads zstd).
   */
  compression?: Compression | undefined;
  /** Where an s3:// repository's store is, beside what the URL says. */
  s3?: S3Settings | undefined;
  /**
   * S3 only: lock every object the engine writes (but leases) for this long from its write, in this mode
   * (SPEC.md 20.5); the bucket is created with Object Lock, or must have it and versioning enabled.
   */
  objectLock?: ObjectLockConfig | undefined;
}

export async function initRepository(path: string, options: InitOptions = {}): Promise<RepositoryConfig> {
  const kind = locationKind(path);
  const blockSize = options.blockSize ?? DEFAULT_BLOCK_SIZE;
  const format = options.format ?? MANY_WRITERS_FORMAT_VERSION;
  if (format !== FORMAT_VERSION && format !== ENCRYPTED_FORMAT_VERSION && format !== MANY_WRITERS_FORMAT_VERSION) {
    throw new InvalidArgumentError(`format version ${format} does not exist: 1 (plain), 2 (encrypted) or 3 (many writers, on a folder or S3)`, { format });
  }
  if (kind === 's3' && format !== MANY_WRITERS_FORMAT_VERSION) throw new InvalidArgumentError(`an S3 repository is always format version 3 (many writers): ${path} cannot be version ${format}`, { format });
  if (format === FORMAT_VERSION && options.passphrase !== undefined) throw new InvalidArgumentError('format version 1 is plain: an encrypted repository is version 2 or 3', { format });
  if (format === ENCRYPTED_FORMAT_VERSION && options.passphrase === undefined) throw new InvalidArgumentError('format version 2 is encrypted: give a passphrase (version 1 is plain)', { format });
  if (format !== MANY_WRITERS_FORMAT_VERSION) {
    // A URL is refused as one before the path is looked at; a new repository never goes inside another.
    checkLocalPath(path, 'repository');
    await refuseRepositoryInsideRepository(path);
    return Repository.init(path, { blockSize, passphrase: options.passphrase, compression: options.compression ?? LZ4 });
  }
  validateBlockSize(blockSize);
  if (options.objectLock && kind !== 's3') throw new InvalidArgumentError(`--object-lock is S3 Object Lock: ${path} is a folder (make its files immutable with the file system's own means)`);
  if (kind === 'folder') {
    checkLocalPath(path, 'repository');
    await refuseRepositoryInsideRepository(path);
    await prepareRepositoryRoot(path);
  }
  // With --object-lock the bucket may not exist yet: it is created (with the lock) before the usual check.
  const storage = await openLocation(path, { ...options.s3, check: options.objectLock ? false : options.s3?.check });
  try {
    if (options.objectLock) {
      const backend = s3BackendOf(storage)!;
      await prepareLockedBucket(backend);
      await backend.check();
      backend.setObjectLock({ mode: s3Mode(options.objectLock), retentionMs: options.objectLock.retentionMs, exempt: (key) => key.startsWith(UNLOCKED_PREFIX) });
    }
    return await initV3(storage, { blockSize, passphrase: options.passphrase, compression: options.compression ?? INIT_COMPRESSION, objectLock: options.objectLock });
  } finally {
    await storage.close();
  }
}
