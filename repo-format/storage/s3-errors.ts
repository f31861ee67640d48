/**
 * S3's answers and the network's failures, sorted into StorageError reasons. The S3 error codes are those
 * of the S3 API reference ("Error responses"), as AWS, Ceph RGW and MinIO send them; an answer that names
 * no code is judged by its status. Transient: 5xx, 429, SlowDown, RequestTimeout, IncompleteBody, a body the
 * store found damaged (BadDigest: bytes changed on the way), and a connection that broke, timed out or was
 * refused (a gateway restarting). Never transient: a 4xx that means the request or the credentials are
 * wrong; retrying those would only hide a bug or hammer a store that said no.
 */
import { STATUS_CODES } from 'node:http';
import { StorageError, type StorageFailure } from './storage-error.js';

export interface S3Context {
  location: string;
  operation: string;
  key?: string | undefined;
}

interface Sorted {
  reason: StorageFailure;
  transient: boolean;
}

const BY_CODE: Record<string, Sorted> = {
  NoSuchKey: { reason: 'not-found', transient: false },
  NoSuchUpload: { reason: 'not-found', transient: true },
  NoSuchBucket: { reason: 'no-bucket', transient: false },
  NoSuchVersion: { reason: 'not-found', transient: false },
  // An object (or a bucket) that carries no Object Lock retention (configuration): nothing to read.
  NoSuchObjectLockConfiguration: { reason: 'not-found', transient: false },
  ObjectLockConfigurationNotFoundError: { reason: 'not-found', transient: false },
  PreconditionFailed: { reason: 'exists', transient: false },
  // AWS: another conditional write to the key is in flight; the retry then gets its definite answer.
  ConditionalRequestConflict: { reason: 'unavailable', transient: true },
  AccessDenied: { reason: 'denied', transient: false },
  AllAccessDisabled: { reason: 'denied', transient: false },
  AccountProblem: { reason: 'denied', transient: false },
  InvalidAccessKeyId: { reason: 'auth', transient: false },
  SignatureDoesNotMatch: { reason: 'auth', transient: false },
  ExpiredToken: { reason: 'auth', transient: false },
  InvalidToken: { reason: 'auth', transient: false },
  TokenRefreshRequired: { reason: 'auth', transient: false },
  RequestTimeTooSkewed: { reason: 'clock-skew', transient: false },
  BadDigest: { reason: 'integrity', transient: true },
  XAmzContentSHA256Mismatch: { reason: 'integrity', transient: true },
  InvalidDigest: { reason: 'refused', transient: false },
  InvalidRange: { reason: 'out-of-range', transient: false },
  EntityTooLarge: { reason: 'refused', transient: false },
  SlowDown: { reason: 'unavailable', transient: true },
  ServiceUnavailable: { reason: 'unavailable', transient: true },
  InternalError: { reason: 'unavailable', transient: true },
  RequestTimeout: { reason: 'unavailable', transient: true },
  IncompleteBody: { reason: 'unavailable', transient: true },
  OperationAborted: { reason: 'unavailable', transient: true },
  TooManyRequests: { reason: 'unavailable', transient: true },
  NotImplemented: { reason: 'refused', transient: false },
  AuthorizationHeaderMalformed: { reason: 'refused', transient: false },
  PermanentRedirect: { reason: 'refused', transient: false },
};

function byStatus(status: number): Sorted {
  if (status === 404) return { reason: 'not-found', transient: false };
  if (status === 412) return { reason: 'exists', transient: false };
  if (status === 416) return { reason: 'out-of-range', transient: false };
  if (status === 401 || status === 403) return { reason: 'denied', transient: false };
  if (status === 408 || status === 429 || status >= 500) return { reason: 'unavailable', transient: true };
  return { reason: 'refused', transient: false };
}

