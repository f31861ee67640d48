/**
 * The `config` file: written once by `init`, never changed. JSON (UTF-8), see SPEC.md, "Config".
 */
import {
  CHECKSUM_ID,
  CIPHER_ID,
  COMPRESSION_ID,
  CONFIG_FORMAT_NAME,
  ENCRYPTED_FORMAT_VERSION,
  FORMAT_VERSION,
  HASH_ID,
  KEYED_HASH_ID,
  LAYOUT,
  MAP_PAGE_ENTRIES,
  MAX_BLOCK_SIZE,
  MIN_BLOCK_SIZE,
} from './constants.js';
import { InvalidArgumentError } from './errors.js';

export interface RepositoryConfig {
  format: typeof CONFIG_FORMAT_NAME;
  version: number;
  id: string;
  created: string;
  blockSize: number;
  hash: string;
  checksum: string;
  compression: string;
  mapPageEntries: number;
  /** Present exactly in encrypted repositories (format version 2). */
  encryption?: EncryptionConfig;
}

export interface EncryptionConfig {
  cipher: typeof CIPHER_ID;
  /** The key file, relative to the repository root: keys/<16 hex>.json. */
  keyFile: string;
}

/** The newest version this engine reads for a config of this kind (plain or encrypted). */
export function newestReadableVersion(config: { encryption?: unknown }): number {
  return config.encryption === undefined ? FORMAT_VERSION : ENCRYPTED_FORMAT_VERSION;
}

export function validateBlockSize(blockSize: number): void {
  const isPowerOfTwo = Number.isInteger(Math.log2(blockSize));
  if (!Number.isSafeInteger(blockSize) || !isPowerOfTwo || blockSize < MIN_BLOCK_SIZE || blockSize > MAX_BLOCK_SIZE || blockSize % MIN_BLOCK_SIZE !== 0) {
    throw new InvalidArgumentError(
      `block size ${blockSize} is not allowed: it must be a power of two from ${MIN_BLOCK_SIZE / 1024} KiB to ${MAX_BLOCK_SIZE / 1024 / 1024} MiB`,
      { blockSize },
    );
  }
}

export function newConfig(id: string, blockSize: number, created: Date, encryption?: EncryptionConfig): RepositoryConfig {
  validateBlockSize(blockSize);
  return {
    format: CONFIG_FORMAT_NAME,
    version: encryption ? ENCRYPTED_FORMAT_VERSION : FORMAT_VERSION,
    id,
    created: created.toISOString(),
    blockSize,
    hash: encryption ? KEYED_HASH_ID : HASH_ID,
    checksum: CHECKSUM_ID,
    compression: COMPRESSION_ID,
    mapPageEntries: MAP_PAGE_ENTRIES,
    ...(encryption ? { encryption } : {}),
  };
}

const KEY_FILE_PATTERN = new RegExp(`^${LAYOUT.keys}/[0-9a-f]{16}\\.json$`);

function encryptionProblem(c: Record<string, unknown>): string | undefined {
  if (c.encryption === undefined) return c.hash === HASH_ID ? undefined : 'config names a hash, checksum or compression this engine does not know';
  if (c.version !== ENCRYPTED_FORMAT_VERSION) return `config has encryption parameters but version ${String(c.version)}`;
  const e = c.encryption as Record<string, unknown> | null;
  if (typeof e !== 'object' || e === null || e.cipher !== CIPHER_ID) return 'config names a cipher this engine does not know';
  if (typeof e.keyFile !== 'string' || !KEY_FILE_PATTERN.test(e.keyFile)) return 'config names no valid key file';
  if (c.hash !== KEYED_HASH_ID) return 'config names a hash, checksum or compression this engine does not know';
  return undefined;
}

export function encodeConfig(config: RepositoryConfig): Buffer {
  return Buffer.from(`${JSON.stringify(config, null, 2)}\n`, 'utf8');
}

/**
 * Parses the config. Returns a reason string for anything that is not this format at all; the version
 * check is the caller's (it needs the path for its message).
 */
export function decodeConfig(bytes: Buffer): RepositoryConfig | string {
  let value: unknown;
  try {
    value = JSON.parse(bytes.toString('utf8'));
  } catch {
    return 'config is not JSON';
  }
  if (typeof value !== 'object' || value === null) return 'config is not an object';
  const c = value as Record<string, unknown>;
  if (c.format !== CONFIG_FORMAT_NAME) return 'config does not name this repository format';
  if (typeof c.version !== 'number' || !Number.isInteger(c.version) || c.version < 1) return 'config has no valid version';
  if (c.version > newestReadableVersion(c)) return { ...(c as unknown as RepositoryConfig) };
  if (typeof c.id !== 'string' || !/^[0-9a-f]{32}$/.test(c.id)) return 'config has no valid repository id';
  if (typeof c.blockSize !== 'number') return 'config has no block size';
  const encryption = encryptionProblem(c);
  if (encryption) return encryption;
  if (c.checksum !== CHECKSUM_ID || c.compression !== COMPRESSION_ID) return 'config names a hash, checksum or compression this engine does not know';
  if (c.mapPageEntries !== MAP_PAGE_ENTRIES) return 'config names an unsupported map page size';
  try {
    validateBlockSize(c.blockSize);
  } catch {
    return `config block size ${c.blockSize} is invalid`;
  }
  return c as unknown as RepositoryConfig;
}
