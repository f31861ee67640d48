/**
 * The oVirt client keeps the security the user chose (issue 11, item 7): no plain http unless
 * --insecure-http (the password and the token would cross the network in clear text); from an https engine,
 * no transfer URL that downgrades to http is followed, and no redirect at all; every bad URL, unreadable CA
 * file or TLS failure is one line with a stable code and the right exit code.
 */
import { afterAll, beforeAll, describe, expect, test } from 'vitest';
import { createServer, type Server } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { readdir, readFile } from 'node:fs/promises';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { followableUrl } from '../dist/engine/ovirt/url-policy.js';
import { startOvirtSim, type OvirtSim } from '../dist/test/ovirt-sim/server.js';
import { contractProblems } from './ovirt-contract/contract.js';
import { parseJson, runEngine, sh, tempDir } from './helpers.js';

let dir: string;
let cleanup: () => Promise<void>;
let repo: string;
const env = { ENGINE_OVIRT_USER: 'admin@internal', ENGINE_OVIRT_PASSWORD: 'secret' };

beforeAll(async () => {
  ({ path: dir, cleanup } = await tempDir('engine-ovirt-url-'));
  repo = join(dir, 'repo');
  expect((await runEngine(['init', repo])).code).toBe(0);
});
afterAll(async () => {
  await cleanup();
});

/** Runs `engine ARGS`, expecting one line on stderr; returns the exit code and that line. */
async function oneLine(args: string[], extraEnv: Record<string, string> = {}): Promise<{ code: number; line: string }> {
  const result = await runEngine(args, { env: { ...env, ...extraEnv } });
  expect(result.stderr.endsWith('\n')).toBe(true);
  expect(result.stderr.trimEnd().split('\n')).toHaveLength(1);
  return { code: result.code, line: result.stderr.trimEnd() };
}

