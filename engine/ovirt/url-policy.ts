/**
 * Which URLs the oVirt client talks to (SPEC 11.3–11.5, "Security"). The SSO login sends the admin password,
 * every API call carries the bearer token, and the imageio transfer URLs carry the disks themselves; so:
 *
 * - The engine's URL must be https:// (http:// only when the user says so: `insecureHttp`), with a host,
 *   and without credentials in it (they belong in the credentials, not in argv or logs).
 * - Every URL the engine hands back to be followed (an image transfer's transfer_url or proxy_url) keeps
 *   the security the user chose: from an https engine only https is followed, never a downgrade to http;
 *   of transfer_url and proxy_url, the first that keeps it is used.
 * - Redirects are never followed (client.ts refuses a 3xx answer).
 */
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { EngineError } from '../../repo-format/errors.js';
import { withRemedies } from '../errors.js';

/**
 * The engine's URL, checked: https (or http with `insecureHttp`), a host, no user or password in it.
 * `label` names it in messages (the CLI: its option).
 */
export function checkEngineUrl(text: string, insecureHttp: boolean | undefined, label = 'oVirt engine URL'): URL {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new InvalidArgumentError(`${label} ${JSON.stringify(text)} is not a URL: give the engine's address, e.g. https://engine.example.org`);
  }
  const shown = `${url.protocol}//${url.host}`;
  if (url.protocol !== 'https:' && url.protocol !== 'http:') {
    throw new InvalidArgumentError(`${label} ${shown}: ${url.protocol.replace(/:$/, '')}:// is not how the oVirt API is reached; give https://ENGINE`);
  }
  if (!url.hostname) throw new InvalidArgumentError(`${label} ${text}: the URL names no host`);
  if (url.username || url.password) {
    throw new InvalidArgumentError(`${label} ${shown}: the URL carries a user or password`, withRemedies({}, { kind: 'ovirt-credentials' }));
  }
  if (url.protocol === 'http:' && !insecureHttp) {
    throw new InvalidArgumentError(`${label} ${shown}: plain http would send the oVirt password and token in clear text`, withRemedies({}, { kind: 'ovirt-https' }));
  }
  return url;
}

/**
 * The URL to follow among `candidates` (in order of preference) that the engine at `engine` handed back for
 * `what`: the first that keeps the engine's security (https from an https engine). Undefined when there is
 * no candidate at all; an error when every candidate would be a downgrade or is not an http(s) URL.
 */
export function followableUrl(engine: URL, what: string, candidates: (string | undefined)[]): string | undefined {
  const given = candidates.filter((c): c is string => c !== undefined && c !== '');
  if (given.length === 0) return undefined;
  const allowed = engine.protocol === 'https:' ? ['https:'] : ['https:', 'http:'];
  for (const candidate of given) {
    try {
      if (allowed.includes(new URL(candidate).protocol)) return candidate;
    } catch {
      // not a URL: the next candidate, or the refusal below
    }
  }
  throw new EngineError(
    'ENGINE_OVIRT_CONNECT',
    `oVirt ${engine.origin}: ${what} is offered only at ${given.join(', ')}; refusing to follow it from an ${engine.protocol.replace(/:$/, '')} engine (no downgrade: the disk would cross the network in clear text)`,
    { url: engine.origin, offered: given },
  );
}
