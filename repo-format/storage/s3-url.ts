/**
 * `s3://bucket/prefix`: the repository lives under `prefix/` in `bucket` (the prefix may be empty: the
 * whole bucket). The URL holds no credentials, no endpoint and no options: credentials come from the
 * standard AWS places (s3-credentials.ts), the endpoint and region from their own options.
 */
import { InvalidArgumentError } from '../errors.js';
import { keyProblem } from './storage.js';

export interface S3Location {
  bucket: string;
  /** Without leading or trailing "/"; '' for the whole bucket. */
  prefix: string;
}

/** S3's bucket rule (3-63 characters, lower-case letters, digits, "." and "-"), widened to the upper case and "_" that older AWS buckets and RGW's relaxed names allow. */
const BUCKET = /^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$/;

export function isS3Url(text: string): boolean {
  return /^s3:\/\//i.test(text);
}

export function parseS3Url(text: string): S3Location {
  const bad = (why: string): InvalidArgumentError => new InvalidArgumentError(`${JSON.stringify(text.slice(0, 200))} is not an S3 repository URL: ${why} (the form is s3://BUCKET/PREFIX)`, { url: text.slice(0, 200) });
  const match = /^s3:\/\/([^/?#]*)(\/[^?#]*)?$/i.exec(text);
  if (!match) throw bad(/[?#]/.test(text) ? 'it has a query or fragment; options have their own flags' : 'it does not start with s3://');
  const authority = match[1]!;
  if (authority.includes('@') || authority.includes(':')) throw bad('credentials and ports do not go in the URL; credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or ~/.aws/credentials, the endpoint from its own option');
  if (!BUCKET.test(authority) || authority.includes('..')) throw bad(`bucket name ${JSON.stringify(authority)} is not valid (3-63 letters, digits, ".", "_" and "-")`);
  // One "/" separates the bucket from the prefix, one may end it; any other empty segment is refused, not
  // squeezed out: s3://b//x names the key prefix "/x", another place than s3://b/x.
  const prefix = (match[2] ?? '').replace(/^\//, '').replace(/\/$/, '');
  if (prefix !== '') {
    if (prefix.startsWith('/') || prefix.endsWith('/') || prefix.includes('//')) throw bad('the prefix has an empty segment');
    const problem = keyProblem(prefix);
    if (problem) throw bad(`the prefix: ${problem}`);
  }
  return { bucket: authority, prefix };
}

export function formatS3Url(location: S3Location): string {
  return `s3://${location.bucket}${location.prefix ? `/${location.prefix}` : ''}`;
}
