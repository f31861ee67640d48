/**
 * The oVirt REST client: API root `/ovirt-engine/api`, header `Version: 4`, an SSO token
 * (`grant_type=password`, `scope=ovirt-app-api`) renewed once on a 401, TLS with a CA file, XML bodies, a
 * `Correlation-Id` on every request (so engine.log lines can be tied to this run), fault XML turned into
 * OvirtFaultError with reason and detail, 409 retried with backoff, and a bounded poll for every
 * transitional state. See ../shared/reference/ovirt-rest-api.md, section 4.
 */
import { request as httpRequest } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { readFile } from 'node:fs/promises';
import { BodyTooLargeError, collectBody, HTTP_BODY_LIMIT } from '../host/http-body.js';
import { randomBytes } from 'node:crypto';
import { OvirtAuthError, OvirtFaultError, TimeoutError, withRemedies, type Remedy } from '../errors.js';
import { EngineError, InvalidArgumentError } from '../../repo-format/errors.js';
import { displayText } from '../../repo-format/display-text.js';
import { describeTlsError } from '../host/tls-errors.js';
import { checkEngineUrl, followableUrl } from './url-policy.js';
import { buildXml, decodeXml, text, child, type XmlElement, type XmlInput } from './xml.js';

export interface OvirtCredentials {
  username: string;
  password: string;
}

export interface OvirtClientOptions {
  /** e.g. https://engine.example.org (the /ovirt-engine/api path is added). */
  url: string;
  credentials: OvirtCredentials;
  /** PEM file of the engine's CA. */
  caFile?: string | undefined;
  /** Allow an http:// engine URL: the password and token then cross the network in clear text (url-policy.ts). */
  insecureHttp?: boolean | undefined;
  /** Retries of a 409 Conflict before giving up, and the first delay (doubling). */
  conflictRetries?: number;
  conflictDelayMs?: number;
  requestTimeoutMs?: number;
}

interface HttpResponse {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: string;
}

export interface OvirtResponse {
  status: number;
  /** The parsed XML body, if any. */
  xml: XmlElement | undefined;
}

export class OvirtClient {
  private token: string | undefined;
  private ca: Buffer | undefined;
  private counter = 0;
  /** Prefix of this run's Correlation-Id values. */
  readonly correlation = `engine-${randomBytes(4).toString('hex')}`;
  private readonly base: URL;

  constructor(private readonly options: OvirtClientOptions) {
    this.base = checkEngineUrl(options.url, options.insecureHttp);
  }

  /**
   * Of the URLs the engine handed back for `what` (preferred first), the one to follow: never a downgrade
   * from the engine's own https (url-policy.ts). Undefined when the engine gave none.
   */
  followable(what: string, candidates: (string | undefined)[]): string | undefined {
    return followableUrl(this.base, what, candidates);
  }

  /** The engine's CA, read once; a file that cannot be read is a usage error naming it. */
  private async caCertificate(): Promise<Buffer | undefined> {
    if (!this.options.caFile || this.ca) return this.ca;
    this.ca = await readCaFile(this.options.caFile);
    return this.ca;
  }

  /** 409 handling, from the options or the environment (ENGINE_OVIRT_CONFLICT_RETRIES, ENGINE_OVIRT_CONFLICT_DELAY_MS). */
  private get conflictPolicy(): { retries: number; delayMs: number } {
    const env = (name: string): number | undefined => {
      const value = process.env[name];
      return value !== undefined && /^\d+$/.test(value) ? Number(value) : undefined;
    };
    return {
      retries: this.options.conflictRetries ?? env('ENGINE_OVIRT_CONFLICT_RETRIES') ?? 5,
      delayMs: this.options.conflictDelayMs ?? env('ENGINE_OVIRT_CONFLICT_DELAY_MS') ?? 1000,
    };
  }

