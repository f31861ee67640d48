import { Repository, prepareRepositoryRoot } from '../../repo-format/repository.js';
import { DEFAULT_BLOCK_SIZE, FORMAT_VERSION, ENCRYPTED_FORMAT_VERSION, MANY_WRITERS_FORMAT_VERSION } from '../../repo-format/constants.js';
import { validateBlockSize, type RepositoryConfig } from '../../repo-format/config.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import { INIT_COMPRESSION, LZ4, type Compression } from '../../repo-format/compression.js';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { checkLocalPath } from '../../repo-format/local-path.js';
import { initV3 } from '../../repo-format/v3/init.js';
import { locationKind, openLocation, type S3Settings } from '../../repo-format/v3/location.js';
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
  if (kind === 'folder') {
    checkLocalPath(path, 'repository');
    await refuseRepositoryInsideRepository(path);
    await prepareRepositoryRoot(path);
  }
  const storage = await openLocation(path, options.s3);
  try {
    return await initV3(storage, { blockSize, passphrase: options.passphrase, compression: options.compression ?? INIT_COMPRESSION });
  } finally {
    await storage.close();
  }
}
