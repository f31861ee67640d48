/**
 * AWS Signature Version 4 for S3 requests (the Authorization header form), from AWS's published
 * algorithm: a canonical request (method, URI-encoded path, sorted query, sorted lower-case headers, the
 * signed header names, the payload's SHA-256 or UNSIGNED-PAYLOAD), its SHA-256 in a string to sign with the
 * date and the scope (date/region/s3/aws4_request), and an HMAC-SHA256 under a key derived from the secret
 * for that day and region. The secret itself never leaves the process. Checked against AWS's worked S3
 * examples in test/s3-client.test.ts.
 */
import { createHash, createHmac } from 'node:crypto';

export interface Credentials {
  accessKeyId: string;
  secretAccessKey: string;
  /** Temporary credentials (STS) carry a token, sent as x-amz-security-token. */
  sessionToken?: string | undefined;
}

export const UNSIGNED_PAYLOAD = 'UNSIGNED-PAYLOAD';
export const EMPTY_SHA256 = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855';

export interface RequestToSign {
  method: string;
  /** The path as sent: each segment already URI-encoded (uriEncodePath). */
  path: string;
  /** Query parameters, not encoded. */
  query: [string, string][];
  /** Header names in lower case; host included. */
  headers: Record<string, string>;
  /** Hex SHA-256 of the body, or UNSIGNED_PAYLOAD. */
  payloadHash: string;
  region: string;
  service?: string;
  date: Date;
}

/** RFC 3986 percent-encoding as SigV4 wants it: everything but A-Z a-z 0-9 - . _ ~ is escaped. */
export function uriEncode(text: string): string {
  return encodeURIComponent(text).replace(/[!'()*]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase()}`);
}

/** A path with its "/" kept and each segment encoded. */
export function uriEncodePath(path: string): string {
  return path.split('/').map(uriEncode).join('/');
}

/** 20130524T000000Z */
export function amzDate(date: Date): string {
  return date.toISOString().replace(/[-:]/g, '').replace(/\.\d{3}/, '');
}

function sha256Hex(text: string): string {
  return createHash('sha256').update(text, 'utf8').digest('hex');
}

function hmac(key: Buffer | string, text: string): Buffer {
  return createHmac('sha256', key).update(text, 'utf8').digest();
}

export function canonicalQuery(query: [string, string][]): string {
  return query
    .map(([name, value]) => [uriEncode(name), uriEncode(value)] as const)
    .sort(([a, av], [b, bv]) => (a < b ? -1 : a > b ? 1 : av < bv ? -1 : av > bv ? 1 : 0))
    .map(([name, value]) => `${name}=${value}`)
    .join('&');
}

/** The derived key of one day, region and service: computed once a day, not per request. */
class SigningKeyCache {
  private cached: { scope: string; secret: string; key: Buffer } | undefined;

  key(secret: string, day: string, region: string, service: string): Buffer {
    const scope = `${day}/${region}/${service}`;
    if (this.cached?.scope === scope && this.cached.secret === secret) return this.cached.key;
    const key = hmac(hmac(hmac(hmac(`AWS4${secret}`, day), region), service), 'aws4_request');
    this.cached = { scope, secret, key };
    return key;
  }
}

const signingKeys = new SigningKeyCache();

export interface Signature {
  authorization: string;
  /** For tests and diagnostics. */
  canonicalRequest: string;
  stringToSign: string;
}

/** Signs a request whose headers already hold host, x-amz-date and x-amz-content-sha256 (and any others to sign). */
export function sign(request: RequestToSign, credentials: Credentials): Signature {
  const service = request.service ?? 's3';
  const stamp = amzDate(request.date);
  const day = stamp.slice(0, 8);
  const names = Object.keys(request.headers)
    .map((name) => name.toLowerCase())
    .sort();
  const lowered = Object.fromEntries(Object.entries(request.headers).map(([name, value]) => [name.toLowerCase(), value]));
  const canonicalHeaders = names.map((name) => `${name}:${String(lowered[name]).trim().replace(/\s+/g, ' ')}\n`).join('');
  const signedHeaders = names.join(';');
  const canonicalRequest = [request.method, request.path, canonicalQuery(request.query), canonicalHeaders, signedHeaders, request.payloadHash].join('\n');
  const scope = `${day}/${request.region}/${service}/aws4_request`;
  const stringToSign = ['AWS4-HMAC-SHA256', stamp, scope, sha256Hex(canonicalRequest)].join('\n');
  const signature = createHmac('sha256', signingKeys.key(credentials.secretAccessKey, day, request.region, service)).update(stringToSign, 'utf8').digest('hex');
  return {
    authorization: `AWS4-HMAC-SHA256 Credential=${credentials.accessKeyId}/${scope},SignedHeaders=${signedHeaders},Signature=${signature}`,
    canonicalRequest,
    stringToSign,
  };
}