  private async send(method: string, path: string, headers: Record<string, string>, body?: string): Promise<HttpResponse> {
    await this.caCertificate();
    const url = new URL(path, this.base);
    const requester = url.protocol === 'https:' ? httpsRequest : httpRequest;
    const timeout = this.options.requestTimeoutMs ?? 120_000;
    return new Promise((resolve, reject) => {
      const req = requester(url, { method, headers: { ...headers, ...(body !== undefined ? { 'Content-Length': String(Buffer.byteLength(body)) } : {}) }, ca: this.ca, timeout }, (res) => {
        const status = res.statusCode ?? 0;
        // A redirect is never followed: it could lead anywhere, http included, with the password or token.
        if (status >= 300 && status < 400) {
          res.resume();
          reject(new EngineError('ENGINE_OVIRT_CONNECT', `oVirt ${this.base.origin}: ${method} ${url.pathname} answered HTTP ${status}, a redirect to ${String(res.headers.location ?? 'nowhere')}, which is not followed`, withRemedies({ url: this.base.origin, status }, { kind: 'ovirt-address' })));
          return;
        }
        collectBody(res, HTTP_BODY_LIMIT, (bytes) => resolve({ status, headers: res.headers, body: bytes.toString('utf8') }), (error) =>
          reject(error instanceof BodyTooLargeError ? new EngineError('ENGINE_OVIRT_FAULT', `oVirt ${method} ${url.pathname}: ${error.message}`, { status }) : error),
        );
      });
      req.on('timeout', () => req.destroy(new TimeoutError(`oVirt ${method} ${url.pathname}`, timeout)));
      req.on('error', (error: NodeJS.ErrnoException) => {
        if (error instanceof EngineError) return reject(error);
        const failure = connectFailure(error);
        reject(new EngineError('ENGINE_OVIRT_CONNECT', `oVirt ${this.base.origin}: cannot connect: ${failure.why}`, withRemedies({ url: this.base.origin, code: error.code }, ...failure.remedies)));
      });
      if (body !== undefined) req.write(body);
      req.end();
    });
  }

  /** Logs in through SSO and keeps the token. */
  async login(): Promise<void> {
    const form = new URLSearchParams({
      grant_type: 'password',
      scope: 'ovirt-app-api',
      username: this.options.credentials.username,
      password: this.options.credentials.password,
    }).toString();
    const response = await this.send('POST', '/ovirt-engine/sso/oauth/token', { 'Content-Type': 'application/x-www-form-urlencoded', Accept: 'application/json' }, form);
    const parsed = ssoAnswer(response.body);
    if (!parsed) throw new OvirtAuthError(this.options.url, `HTTP ${response.status}, not a JSON token response`);
    if (response.status !== 200 || parsed.access_token === undefined) {
      throw new OvirtAuthError(this.options.url, parsed.error_description ?? parsed.error ?? `HTTP ${response.status}`);
    }
    this.token = parsed.access_token;
  }

  /**
   * Revokes the SSO token (`POST /ovirt-engine/services/sso-logout` with scope and token, as the SDK's
   * Connection.close does), so that it does not stay valid until it expires. Does nothing when not logged in.
   */
  async logout(): Promise<void> {
    const token = this.token;
    if (!token) return;
    this.token = undefined;
    const form = new URLSearchParams({ scope: 'ovirt-app-api', token }).toString();
    const response = await this.send('POST', '/ovirt-engine/services/sso-logout', { 'Content-Type': 'application/x-www-form-urlencoded', Accept: 'application/json' }, form);
    // An answer that is not JSON says nothing about the revocation: only the status counts then.
    const parsed = ssoAnswer(response.body) ?? {};
    if (response.status !== 200 || parsed.error !== undefined) throw new OvirtAuthError(this.options.url, `logout refused: ${parsed.error_description ?? parsed.error ?? `HTTP ${response.status}`}`);
  }

  /**
   * One API call. `path` is relative to /ovirt-engine/api (e.g. "vms/123/snapshots"). Renews the token once
   * on 401; retries 409 with backoff; any other error status becomes OvirtFaultError.
   */
  async call(method: string, path: string, options: { body?: string; headers?: Record<string, string>; query?: Record<string, string> } = {}): Promise<OvirtResponse> {
    if (!this.token) await this.login();
    const query = options.query ? `?${new URLSearchParams(options.query).toString()}` : '';
    const fullPath = `/ovirt-engine/api/${path.replace(/^\//, '')}${query}`;
    const what = `${method} ${fullPath}`;
    let relogged = false;
    const policy = this.conflictPolicy;
    let delay = policy.delayMs;
    for (let conflicts = 0; ; ) {
      this.counter += 1;
      const headers: Record<string, string> = {
        Authorization: `Bearer ${this.token}`,
        Version: '4',
        Accept: 'application/xml',
        'Correlation-Id': `${this.correlation}-${this.counter}`,
        ...(options.body !== undefined ? { 'Content-Type': 'application/xml' } : {}),
        ...options.headers,
      };
      const response = await this.send(method, fullPath, headers, options.body);
      if (response.status === 401 && !relogged) {
        relogged = true;
        await this.login();
        continue;
      }
      if (response.status === 409 && conflicts < policy.retries) {
        conflicts += 1;
        await new Promise((resolve) => setTimeout(resolve, delay));
        delay *= 2;
        continue;
      }
      const xml = response.body.trim().startsWith('<') ? decodeXml(response.body) : undefined;
      if (response.status >= 400) {
        // An error status is the error, whatever its body: a fault if one can be read, else the status.
        const fault = typeof xml === 'string' ? undefined : child(xml, 'fault');
        throw new OvirtFaultError(what, response.status, said(text(fault, 'reason')) ?? httpReason(response.status), said(text(fault, 'detail')) ?? '');
      }
      if (typeof xml === 'string') throw new OvirtFaultError(what, response.status, `the answer is ${xml}`, '');
      return { status: response.status, xml };
    }
  }