/** What the user can do about it, after the store's own words. */
function hint(code: string | undefined, region: string | undefined, endpoint: string | undefined, operation: string): string {
  switch (code) {
    case 'AccessDenied':
      // Append-only credentials (SPEC.md 20.5) may add but not delete; a locked version refuses its delete too.
      return operation === 'delete' ? '; these credentials may not delete here (append-only credentials, or an object still under Object Lock): run prune and gc with credentials that may delete' : '';
    case 'InvalidAccessKeyId':
      return '; the access key is not known to this store: check AWS_ACCESS_KEY_ID (or the credentials file) and the endpoint';
    case 'SignatureDoesNotMatch':
      return '; the secret key does not match the access key: check AWS_SECRET_ACCESS_KEY (or the credentials file)';
    case 'RequestTimeTooSkewed':
      return "; this machine's clock is too far from the store's: set it right (NTP)";
    case 'AuthorizationHeaderMalformed':
    case 'PermanentRedirect':
      return region ? `; the bucket is in region ${region}: give that region` : endpoint ? `; the store wants endpoint ${endpoint}` : '';
    case 'NoSuchBucket':
      return '; create the bucket first, or check its name, the endpoint and the region';
    default:
      return '';
  }
}

export function s3Failure(
  context: S3Context,
  status: number,
  document: { code?: string | undefined; message?: string | undefined; region?: string | undefined; endpoint?: string | undefined } | undefined,
  retryAfterMs?: number,
): StorageError {
  const code = document?.code;
  const sorted = (code ? BY_CODE[code] : undefined) ?? byStatus(status);
  // An answer without a body (HEAD) is named by its status's reason phrase.
  const words = [`HTTP ${status}`, code ?? (STATUS_CODES[status] ? `(${STATUS_CODES[status]})` : undefined), document?.message].filter(Boolean).join(' ');
  const what = `${context.location}: ${context.operation}${context.key ? ` ${context.key}` : ''}`;
  return new StorageError(
    sorted.reason,
    `${what}: ${words.replace(/\s+/g, ' ').slice(0, 300)}${hint(code, document?.region, document?.endpoint, context.operation)}`,
    { location: context.location, key: context.key, operation: context.operation, status, backendCode: code, retryAfterMs },
    { transient: sorted.transient },
  );
}

const TLS_REASONS: Record<string, string> = {
  DEPTH_ZERO_SELF_SIGNED_CERT: 'its certificate is self-signed and not trusted',
  SELF_SIGNED_CERT_IN_CHAIN: 'its certificate chains to a CA that is not trusted',
  UNABLE_TO_VERIFY_LEAF_SIGNATURE: 'its certificate is not signed by a trusted CA',
  UNABLE_TO_GET_ISSUER_CERT_LOCALLY: 'its certificate is not signed by a trusted CA',
  CERT_HAS_EXPIRED: 'its certificate has expired',
  CERT_NOT_YET_VALID: 'its certificate is not valid yet',
  ERR_TLS_CERT_ALTNAME_INVALID: 'its certificate is for another host name',
  ERR_SSL_WRONG_VERSION_NUMBER: 'it does not speak TLS there',
};

export function networkFailure(context: S3Context, error: unknown): StorageError {
  const code = (error as NodeJS.ErrnoException | undefined)?.code ?? 'EUNKNOWN';
  const message = (error instanceof Error ? error.message : String(error)).split('\n')[0]!.slice(0, 200);
  const what = `${context.location}: ${context.operation}${context.key ? ` ${context.key}` : ''}`;
  const details = { location: context.location, key: context.key, operation: context.operation, backendCode: code };
  const tls = TLS_REASONS[code];
  if (tls || code.startsWith('ERR_TLS') || code.startsWith('ERR_SSL') || /CERT/.test(code)) {
    return new StorageError('unreachable', `${what}: the store's TLS is not trusted: ${tls ?? message} (${code}); give its CA with --ca-file`, details, { cause: error });
  }
  if (code === 'ENOTFOUND') return new StorageError('unreachable', `${what}: the store's host name does not resolve (${code}): check the endpoint`, details, { cause: error });
  // Anything else the connection meets may pass on the next try: a reset, a refusal while a gateway restarts,
  // a timeout, a body cut short (S3_BODY_CUT), garbage from a proxy in between (HPE_*).
  return new StorageError('unavailable', `${what}: ${message} (${code})`, details, { transient: true, cause: error });
}
