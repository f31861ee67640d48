/**
 * TLS material made at test time with openssl (never committed): a CA, server and client certificates in
 * the directory layout qemu, nbdkit and libnbd read (ca-cert.pem, server-cert.pem, server-key.pem,
 * client-cert.pem, client-key.pem), with the extensions qemu's sanity checks require; and PSK keys files
 * in psktool's `username:hexkey` format.
 */
import { randomBytes } from 'node:crypto';
import { chmod, copyFile, mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { sh } from './helpers.js';

export interface TestPki {
  /** ca-cert.pem, server-cert.pem, server-key.pem: for engine serve --tls-certificates (and nbdkit, qemu-nbd). */
  serverDir: string;
  /** ca-cert.pem, client-cert.pem, client-key.pem: for clients (libnbd tls-certificates=, qemu endpoint=client). */
  clientDir: string;
  /** A client certificate from another CA, which the server must refuse. */
  strangerDir: string;
}

async function makeCa(dir: string, name: string): Promise<{ cert: string; key: string }> {
  const cert = join(dir, `${name}-ca-cert.pem`);
  const key = join(dir, `${name}-ca-key.pem`);
  await sh('openssl', ['req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days', '2', '-subj', `/CN=${name} test CA`,
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
  return { cert, key };
}

async function issue(dir: string, ca: { cert: string; key: string }, name: string, usage: 'serverAuth' | 'clientAuth'): Promise<{ cert: string; key: string }> {
  const key = join(dir, `${name}-key.pem`);
  const csr = join(dir, `${name}.csr`);
  const cert = join(dir, `${name}-cert.pem`);
  const ext = join(dir, `${name}.ext`);
  await writeFile(ext, [
    'basicConstraints=critical,CA:FALSE',
    'keyUsage=critical,digitalSignature,keyEncipherment',
    `extendedKeyUsage=${usage}`,
    ...(usage === 'serverAuth' ? ['subjectAltName=IP:127.0.0.1,DNS:localhost'] : []),
  ].join('\n'));
  await sh('openssl', ['req', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', csr, '-subj', `/CN=${name}`]);
  await sh('openssl', ['x509', '-req', '-in', csr, '-CA', ca.cert, '-CAkey', ca.key, '-CAcreateserial', '-out', cert, '-days', '2', '-extfile', ext]);
  return { cert, key };
}

/** A CA with a server and a client certificate, and a client certificate of another CA. */
export async function makeTestPki(root: string): Promise<TestPki> {
  const work = join(root, 'pki-work');
  await mkdir(work, { recursive: true, mode: 0o700 });
  const ca = await makeCa(work, 'engine');
  const other = await makeCa(work, 'stranger');
  const server = await issue(work, ca, 'server', 'serverAuth');
  const client = await issue(work, ca, 'client', 'clientAuth');
  const stranger = await issue(work, other, 'stranger', 'clientAuth');
  const layout = async (dir: string, caCert: string, own: { cert: string; key: string }, role: 'server' | 'client'): Promise<string> => {
    await mkdir(dir, { recursive: true, mode: 0o700 });
    await copyFile(caCert, join(dir, 'ca-cert.pem'));
    await copyFile(own.cert, join(dir, `${role}-cert.pem`));
    await copyFile(own.key, join(dir, `${role}-key.pem`));
    await chmod(join(dir, `${role}-key.pem`), 0o600);
    return dir;
  };
  return {
    serverDir: await layout(join(root, 'pki-server'), ca.cert, server, 'server'),
    clientDir: await layout(join(root, 'pki-client'), ca.cert, client, 'client'),
    // Trusts the right CA, but its own certificate is from another: the server must refuse it.
    strangerDir: await layout(join(root, 'pki-stranger'), ca.cert, stranger, 'client'),
  };
}

/** A PSK keys file (mode 0600) with a fresh 32-byte key per user; returns its path and the keys. */
export async function makePskFile(path: string, users: string[]): Promise<Map<string, string>> {
  const keys = new Map(users.map((user) => [user, randomBytes(32).toString('hex')]));
  await writeFile(path, [...keys].map(([user, key]) => `${user}:${key}\n`).join(''), { mode: 0o600 });
  return keys;
}
