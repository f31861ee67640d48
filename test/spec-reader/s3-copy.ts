/**
 * Copies every object under `s3://bucket/prefix/` to a folder, the key after the prefix becoming the
 * relative path (SPEC 19.2: "on S3 it follows the prefix: s3://bucket/prefix/ + key"; on a folder a key is a
 * path below the repository directory). A minimal S3 client of its own, so that the copy owes nothing to the
 * engine: path-style requests signed with AWS Signature Version 4 (node:crypto), ListObjectsV2 pages
 * followed by continuation token, one GET per object, over node:http(s).
 */
import { createHash, createHmac } from 'node:crypto';
import { mkdirSync, writeFileSync } from 'node:fs';
import { request as httpRequest, type IncomingMessage } from 'node:http';
import { request as httpsRequest } from 'node:https';
import { dirname, join } from 'node:path';

export interface S3Access {
  endpoint: string;
  region: string;
  accessKeyId: string;
  secretAccessKey: string;
}

const EMPTY_SHA256 = createHash('sha256').update('').digest('hex');

/** RFC 3986 encoding as SigV4 wants it: unreserved characters kept, `/` kept only where asked. */
function uriEncode(text: string, keepSlash: boolean): string {
  let out = '';
  for (const byte of Buffer.from(text, 'utf8')) {
    const ch = String.fromCharCode(byte);
    if (/[A-Za-z0-9\-_.~]/.test(ch) || (keepSlash && ch === '/')) out += ch;
    else out += `%${byte.toString(16).toUpperCase().padStart(2, '0')}`;
  }
  return out;
}

function hmac(key: Buffer | string, data: string): Buffer {
  return createHmac('sha256', key).update(data, 'utf8').digest();
}

function signedGet(access: S3Access, path: string, query: Record<string, string>): Promise<Buffer> {
  const url = new URL(access.endpoint);
  const now = new Date();
  const amzDate = now.toISOString().replace(/[-:]/g, '').replace(/\.\d{3}/, '');
  const day = amzDate.slice(0, 8);
  const canonicalQuery = Object.keys(query)
    .sort()
    .map((k) => `${uriEncode(k, false)}=${uriEncode(query[k] as string, false)}`)
    .join('&');
  const host = url.host;
  const canonicalHeaders = `host:${host}\nx-amz-content-sha256:${EMPTY_SHA256}\nx-amz-date:${amzDate}\n`;
  const signedHeaders = 'host;x-amz-content-sha256;x-amz-date';
  const canonicalRequest = ['GET', path, canonicalQuery, canonicalHeaders, signedHeaders, EMPTY_SHA256].join('\n');
  const scope = `${day}/${access.region}/s3/aws4_request`;
  const stringToSign = ['AWS4-HMAC-SHA256', amzDate, scope, createHash('sha256').update(canonicalRequest).digest('hex')].join('\n');
  const signingKey = hmac(hmac(hmac(hmac(`AWS4${access.secretAccessKey}`, day), access.region), 's3'), 'aws4_request');
  const signature = createHmac('sha256', signingKey).update(stringToSign).digest('hex');
  const headers = {
    host,
    'x-amz-content-sha256': EMPTY_SHA256,
    'x-amz-date': amzDate,
    authorization: `AWS4-HMAC-SHA256 Credential=${access.accessKeyId}/${scope}, SignedHeaders=${signedHeaders}, Signature=${signature}`,
  };
  const requester = url.protocol === 'https:' ? httpsRequest : httpRequest;
  return new Promise((resolve, reject) => {
    const req = requester({ hostname: url.hostname, port: url.port, path: canonicalQuery ? `${path}?${canonicalQuery}` : path, method: 'GET', headers }, (res: IncomingMessage) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('error', reject);
      res.on('end', () => {
        const body = Buffer.concat(chunks);
        const expected = res.headers['content-length'];
        if (res.statusCode !== 200) reject(new Error(`GET ${path}?${canonicalQuery}: HTTP ${res.statusCode}: ${body.toString('utf8').slice(0, 300)}`));
        else if (expected !== undefined && Number(expected) !== body.length) reject(new Error(`GET ${path}: ${body.length} bytes of ${expected}`));
        else resolve(body);
      });
    });
    req.on('error', reject);
    req.end();
  });
}

function xmlText(text: string): string {
  return text.replace(/&lt;/g, '<').replace(/&gt;/g, '>').replace(/&quot;/g, '"').replace(/&apos;/g, "'").replace(/&amp;/g, '&');
}

/** Every key under `prefix` (which ends with `/`, or is empty), in the listing's order. */
export async function listKeys(access: S3Access, bucket: string, prefix: string): Promise<string[]> {
  const keys: string[] = [];
  let token: string | undefined;
  for (;;) {
    const query: Record<string, string> = { 'list-type': '2', prefix, ...(token !== undefined ? { 'continuation-token': token } : {}) };
    const xml = (await signedGet(access, `/${uriEncode(bucket, false)}`, query)).toString('utf8');
    for (const m of xml.matchAll(/<Key>([^<]*)<\/Key>/g)) keys.push(xmlText(m[1] as string));
    if (!/<IsTruncated>true<\/IsTruncated>/.test(xml)) return keys;
    const next = /<NextContinuationToken>([^<]*)<\/NextContinuationToken>/.exec(xml);
    if (next === null) throw new Error('a truncated listing without a continuation token');
    token = xmlText(next[1] as string);
  }
}

/** Copies `s3://bucket/prefix/*` into `folder`; returns the keys copied (relative to the prefix). */
export async function copyPrefixToFolder(access: S3Access, bucket: string, prefix: string, folder: string): Promise<string[]> {
  const base = prefix === '' ? '' : `${prefix.replace(/\/$/, '')}/`;
  const copied: string[] = [];
  for (const full of await listKeys(access, bucket, base)) {
    const key = full.slice(base.length);
    if (key === '' || key.split('/').some((s) => s === '' || s === '.' || s === '..')) throw new Error(`key ${full} cannot be a relative path`);
    const bytes = await signedGet(access, `/${uriEncode(bucket, false)}/${uriEncode(full, true)}`, {});
    const path = join(folder, ...key.split('/'));
    mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
    writeFileSync(path, bytes, { mode: 0o600 });
    copied.push(key);
  }
  return copied;
}
