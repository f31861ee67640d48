/**
 * Passphrases of encrypted repositories are bytes (SPEC.md, section 18.2): a file's content or an
 * environment variable's value exactly as given, never decoded (decoding would replace every invalid
 * UTF-8 sequence by U+FFFD, and passphrases that differ only there would open the same repository).
 * A string from a library caller stands for its UTF-8 encoding.
 */
export type Passphrase = string | Uint8Array;

/** `init --encrypt` refuses shorter passphrases (NIST SP 800-63B's minimum for chosen secrets). */
export const MIN_PASSPHRASE_CHARACTERS = 8;
/** The longest passphrase: what a passphrase file may hold. */
export const MAX_PASSPHRASE_BYTES = 4096;

export function passphraseBytes(passphrase: Passphrase): Buffer {
  return typeof passphrase === 'string' ? Buffer.from(passphrase, 'utf8') : Buffer.from(passphrase.buffer, passphrase.byteOffset, passphrase.byteLength);
}

/**
 * Characters as a person counts them: the Unicode code points of the UTF-8 decoding, where each invalid
 * sequence counts as one (WHATWG decoding, the replacement character standing for it).
 */
export function passphraseCharacters(bytes: Uint8Array): number {
  let count = 0;
  for (const _ of new TextDecoder('utf-8', { fatal: false, ignoreBOM: true }).decode(bytes)) count += 1;
  return count;
}

/** Why `init` refuses this passphrase for a new repository, or undefined. Existing repositories open whatever their passphrase. */
export function newPassphraseProblem(passphrase: Passphrase): string | undefined {
  const bytes = passphraseBytes(passphrase);
  if (bytes.length === 0) return 'the passphrase is empty: an encrypted repository needs one';
  const characters = passphraseCharacters(bytes);
  if (characters < MIN_PASSPHRASE_CHARACTERS) {
    return `the passphrase has ${characters} character${characters === 1 ? '' : 's'}: an encrypted repository needs at least ${MIN_PASSPHRASE_CHARACTERS} (a long passphrase is what stops offline guessing)`;
  }
  if (bytes.length > MAX_PASSPHRASE_BYTES) return `the passphrase has ${bytes.length} bytes: at most ${MAX_PASSPHRASE_BYTES}`;
  return undefined;
}

/**
 * What engines before passphrases were bytes derived the key from: the bytes decoded as UTF-8 (each
 * invalid sequence replaced by U+FFFD) and encoded again. Undefined when that is the same (valid UTF-8).
 */
export function legacyPassphraseBytes(bytes: Buffer): Buffer | undefined {
  const legacy = Buffer.from(bytes.toString('utf8'), 'utf8');
  return legacy.equals(bytes) ? undefined : legacy;
}