describe('the engine URL', () => {
  test('http:// is refused before anything is sent, for every command that takes --ovirt', async () => {
    // A server that records whether anyone talked to it.
    let requests = 0;
    const listener: Server = createServer((_req, res) => {
      requests += 1;
      res.end();
    });
    await new Promise<void>((resolve) => listener.listen(0, '127.0.0.1', resolve));
    const url = `http://127.0.0.1:${(listener.address() as AddressInfo).port}`;
    try {
      const expected = `engine: --ovirt ${url}: plain http would send the oVirt password and token in clear text; use https:// (with --ca-file for the engine's CA), or add --insecure-http if this network is trusted`;
      for (const args of [
        ['backup', '--repo', repo, '--ovirt', url, '--vm', 'vm1'],
        ['backup', '--repo', repo, '--ovirt', url, '--vm', 'vm1', '--appliance', 'app'],
        ['restore', '--repo', repo, 'abc', '--ovirt', url, '--new-vm', 'x', '--via', 'transfer'],
        ['ovirt', 'cleanup', '--repo', repo, '--ovirt', url],
      ]) {
        expect(await oneLine(args)).toEqual({ code: 2, line: expected });
        // Said before the credentials are even needed.
        expect(await oneLine(args, { ENGINE_OVIRT_USER: '', ENGINE_OVIRT_PASSWORD: '' })).toEqual({ code: 2, line: expected });
      }
      expect(requests).toBe(0);
      // With --insecure-http the user has said so: the request goes out (and this server is no oVirt).
      const allowed = await runEngine(['ovirt', 'cleanup', '--repo', repo, '--ovirt', url, '--insecure-http'], { env });
      expect(allowed.code).toBe(1);
      expect(requests).toBeGreaterThan(0);
    } finally {
      listener.close();
    }
  });

  test('not a URL, another scheme, credentials in the URL, an unreadable --ca-file: usage errors (exit 2), one line each', async () => {
    const cases: [string[], string][] = [
      [['--ovirt', 'not a url'], 'engine: --ovirt "not a url" is not a URL: give the engine\'s address, e.g. https://engine.example.org'],
      [['--ovirt', 'ftp://engine.example.org/'], 'engine: --ovirt ftp://engine.example.org: ftp:// is not how the oVirt API is reached; give https://ENGINE'],
      [['--ovirt', 'https://admin%40internal:hunter2@engine.example.org'], 'engine: --ovirt https://engine.example.org: the URL carries a user or password; give them with --ovirt-credentials FILE (or ENGINE_OVIRT_USER and ENGINE_OVIRT_PASSWORD), never in the URL'],
      [['--ovirt', 'https://127.0.0.1:9', '--ca-file', join(dir, 'no-such-ca.pem')], `engine: --ca-file ${join(dir, 'no-such-ca.pem')}: cannot be read (ENOENT)`],
    ];
    for (const [args, line] of cases) {
      expect(await oneLine(['backup', '--repo', repo, '--vm', 'vm1', ...args])).toEqual({ code: 2, line });
    }
    // The password never reaches the output.
    const json = await runEngine(['backup', '--repo', repo, '--vm', 'vm1', '--ovirt', 'https://admin:hunter2@engine.example.org', '--json'], { env });
    expect(json.stdout).not.toContain('hunter2');
  });

  test('a redirect is not followed: one line, exit 1', async () => {
    let followed = 0;
    const elsewhere: Server = createServer((_req, res) => {
      followed += 1;
      res.end();
    });
    await new Promise<void>((resolve) => elsewhere.listen(0, '127.0.0.1', resolve));
    const redirecting: Server = createServer((_req, res) => {
      res.writeHead(302, { Location: `http://127.0.0.1:${(elsewhere.address() as AddressInfo).port}/steal` });
      res.end();
    });
    await new Promise<void>((resolve) => redirecting.listen(0, '127.0.0.1', resolve));
    const url = `http://127.0.0.1:${(redirecting.address() as AddressInfo).port}`;
    try {
      const result = await oneLine(['ovirt', 'cleanup', '--repo', repo, '--ovirt', url, '--insecure-http']);
      expect(result.code).toBe(1);
      expect(result.line).toBe(`engine: oVirt ${url}: POST /ovirt-engine/sso/oauth/token answered HTTP 302, a redirect to http://127.0.0.1:${(elsewhere.address() as AddressInfo).port}/steal, which is not followed: give the engine's own https:// address as --ovirt`);
      expect(followed).toBe(0);
    } finally {
      redirecting.close();
      elsewhere.close();
    }
  });
});

