/**
 * The key file of an encrypted repository, `keys/<key id>.json` (SPEC.md, section 18.2): the repository's
 * master keys (data key || id key, 64 bytes) sealed with AES-256-GCM under a key derived from the
 * passphrase by scrypt. Only this file depends on the passphrase: changing it would rewrite one small file.
 */
import { randomBytes, scrypt as scryptCallback, type ScryptOptions } from 'node:crypto';
import { CIPHER_ID, ENCRYPTION_OVERHEAD, KDF_ID, KEY_SIZE, SCRYPT_DEFAULTS, SCRYPT_MAX_MEMORY, SCRYPT_MIN_N, SCRYPT_SALT_SIZE } from './constants.js';
import { gcmOpen, gcmSeal, type RepositoryKeys } from './crypto.js';
import { CorruptMetadataError, InvalidArgumentError, WrongPassphraseError } from './errors.js';
import { legacyPassphraseBytes, newPassphraseProblem, passphraseBytes, type Passphrase } from './passphrase.js';

export interface ScryptParameters {
  N: number;
  r: number;
  p: number;
}

export interface KeyFile {
  version: 1;
  id: string;
  created: string;
  kdf: ScryptParameters & { name: typeof KDF_ID; salt: string };
  cipher: typeof CIPHER_ID;
  /** base64 of nonce || AES-256-GCM(data key || id key) || tag. */
  sealed: string;
  /**
   * "bytes": the wrapping key was derived from the passphrase's bytes as given. Absent in key files of
   * engines that decoded the passphrase as UTF-8 first (SPEC.md, 18.2): those may need the old form.
   */
  passphrase?: 'bytes';
}

const MASTER_LENGTH = 2 * KEY_SIZE;

/** Authenticated data of the sealed keys: binds them to their repository and key id. */
function keyFileAad(repositoryId: string, keyId: string): Buffer {
  return Buffer.from(`vm-backup-engine key ${repositoryId} ${keyId}`, 'utf8');
}

/** Why these scrypt parameters are refused, or undefined. Bounds the work a forged key file can ask for. */
export function scryptProblem(params: ScryptParameters): string | undefined {
  const { N, r, p } = params;
  if (!Number.isSafeInteger(N) || !Number.isInteger(Math.log2(N)) || N < SCRYPT_MIN_N) return `scrypt N ${N} must be a power of two of at least ${SCRYPT_MIN_N}`;
  if (!Number.isSafeInteger(r) || r < 1 || r > 32) return `scrypt r ${r} must be 1 to 32`;
  if (!Number.isSafeInteger(p) || p < 1 || p > 16) return `scrypt p ${p} must be 1 to 16`;
  if (128 * N * r > SCRYPT_MAX_MEMORY) return `scrypt N ${N} and r ${r} need more than ${SCRYPT_MAX_MEMORY / 1024 ** 2} MiB`;
  return undefined;
}

export function deriveKey(passphrase: Uint8Array, salt: Buffer, params: ScryptParameters): Promise<Buffer> {
  // Node refuses scrypt above `maxmem` (32 MiB by default): allow what the parameters need, 128·N·r, plus slack.
  const options: ScryptOptions = { N: params.N, r: params.r, p: params.p, maxmem: 128 * params.N * params.r * 2 + 1024 * 1024 };
  return new Promise((resolve, reject) => {
    scryptCallback(passphrase, salt, KEY_SIZE, options, (error, key) => (error ? reject(error) : resolve(key)));
  });
}

/** Refuses a passphrase too weak for a new repository (SPEC.md, 18.2). */
export function checkPassphrase(passphrase: Passphrase): void {
  const problem = newPassphraseProblem(passphrase);
  if (problem) throw new InvalidArgumentError(problem);
}

/** Seals `keys` under `passphrase` into a new key file. */
export async function createKeyFile(keys: RepositoryKeys, passphrase: Passphrase, repositoryId: string, id: string, params: ScryptParameters = SCRYPT_DEFAULTS): Promise<KeyFile> {
  checkPassphrase(passphrase);
  const problem = scryptProblem(params);
  if (problem) throw new InvalidArgumentError(problem);
  const salt = randomBytes(SCRYPT_SALT_SIZE);
  const wrappingKey = await deriveKey(passphraseBytes(passphrase), salt, params);
  const sealed = gcmSeal(wrappingKey, Buffer.concat([keys.dataKey, keys.idKey]), keyFileAad(repositoryId, id));
  return {
    version: 1,
    id,
    created: new Date().toISOString(),
    kdf: { name: KDF_ID, N: params.N, r: params.r, p: params.p, salt: salt.toString('base64') },
    cipher: CIPHER_ID,
    sealed: sealed.toString('base64'),
    passphrase: 'bytes',
  };
}

