/**
 * The cryptographic primitives of encrypted repositories, all from node:crypto (OpenSSL):
 *
 *   sealed = nonce (12 random bytes) || AES-256-GCM ciphertext || tag (16 bytes)
 *
 * and keyed blob ids, HMAC-SHA256 under the id key. A random nonce per seal: 2^32 seals under one key keep
 * the chance of a repeated nonce below 2^-32 (NIST SP 800-38D, 8.3); a repository of 1 MiB chunks reaches
 * that after 4 PiB of unique data.
 */
import { createCipheriv, createDecipheriv, createHmac, randomBytes } from 'node:crypto';
import { ENCRYPTION_OVERHEAD, GCM_NONCE_SIZE, GCM_TAG_SIZE, KEY_SIZE } from './constants.js';

/** The master key material of an encrypted repository, as unwrapped from its key file. */
export interface RepositoryKeys {
  /** AES-256-GCM key of frames and backup records. */
  dataKey: Buffer;
  /** HMAC-SHA256 key of blob ids. */
  idKey: Buffer;
}

export function newRepositoryKeys(): RepositoryKeys {
  return { dataKey: randomBytes(KEY_SIZE), idKey: randomBytes(KEY_SIZE) };
}

export function keyedId(idKey: Uint8Array, data: Uint8Array): Buffer {
  return createHmac('sha256', idKey).update(data).digest();
}

export function sealedLength(plaintextLength: number): number {
  return plaintextLength + ENCRYPTION_OVERHEAD;
}

/** Encrypts `plaintext` into `target` at `at` (sealedLength(plaintext.length) bytes); returns that length. */
export function gcmSealInto(key: Uint8Array, plaintext: Uint8Array, aad: Uint8Array, target: Buffer, at = 0): number {
  const nonce = randomBytes(GCM_NONCE_SIZE);
  nonce.copy(target, at);
  const cipher = createCipheriv('aes-256-gcm', key, nonce, { authTagLength: GCM_TAG_SIZE });
  cipher.setAAD(aad);
  let end = at + GCM_NONCE_SIZE;
  end += cipher.update(plaintext).copy(target, end);
  end += cipher.final().copy(target, end);
  end += cipher.getAuthTag().copy(target, end);
  return end - at;
}

export function gcmSeal(key: Uint8Array, plaintext: Uint8Array, aad: Uint8Array): Buffer {
  const target = Buffer.allocUnsafe(sealedLength(plaintext.length));
  gcmSealInto(key, plaintext, aad, target);
  return target;
}

/** Decrypts and authenticates; undefined when the tag does not match (wrong key, or altered bytes or AAD). */
export function gcmOpen(key: Uint8Array, sealed: Uint8Array, aad: Uint8Array): Buffer | undefined {
  if (sealed.length < ENCRYPTION_OVERHEAD) return undefined;
  const nonce = sealed.subarray(0, GCM_NONCE_SIZE);
  const tag = sealed.subarray(sealed.length - GCM_TAG_SIZE);
  const decipher = createDecipheriv('aes-256-gcm', key, nonce, { authTagLength: GCM_TAG_SIZE });
  decipher.setAAD(aad);
  decipher.setAuthTag(tag);
  const body = decipher.update(sealed.subarray(GCM_NONCE_SIZE, sealed.length - GCM_TAG_SIZE));
  try {
    const rest = decipher.final();
    return rest.length === 0 ? body : Buffer.concat([body, rest]);
  } catch {
    return undefined;
  }
}