describe('an https engine', () => {
  let sim: OvirtSim;
  let simCert: string;
  let elsewhere: Server;
  let elsewhereUrl: string;

  beforeAll(async () => {
    // The simulator's certificate names 127.0.0.1; another server's names only engine.test.
    simCert = join(dir, 'sim-cert.pem');
    await sh('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', join(dir, 'sim-key.pem'), '-out', simCert, '-days', '1', '-subj', '/CN=engine.test', '-addext', 'subjectAltName=IP:127.0.0.1']);
    // Its imageio answers over plain http: what the engine must never follow from an https engine.
    sim = await startOvirtSim({ dir: join(dir, 'sim'), tls: { key: await readFile(join(dir, 'sim-key.pem'), 'utf8'), cert: await readFile(simCert, 'utf8') }, imageioPlainHttp: true });
    await sim.addVm('vm1', [{ alias: 'vm1_os', size: '16M' }]);
    const otherCert = join(dir, 'other-cert.pem');
    await sh('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', join(dir, 'other-key.pem'), '-out', otherCert, '-days', '1', '-subj', '/CN=engine.test', '-addext', 'subjectAltName=DNS:engine.test']);
    elsewhere = createHttpsServer({ key: await readFile(join(dir, 'other-key.pem')), cert: await readFile(otherCert) }, (_req, res) => res.end());
    await new Promise<void>((resolve) => elsewhere.listen(0, '127.0.0.1', resolve));
    elsewhereUrl = `https://127.0.0.1:${(elsewhere.address() as AddressInfo).port}`;
  });
  afterAll(async () => {
    elsewhere.close();
    await sim.stop();
    // Every request the engine sent the simulator (SSO, the backup, the transfer it then closed) is one
    // oVirt's API model knows: element names, enum values, paths, methods and parameters.
    expect(sim.requests.some((r) => r.path.includes('/imagetransfers'))).toBe(true);
    expect(contractProblems(sim.requests)).toEqual([]);
  });

  test('TLS failures are one line with the reason and ENGINE_OVIRT_CONNECT (exit 1): an unknown CA says where to get the right one', async () => {
    const untrusted = await oneLine(['backup', '--repo', repo, '--ovirt', elsewhereUrl, '--vm', 'vm1']);
    expect(untrusted).toEqual({
      code: 1,
      line: `engine: oVirt ${elsewhereUrl}: cannot connect: the peer certificate is self-signed and not the trusted CA (self-signed certificate, DEPTH_ZERO_SELF_SIGNED_CERT); give --ca-file with the engine's CA (https://ENGINE/ovirt-engine/services/pki-resource?resource=ca-certificate&format=X509-PEM-CA)`,
    });
    // Trusted, but the certificate names engine.test, not 127.0.0.1.
    const wrongName = await oneLine(['backup', '--repo', repo, '--ovirt', elsewhereUrl, '--vm', 'vm1', '--ca-file', join(dir, 'other-cert.pem')]);
    expect(wrongName).toEqual({
      code: 1,
      line: `engine: oVirt ${elsewhereUrl}: cannot connect: the peer certificate is for another host name (Hostname/IP does not match certificate's altnames: IP: 127.0.0.1 is not in the cert's list, ERR_TLS_CERT_ALTNAME_INVALID)`,
    });
    const json = await runEngine(['backup', '--repo', repo, '--ovirt', elsewhereUrl, '--vm', 'vm1', '--json'], { env });
    expect(parseJson<{ error: { code: string } }>(json.stdout).error.code).toBe('ENGINE_OVIRT_CONNECT');
  });

  test('its image transfer offered only over http:// is not followed: the backup fails in one line, nothing read, the transfer closed', async () => {
    const result = await oneLine(['backup', '--repo', repo, '--ovirt', sim.url, '--ca-file', simCert, '--vm', 'vm1']);
    expect(result.code).toBe(1);
    expect(result.line).toMatch(new RegExp(`^engine: oVirt ${sim.url.replace(/[.]/g, '\\.')}: image transfer [-0-9a-f]+ is offered only at ${sim.imageioUrl.replace(/[.]/g, '\\.')}/images/\\S+, http://127\\.0\\.0\\.1:\\d+/images/\\S+; refusing to follow it from an https engine \\(no downgrade: the disk would cross the network in clear text\\)$`));
    expect([...sim.transfers.values()].map((t) => t.phase).filter((phase) => !/^(finished|cancelled)/.test(phase))).toEqual([]);
    expect((await readdir(join(repo, 'backups')).catch(() => [])).length).toBe(0);
  });

  test('the choice among transfer_url and proxy_url keeps https, never downgrades', () => {
    const engine = new URL('https://engine.example.org');
    // transfer_url first, proxy_url next: the first that keeps https.
    expect(followableUrl(engine, 't', ['https://host1:54322/images/x', 'https://engine.example.org:54323/images/x'])).toBe('https://host1:54322/images/x');
    expect(followableUrl(engine, 't', ['http://host1:54322/images/x', 'https://engine.example.org:54323/images/x'])).toBe('https://engine.example.org:54323/images/x');
    expect(followableUrl(engine, 't', [undefined, undefined])).toBe(undefined);
    expect(() => followableUrl(engine, 'image transfer 7', ['http://host1:54322/images/x', 'http://engine.example.org:54323/images/x'])).toThrow(
      'oVirt https://engine.example.org: image transfer 7 is offered only at http://host1:54322/images/x, http://engine.example.org:54323/images/x; refusing to follow it from an https engine (no downgrade: the disk would cross the network in clear text)',
    );
    expect(() => followableUrl(engine, 't', ['ftp://host1/x'])).toThrow(/refusing to follow/);
    // An http engine the user allowed may be sent to https or http.
    expect(followableUrl(new URL('http://engine.example.org'), 't', ['http://host1/x'])).toBe('http://host1/x');
  });
});
