import { Repository } from '../../repo-format/repository.js';
import { DEFAULT_BLOCK_SIZE } from '../../repo-format/constants.js';
import type { RepositoryConfig } from '../../repo-format/config.js';
import type { Passphrase } from '../../repo-format/passphrase.js';
import { checkLocalPath } from '../../repo-format/local-path.js';
import { refuseRepositoryInsideRepository } from '../host/write-guard.js';

/** `passphrase` makes an encrypted repository (SPEC.md, section 18). */
export async function initRepository(path: string, options: { blockSize?: number | undefined; passphrase?: Passphrase | undefined } = {}): Promise<RepositoryConfig> {
  // A URL is refused as one before the path is looked at; a new repository never goes inside another.
  checkLocalPath(path, 'repository');
  await refuseRepositoryInsideRepository(path);
  return Repository.init(path, { blockSize: options.blockSize ?? DEFAULT_BLOCK_SIZE, passphrase: options.passphrase });
}