/** Unwraps the master keys; a wrong passphrase (or an altered key file) fails the GCM tag. */
export async function unlockKeyFile(file: KeyFile, passphrase: Passphrase, repositoryId: string, repositoryPath: string): Promise<RepositoryKeys> {
  const wrappingKey = await deriveKey(passphraseBytes(passphrase), Buffer.from(file.kdf.salt, 'base64'), file.kdf);
  const master = gcmOpen(wrappingKey, Buffer.from(file.sealed, 'base64'), keyFileAad(repositoryId, file.id));
  if (!master) throw new WrongPassphraseError(repositoryPath);
  return { dataKey: master.subarray(0, KEY_SIZE), idKey: master.subarray(KEY_SIZE) };
}

/**
 * Unwraps the master keys under the passphrase's bytes; for a key file of an engine that decoded passphrases
 * as UTF-8 first (no `passphrase` field), once more under that decoding when the bytes are not valid UTF-8,
 * saying so (SPEC.md, 18.2).
 */
export async function unlockKeyFileCompatibly(file: KeyFile, passphrase: Passphrase, repositoryId: string, repositoryPath: string, notice: (message: string) => void): Promise<RepositoryKeys> {
  const given = passphraseBytes(passphrase);
  try {
    return await unlockKeyFile(file, given, repositoryId, repositoryPath);
  } catch (error) {
    const legacy = file.passphrase === undefined ? legacyPassphraseBytes(given) : undefined;
    if (!(error instanceof WrongPassphraseError) || legacy === undefined) throw error;
    const keys = await unlockKeyFile(file, legacy, repositoryId, repositoryPath);
    notice(
      `repository ${repositoryPath} was created with a passphrase that is not valid UTF-8, by an engine that replaced its invalid bytes with U+FFFD before deriving the key: ` +
        'any passphrase that differs from it only in those bytes opens it. Back up into a new repository created with this passphrase, which now counts every byte',
    );
    return keys;
  }
}

export function keyFileName(keyId: string): string {
  return `${keyId}.json`;
}

export function encodeKeyFile(file: KeyFile): Buffer {
  return Buffer.from(`${JSON.stringify(file, null, 2)}\n`, 'utf8');
}

export function decodeKeyFile(bytes: Buffer, where: string): KeyFile {
  const fail = (why: string): never => {
    throw new CorruptMetadataError(where, why);
  };
  let value: unknown;
  try {
    value = JSON.parse(bytes.toString('utf8'));
  } catch {
    return fail('not valid JSON');
  }
  if (typeof value !== 'object' || value === null) return fail('not an object');
  const f = value as Record<string, unknown>;
  if (f.version !== 1) fail(`unknown key file version ${String(f.version)}`);
  if (typeof f.id !== 'string' || !/^[0-9a-f]{16}$/.test(f.id)) fail('no valid key id');
  if (typeof f.created !== 'string') fail('no creation time');
  if (f.cipher !== CIPHER_ID) fail(`unknown cipher ${String(f.cipher)}`);
  const kdf = f.kdf as Record<string, unknown> | null | undefined;
  if (typeof kdf !== 'object' || kdf === null || kdf.name !== KDF_ID) return fail('no scrypt parameters');
  const problem = scryptProblem({ N: kdf.N as number, r: kdf.r as number, p: kdf.p as number });
  if (problem) fail(problem);
  if (typeof kdf.salt !== 'string' || Buffer.from(kdf.salt, 'base64').length !== SCRYPT_SALT_SIZE) fail(`the salt is not ${SCRYPT_SALT_SIZE} bytes of base64`);
  if (typeof f.sealed !== 'string' || Buffer.from(f.sealed, 'base64').length !== MASTER_LENGTH + ENCRYPTION_OVERHEAD) {
    fail(`the sealed keys are not ${MASTER_LENGTH + ENCRYPTION_OVERHEAD} bytes of base64`);
  }
  if (f.passphrase !== undefined && f.passphrase !== 'bytes') fail(`unknown passphrase encoding ${String(f.passphrase)}`);
  return value as KeyFile;
}
