/**
 * The `config` file: written once by `init`, never changed. JSON (UTF-8), see SPEC.md, "Config".
 */
import {
  CHECKSUM_ID,
  CIPHER_ID,
  CONFIG_FORMAT_NAME,
  ENCRYPTED_FORMAT_VERSION,
  FORMAT_VERSION,
  HASH_ID,
  KEYED_HASH_ID,
  LAYOUT,
  LEASE_SKEW_BOUND_MS,
  LEASE_TIME_MS,
  MANY_WRITERS_FORMAT_VERSION,
  MAP_PAGE_ENTRIES,
  MAX_BLOCK_SIZE,
  MIN_BLOCK_SIZE,
} from './constants.js';
import { InvalidArgumentError } from './errors.js';
import { compressionConfig, compressionOfConfig, LZ4, type Compression } from './compression.js';

export interface RepositoryConfig {
  format: typeof CONFIG_FORMAT_NAME;
  version: number;
  id: string;
  created: string;
  blockSize: number;
  hash: string;
  checksum: string;
  /** `lz4-block` or `zstd`: what the writers compress with (frames say for themselves what they hold). */
  compression: string;
  /** Present exactly with `compression: "zstd"`: its level, 1 to 19. */
  compressionLevel?: number;
  mapPageEntries: number;
  /** Present exactly in encrypted repositories (format version 2, and encrypted ones of version 3). */
  encryption?: EncryptionConfig;
  /** Format version 3 only: the repository's lease timing (SPEC.md 19.1, 19.5, 19.6). */
  leases?: LeaseConfig;
  /** S3 repositories made with `init --object-lock` only: how every object but the leases is locked (SPEC.md 20.5). */
  objectLock?: ObjectLockConfig;
}

export interface ObjectLockConfig {
  /** S3's retention mode. */
  mode: 'compliance' | 'governance';
  /** R: each object is locked until its write plus this; gc extends the objects it keeps (SPEC.md 20.5). */
  retentionMs: number;
}

/** The shortest and longest retention `init --object-lock` takes: a second (tests) to 100 years. */
export const OBJECT_LOCK_MIN_MS = 1000;
export const OBJECT_LOCK_MAX_MS = 100 * 365 * 24 * 3600 * 1000;

function objectLockProblem(c: Record<string, unknown>): string | undefined {
  if (c.objectLock === undefined) return undefined;
  if (c.version !== MANY_WRITERS_FORMAT_VERSION) return `config of version ${String(c.version)} names an object lock`;
  const l = c.objectLock as Record<string, unknown> | null;
  if (typeof l !== 'object' || l === null || (l.mode !== 'compliance' && l.mode !== 'governance')) return 'config names an object lock mode this engine does not know';
  if (!Number.isSafeInteger(l.retentionMs) || (l.retentionMs as number) < OBJECT_LOCK_MIN_MS || (l.retentionMs as number) > OBJECT_LOCK_MAX_MS) return 'config has no valid object lock retention';
  return undefined;
}

export interface LeaseConfig {
  /** T: a lease is valid this long after its latest write. */
  timeMs: number;
  /** B: the largest clock difference tolerated between a host and the store (4B < T). */
  skewBoundMs: number;
}

/** Is this a version-3 (many writers) config? */
export function isManyWriters(config: { version: number }): boolean {
  return config.version === MANY_WRITERS_FORMAT_VERSION;
}

export interface EncryptionConfig {
  cipher: typeof CIPHER_ID;
  /** The key file, relative to the repository root: keys/<16 hex>.json. */
  keyFile: string;
}

