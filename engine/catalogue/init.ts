import { Repository } from '../../repo-format/repository.js';
import { DEFAULT_BLOCK_SIZE } from '../../repo-format/constants.js';
import type { RepositoryConfig } from '../../repo-format/config.js';
import type { Passphrase } from '../../repo-format/passphrase.js';

/** `passphrase` makes an encrypted repository (SPEC.md, section 18). */
export async function initRepository(path: string, options: { blockSize?: number | undefined; passphrase?: Passphrase | undefined } = {}): Promise<RepositoryConfig> {
  return Repository.init(path, { blockSize: options.blockSize ?? DEFAULT_BLOCK_SIZE, passphrase: options.passphrase });
}