  get(path: string, query?: Record<string, string>, headers?: Record<string, string>): Promise<OvirtResponse> {
    return this.call('GET', path, { ...(query ? { query } : {}), ...(headers ? { headers } : {}) });
  }

  /** GET `path`, decoded by one of answers.ts's decoders (told the request, to name it if the answer lacks something). */
  async read<T>(path: string, decode: (xml: XmlElement | undefined, what: string) => T, query?: Record<string, string>, headers?: Record<string, string>): Promise<T> {
    return decode((await this.get(path, query, headers)).xml, `GET ${path}`);
  }

  post(path: string, root: string, value: XmlInput, query?: Record<string, string>): Promise<OvirtResponse> {
    return this.call('POST', path, { body: buildXml(root, value), ...(query ? { query } : {}) });
  }

  put(path: string, root: string, value: XmlInput): Promise<OvirtResponse> {
    return this.call('PUT', path, { body: buildXml(root, value) });
  }

  delete(path: string, query?: Record<string, string>): Promise<OvirtResponse> {
    return this.call('DELETE', path, query ? { query } : {});
  }

  /**
   * Polls `probe` until it returns a value (not undefined), at `intervalMs`, for at most `timeoutMs`:
   * every transitional state (locked snapshots, backup phases, transfer phases) is waited for this way.
   */
  async waitFor<T>(what: string, probe: () => Promise<T | undefined>, options: { timeoutMs?: number; intervalMs?: number } = {}): Promise<T> {
    const timeoutMs = options.timeoutMs ?? 600_000;
    const deadline = Date.now() + timeoutMs;
    // Quick first polls (most transitions take well under a second), then every `intervalMs`.
    let delay = Math.min(100, options.intervalMs ?? 1000);
    for (;;) {
      const value = await probe();
      if (value !== undefined) return value;
      if (Date.now() >= deadline) throw new TimeoutError(what, timeoutMs);
      await new Promise((resolve) => setTimeout(resolve, Math.min(delay, Math.max(0, deadline - Date.now()))));
      delay = Math.min(delay * 2, options.intervalMs ?? 1000);
    }
  }
}

/** TLS and network failures in one line; an untrusted certificate calls for the engine's CA. */
function connectFailure(error: NodeJS.ErrnoException): { why: string; remedies: Remedy[] } {
  const untrusted = ['DEPTH_ZERO_SELF_SIGNED_CERT', 'SELF_SIGNED_CERT_IN_CHAIN', 'UNABLE_TO_VERIFY_LEAF_SIGNATURE', 'UNABLE_TO_GET_ISSUER_CERT_LOCALLY', 'UNABLE_TO_GET_ISSUER_CERT'];
  return { why: describeTlsError(error), remedies: error.code !== undefined && untrusted.includes(error.code) ? [{ kind: 'ovirt-ca' }] : [] };
}

/**
 * The fields of an SSO answer (token or logout) that are strings, the error texts escaped for messages;
 * undefined when it is no JSON object.
 */
function ssoAnswer(body: string): { access_token?: string; error?: string; error_description?: string } | undefined {
  let parsed: unknown;
  try {
    parsed = JSON.parse(body) as unknown;
  } catch {
    return undefined;
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) return undefined;
  const field = (name: string): string | undefined => {
    const value = (parsed as Record<string, unknown>)[name];
    return typeof value === 'string' && value !== '' ? value : undefined;
  };
  const said = (name: string): string | undefined => {
    const value = field(name);
    return value === undefined ? undefined : displayText(value, 256);
  };
  return { access_token: field('access_token'), error: said('error'), error_description: said('error_description') };
}

/** The engine's own text in a fault, escaped for a message (it is the server's, not ours). */
function said(value: string | undefined): string | undefined {
  return value === undefined ? undefined : displayText(value, 1024);
}

function httpReason(status: number): string {
  return { 400: 'Bad Request', 401: 'Unauthorized', 403: 'Forbidden', 404: 'Not Found', 409: 'Conflict', 500: 'Internal Server Error' }[status] ?? 'error';
}

/**
 * The engine's CA file (PEM), for the API and imageio alike; one that cannot be read is a usage error naming
 * it as `label` (the CLI checks its option with its own name before anything runs).
 */
export async function readCaFile(file: string, label = "the oVirt engine's CA file"): Promise<Buffer> {
  return readFile(file).catch((error: NodeJS.ErrnoException) => {
    throw new InvalidArgumentError(`${label} ${file}: cannot be read (${error.code ?? error.message})`, { path: file });
  });
}