/** The newest version this engine reads for a config of this kind (plain or encrypted). */
export function newestReadableVersion(config: { encryption?: unknown; version?: unknown }): number {
  if (config.version === MANY_WRITERS_FORMAT_VERSION) return MANY_WRITERS_FORMAT_VERSION;
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

/** The compression a (decoded, so valid) config names for its writers. */
export function configCompression(config: RepositoryConfig): Compression {
  const c = compressionOfConfig(config as unknown as Record<string, unknown>);
  return typeof c === 'string' ? LZ4 : c;
}

/** `manyWriters`: format version 3 (SPEC.md 19), plain or encrypted, with init's lease timing. */
export function newConfig(id: string, blockSize: number, created: Date, encryption?: EncryptionConfig, manyWriters = false, compression: Compression = LZ4): RepositoryConfig {
  validateBlockSize(blockSize);
  return {
    format: CONFIG_FORMAT_NAME,
    version: manyWriters ? MANY_WRITERS_FORMAT_VERSION : encryption ? ENCRYPTED_FORMAT_VERSION : FORMAT_VERSION,
    id,
    created: created.toISOString(),
    blockSize,
    hash: encryption ? KEYED_HASH_ID : HASH_ID,
    checksum: CHECKSUM_ID,
    ...compressionConfig(compression),
    mapPageEntries: MAP_PAGE_ENTRIES,
    ...(encryption ? { encryption } : {}),
    ...(manyWriters ? { leases: { timeMs: LEASE_TIME_MS, skewBoundMs: LEASE_SKEW_BOUND_MS } } : {}),
  };
}

const KEY_FILE_PATTERN = new RegExp(`^${LAYOUT.keys}/[0-9a-f]{16}\\.json$`);

function encryptionProblem(c: Record<string, unknown>): string | undefined {
  if (c.encryption === undefined) return c.hash === HASH_ID ? undefined : 'config names a hash, checksum or compression this engine does not know';
  if (c.version !== ENCRYPTED_FORMAT_VERSION && c.version !== MANY_WRITERS_FORMAT_VERSION) return `config has encryption parameters but version ${String(c.version)}`;
  const e = c.encryption as Record<string, unknown> | null;
  if (typeof e !== 'object' || e === null || e.cipher !== CIPHER_ID) return 'config names a cipher this engine does not know';
  if (typeof e.keyFile !== 'string' || !KEY_FILE_PATTERN.test(e.keyFile)) return 'config names no valid key file';
  if (c.hash !== KEYED_HASH_ID) return 'config names a hash, checksum or compression this engine does not know';
  return undefined;
}

/** Version 3 needs `leases` with 1000 ≤ B and 4B < T (SPEC.md 19.1); the others must not have it. */
function leasesProblem(c: Record<string, unknown>): string | undefined {
  if (c.version !== MANY_WRITERS_FORMAT_VERSION) return c.leases === undefined ? undefined : `config of version ${String(c.version)} names leases`;
  const l = c.leases as Record<string, unknown> | null | undefined;
  if (typeof l !== 'object' || l === null) return 'config of version 3 names no lease timing';
  const { timeMs, skewBoundMs } = l;
  if (!Number.isSafeInteger(timeMs) || !Number.isSafeInteger(skewBoundMs)) return 'config has no valid lease timing';
  if ((skewBoundMs as number) < 1000 || (skewBoundMs as number) * 4 >= (timeMs as number)) return `config's lease timing is unsafe (skew bound ${String(skewBoundMs)} ms, lease ${String(timeMs)} ms: it needs 1000 ≤ B and 4B < T)`;
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
  if (c.checksum !== CHECKSUM_ID) return 'config names a hash, checksum or compression this engine does not know';
  const compression = compressionOfConfig(c);
  if (typeof compression === 'string') return compression;
  if (c.mapPageEntries !== MAP_PAGE_ENTRIES) return 'config names an unsupported map page size';
  const leases = leasesProblem(c);
  if (leases) return leases;
  const objectLock = objectLockProblem(c);
  if (objectLock) return objectLock;
  try {
    validateBlockSize(c.blockSize);
  } catch {
    return `config block size ${c.blockSize} is invalid`;
  }
  return c as unknown as RepositoryConfig;
}
