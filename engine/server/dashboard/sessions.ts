/**
 * Browser sessions of the dashboard (SPEC.md 23, "The dashboard"). A browser cannot send a bearer header when
 * it navigates, so the login form takes a token once and the server answers with a cookie naming a session
 * kept here, in memory:
 *
 * - the cookie holds 256 random bits, nothing else; HttpOnly (no script reads it), SameSite=Strict (no other
 *   site's page makes the browser send it), Path=/, and under TLS Secure with the `__Host-` prefix (no
 *   subdomain or plain-HTTP page can set or overwrite it);
 * - the session keeps the token's SHA-256, never the token, and asks the tokens file for its role at every
 *   request: a token removed from the file ends its sessions at once;
 * - every state-changing request made with the cookie carries the session's CSRF token (a form field, or the
 *   `X-CSRF-Token` header for the page's script), compared in constant time; and any state-changing request
 *   without a bearer header whose Origin is not this server's is refused, so that no other site's page can
 *   make a browser start a job, with or without a session;
 * - a session ends at logout, after 12 hours without a request, after 7 days in all, or with the process.
 *
 * Without a tokens file (a Unix socket or loopback, where every local user may start jobs) the dashboard needs
 * no login: the first visit gets a session of the `local` operator, for its CSRF token.
 */
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import type { IncomingMessage } from 'node:http';
import type { Principal, TokenStore } from '../auth.js';
import { ForbiddenError } from '../errors.js';

const IDLE_MS = 12 * 3600_000;
const LIFETIME_MS = 7 * 24 * 3600_000;
/** Enough for every tab of every operator; the oldest goes first when full. */
const MAX_SESSIONS = 10_000;

export interface Session {
  /** SHA-256 of the token the session was opened with (`local` without a tokens file). */
  tokenHash: string;
  csrf: string;
  created: number;
  lastSeen: number;
}

export class Sessions {
  /** By the SHA-256 of the cookie's value: a memory dump shows no live cookie. */
  private readonly sessions = new Map<string, Session>();

  constructor(
    private readonly tokens: TokenStore,
    /** Under TLS: Secure, and the `__Host-` prefix. */
    private readonly secure: boolean,
    private readonly now: () => number = Date.now,
  ) {}

  get cookieName(): string {
    return this.secure ? '__Host-engine_session' : 'engine_session';
  }

  /** A new session; the Set-Cookie header that hands it to the browser. */
  open(tokenHash: string): { session: Session; setCookie: string } {
    const id = randomBytes(32).toString('base64url');
    const now = this.now();
    const session: Session = { tokenHash, csrf: randomBytes(32).toString('base64url'), created: now, lastSeen: now };
    if (this.sessions.size >= MAX_SESSIONS) this.sessions.delete(this.sessions.keys().next().value!);
    this.sessions.set(digest(id), session);
    return { session, setCookie: this.cookie(id, Math.floor(LIFETIME_MS / 1000)) };
  }

  /** Ends the request's session; the Set-Cookie header that removes the cookie. */
  close(req: IncomingMessage): string {
    const id = this.cookieOf(req);
    if (id !== undefined) this.sessions.delete(digest(id));
    return this.cookie('', 0);
  }

  private cookie(value: string, maxAge: number): string {
    return `${this.cookieName}=${value}; Path=/; HttpOnly; SameSite=Strict; Max-Age=${maxAge}${this.secure ? '; Secure' : ''}`;
  }

  private cookieOf(req: IncomingMessage): string | undefined {
    for (const part of (req.headers.cookie ?? '').split(';')) {
      const at = part.indexOf('=');
      if (at > 0 && part.slice(0, at).trim() === this.cookieName) return part.slice(at + 1).trim();
    }
    return undefined;
  }

  /** The request's live session and who it is now (the tokens file asked again), or undefined. */
  async current(req: IncomingMessage): Promise<{ session: Session; principal: Principal } | undefined> {
    const id = this.cookieOf(req);
    if (id === undefined || !/^[A-Za-z0-9_-]{43}$/.test(id)) return undefined;
    const key = digest(id);
    const session = this.sessions.get(key);
    const now = this.now();
    if (!session) return undefined;
    if (now - session.lastSeen > IDLE_MS || now - session.created > LIFETIME_MS) {
      this.sessions.delete(key);
      return undefined;
    }
    const principal = await this.tokens.byHash(session.tokenHash);
    if (!principal) {
      this.sessions.delete(key);
      return undefined;
    }
    session.lastSeen = now;
    return { session, principal };
  }
}

function digest(id: string): string {
  return createHash('sha256').update(id).digest('hex');
}

/** Whether `given` is the session's CSRF token (constant time: the comparison tells nothing of the token). */
export function csrfMatches(session: Session, given: string | undefined): boolean {
  if (given === undefined) return false;
  const a = Buffer.from(session.csrf);
  const b = Buffer.from(given);
  return a.length === b.length && timingSafeEqual(a, b);
}

/** GET and HEAD change nothing; everything else does. */
export function changesState(method: string | undefined): boolean {
  return method !== 'GET' && method !== 'HEAD';
}

/**
 * Refuses a state-changing request a page of another origin made: browsers send Origin with every POST and
 * DELETE (and `null` from sandboxed or privacy-sensitive contexts); a request without it came from a program,
 * which a bearer token or the absence of a cookie already accounts for.
 */
export function checkOrigin(req: IncomingMessage, tls: boolean): void {
  const origin = req.headers.origin;
  if (origin === undefined) return;
  const own = `${tls ? 'https' : 'http'}://${req.headers.host ?? ''}`;
  if (origin !== own) throw new ForbiddenError(`a request from the page of another origin (${origin.slice(0, 100)}) may not change anything here`, { origin: origin.slice(0, 100) });
}
