/**
 * Bearer tokens (SPEC.md "The service API", "Authentication"). A token is 256 random bits, shown once when it
 * is made (`engine server token add`); the tokens file keeps only its SHA-256, one line per token:
 *
 *   <64 hex: SHA-256 of the token> <role: read | operator> <label>
 *
 * Why SHA-256 and not scrypt: scrypt (or any slow hash) protects guessable secrets, passwords, from a stolen
 * file by making each guess cost. A 256-bit random token cannot be guessed at any cost per try, so a slow hash
 * adds nothing but a few milliseconds of CPU to every request; a fast hash is enough to make the file useless
 * to whoever reads it (a preimage of SHA-256 is out of reach). Lookup is by the hash, so no comparison of
 * secrets runs in time that depends on them.
 *
 * The file is read again when its mtime or size changes: a token added or removed takes effect at the next
 * request, without a restart.
 */
import { createHash, randomBytes } from 'node:crypto';
import { appendFile, open, readFile, stat } from 'node:fs/promises';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { ForbiddenError, UnauthorizedError } from './errors.js';

export type Role = 'read' | 'operator';
export const ROLES: readonly Role[] = ['read', 'operator'];

export interface Principal {
  role: Role;
  label: string;
}

const TOKEN_PREFIX = 'engine_';
const LINE = /^([0-9a-f]{64})\s+(read|operator)(?:\s+(.*))?$/;
const LABEL = /^[\x21-\x7e][\x20-\x7e]{0,63}$/;

export function tokenHash(token: string): string {
  return createHash('sha256').update(token, 'utf8').digest('hex');
}

export function parseTokens(file: string, text: string): Map<string, Principal> {
  const tokens = new Map<string, Principal>();
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) return;
    const match = LINE.exec(line);
    if (!match) throw new InvalidArgumentError(`tokens file ${file}, line ${i + 1}: not "<sha256 hex> <read|operator> <label>"`, { path: file, line: i + 1 });
    tokens.set(match[1]!, { role: match[2] as Role, label: match[3] ?? '' });
  });
  return tokens;
}

/** The tokens of a file, re-read when it changes; without a file, nobody needs a token (socket or loopback only: listen.ts). */
export class TokenStore {
  private tokens = new Map<string, Principal>();
  private seen = '';

  private constructor(readonly file: string | undefined) {}

  static async open(file: string | undefined): Promise<TokenStore> {
    const store = new TokenStore(file);
    await store.refresh();
    return store;
  }

  get required(): boolean {
    return this.file !== undefined;
  }

  get size(): number {
    return this.tokens.size;
  }

  private async refresh(): Promise<void> {
    if (this.file === undefined) return;
    const stats = await stat(this.file).catch((error: NodeJS.ErrnoException) => {
      throw new InvalidArgumentError(`tokens file ${this.file}: ${error.code ?? error.message}`, { path: this.file });
    });
    const key = `${stats.mtimeMs}:${stats.size}:${stats.ino}`;
    if (key === this.seen) return;
    this.tokens = parseTokens(this.file, await readFile(this.file, 'utf8'));
    this.seen = key;
  }

  /**
   * The principal of a token given by its hash (a dashboard session keeps the hash, never the token), as the
   * file says now: undefined once the token is removed from it, so that removing a token ends its sessions.
   */
  async byHash(hash: string): Promise<Principal | undefined> {
    if (!this.required) return { role: 'operator', label: 'local' };
    await this.refresh();
    return this.tokens.get(hash);
  }

  /** Who sends this Authorization header; 401 without a token or with one the file does not hold. */
  async authenticate(header: string | undefined): Promise<Principal> {
    if (!this.required) return { role: 'operator', label: 'local' };
    const match = /^Bearer\s+(\S+)\s*$/i.exec(header ?? '');
    if (!match) throw new UnauthorizedError('this server needs a bearer token: send "Authorization: Bearer <token>"');
    await this.refresh();
    const principal = this.tokens.get(tokenHash(match[1]!));
    if (!principal) throw new UnauthorizedError('the bearer token is not known to this server');
    return principal;
  }
}

/** An operator may do what a reader may, and start and cancel jobs. */
export function requireRole(principal: Principal, role: Role, action: string): void {
  if (role === 'operator' && principal.role !== 'operator') throw new ForbiddenError(`${action} needs a token of role operator; this one is ${principal.role}`, { role: principal.role, needs: role });
}

/**
 * A new token for `role`, its hash appended to `file` (created 0600 when missing): the token itself is
 * returned to be shown once, and is stored nowhere.
 */
export async function addToken(file: string, role: Role, label: string): Promise<{ token: string; hash: string }> {
  if (!ROLES.includes(role)) throw new InvalidArgumentError(`role ${JSON.stringify(role)}: give read or operator`);
  if (!LABEL.test(label)) throw new InvalidArgumentError('a token label is 1 to 64 printable ASCII characters, not starting with a space');
  const existing = await readFile(file, 'utf8').catch((error: NodeJS.ErrnoException) => {
    if (error.code === 'ENOENT') return '';
    throw new InvalidArgumentError(`tokens file ${file}: ${error.code ?? error.message}`, { path: file });
  });
  parseTokens(file, existing); // never append to a file this server would refuse
  const token = `${TOKEN_PREFIX}${randomBytes(32).toString('base64url')}`;
  const hash = tokenHash(token);
  const handle = await open(file, 'a', 0o600);
  await handle.close();
  await appendFile(file, `${existing === '' || existing.endsWith('\n') ? '' : '\n'}${hash} ${role} ${label}\n`, { mode: 0o600 });
  return { token, hash };
}
