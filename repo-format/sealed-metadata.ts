/**
 * Metadata files of encrypted repositories (backup records), SPEC.md section 18.4:
 *
 *   "EENC" || version (1 byte, 1) || nonce (12) || AES-256-GCM(plaintext) || tag (16)
 *
 * The authenticated data is the 5-byte header followed by the file's path in the repository
 * (e.g. "backups/<id>"), so a sealed record cannot be passed off under another name.
 */
import { ENCRYPTION_OVERHEAD, SEALED_METADATA_HEADER_SIZE, SEALED_METADATA_MAGIC, SEALED_METADATA_VERSION } from './constants.js';
import { gcmOpen, gcmSealInto, sealedLength } from './crypto.js';

function header(): Buffer {
  return Buffer.concat([SEALED_METADATA_MAGIC, Buffer.from([SEALED_METADATA_VERSION])]);
}

function aad(name: string): Buffer {
  return Buffer.concat([header(), Buffer.from(name, 'utf8')]);
}

export function sealMetadata(dataKey: Uint8Array, plaintext: Uint8Array, name: string): Buffer {
  const target = Buffer.allocUnsafe(SEALED_METADATA_HEADER_SIZE + sealedLength(plaintext.length));
  header().copy(target, 0);
  gcmSealInto(dataKey, plaintext, aad(name), target, SEALED_METADATA_HEADER_SIZE);
  return target;
}

/** The plaintext, or why it cannot be had (the caller names the file). */
export function openMetadata(dataKey: Uint8Array, bytes: Buffer, name: string): Buffer | string {
  if (!bytes.subarray(0, SEALED_METADATA_MAGIC.length).equals(SEALED_METADATA_MAGIC)) return 'not encrypted (no EENC magic), in an encrypted repository';
  if (bytes.length < SEALED_METADATA_HEADER_SIZE + ENCRYPTION_OVERHEAD) return 'too short to be an encrypted file';
  const version = bytes.readUInt8(SEALED_METADATA_MAGIC.length);
  if (version !== SEALED_METADATA_VERSION) return `unknown encrypted file version ${version}`;
  const plaintext = gcmOpen(dataKey, bytes.subarray(SEALED_METADATA_HEADER_SIZE), aad(name));
  return plaintext ?? 'authentication failed (AES-256-GCM tag): the file was altered, or belongs to another name or repository';
}
