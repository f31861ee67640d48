/**
 * Where the passphrase of an encrypted repository comes from (SPEC.md, section 14), first found wins:
 *
 *   a file the caller names    the file's bytes, less one trailing newline (\n or \r\n) (the CLI: --password-file)
 *   $ENGINE_PASSWORD_FILE     the same, for a file named by the environment (systemd: %d/NAME with LoadCredential=)
 *   $ENGINE_PASSWORD          the variable's bytes
 *
 * Never a command-line argument (every user sees argv) and never a prompt (the engine runs unattended).
 * Bytes as given, never decoded (SPEC.md, 18.2). An empty variable counts as unset; an empty file is an error
 * of its own, not a wrong passphrase.
 */
import { readFileSync } from 'node:fs';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { MAX_PASSPHRASE_BYTES } from '../../repo-format/passphrase.js';
import { readSecretFile } from './secret-file.js';

export interface ResolvedPassphrase {
  /** Undefined: none given (a plain repository needs none). */
  passphrase: Buffer | undefined;
  /** Where it came from, for messages: "<fileLabel> F", "$ENGINE_PASSWORD_FILE F", "$ENGINE_PASSWORD". */
  source: string | undefined;
  warnings: string[];
}

/** `fileLabel`: what messages call the caller's `file` (the CLI: its option, --password-file). */
export async function resolvePassphrase(options: { file?: string | undefined; fileLabel?: string; env?: NodeJS.ProcessEnv; timeoutMs?: number } = {}): Promise<ResolvedPassphrase> {
  const env = options.env ?? process.env;
  const fromEnv = env.ENGINE_PASSWORD_FILE || undefined;
  const file = options.file ?? fromEnv;
  if (file !== undefined) {
    const source = options.file !== undefined ? `${options.fileLabel ?? 'passphrase file'} ${file}` : `$ENGINE_PASSWORD_FILE ${file}`;
    const { bytes, warnings } = await readSecretFile(file, source, { maxBytes: MAX_PASSPHRASE_BYTES, timeoutMs: options.timeoutMs });
    const passphrase = withoutTrailingNewline(bytes);
    if (passphrase.length === 0) throw new InvalidArgumentError(`${source} is empty${bytes.length > 0 ? ' (a newline only)' : ''}: it must hold the passphrase`);
    return { passphrase, source, warnings };
  }
  const variable = environmentBytes('ENGINE_PASSWORD', env);
  if (variable === undefined || variable.length === 0) return { passphrase: undefined, source: undefined, warnings: [] };
  if (variable.length > MAX_PASSPHRASE_BYTES) throw new InvalidArgumentError(`$ENGINE_PASSWORD has ${variable.length} bytes: a passphrase has at most ${MAX_PASSPHRASE_BYTES}`);
  return { passphrase: variable, source: '$ENGINE_PASSWORD', warnings: [] };
}

function withoutTrailingNewline(bytes: Buffer): Buffer {
  if (bytes.length >= 2 && bytes[bytes.length - 2] === 0x0d && bytes[bytes.length - 1] === 0x0a) return bytes.subarray(0, bytes.length - 2);
  if (bytes.length >= 1 && bytes[bytes.length - 1] === 0x0a) return bytes.subarray(0, bytes.length - 1);
  return bytes;
}

/**
 * The bytes of an environment variable. Node decodes the environment as UTF-8, replacing invalid bytes,
 * so the value is read from the process's initial environment (/proc/self/environ) when it still holds
 * what the process was started with; otherwise (changed since, or no /proc) the UTF-8 of the value.
 */
export function environmentBytes(name: string, env: NodeJS.ProcessEnv = process.env): Buffer | undefined {
  const value = env[name];
  if (value === undefined) return undefined;
  if (env === process.env) {
    let environ: Buffer | undefined;
    try {
      environ = readFileSync('/proc/self/environ');
    } catch {
      environ = undefined;
    }
    const prefix = Buffer.from(`${name}=`, 'utf8');
    for (let start = 0; environ && start < environ.length; ) {
      const end = environ.indexOf(0, start) === -1 ? environ.length : environ.indexOf(0, start);
      const entry = environ.subarray(start, end);
      if (entry.subarray(0, prefix.length).equals(prefix)) {
        const raw = Buffer.from(entry.subarray(prefix.length));
        if (raw.toString('utf8') === value) return raw;
        break;
      }
      start = end + 1;
    }
  }
  return Buffer.from(value, 'utf8');
}
