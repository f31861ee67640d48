import { Repository } from '../repo-format/repository.js';
import { DEFAULT_BLOCK_SIZE } from '../repo-format/constants.js';
import type { RepositoryConfig } from '../repo-format/config.js';

export async function initRepository(path: string, options: { blockSize?: number | undefined } = {}): Promise<RepositoryConfig> {
  return Repository.init(path, { blockSize: options.blockSize ?? DEFAULT_BLOCK_SIZE });
}
