/**
 * The S3 client's pure pieces, without a store: SigV4 against AWS's published S3 examples, s3:// URLs,
 * where credentials and the region come from (the environment and the shared files, never argv), the XML
 * answers (hostile ones too), how answers and network errors are sorted into retried and final failures,
 * and the backoff. The same code meets a real RGW in test/s3-storage.test.ts and the conformance suite.
 */
import { expect, test } from 'vitest';
import { chmod, mkdir, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { parseS3Url, formatS3Url } from '../dist/repo-format/storage/s3-url.js';
import { sign, EMPTY_SHA256, uriEncodePath } from '../dist/repo-format/storage/sigv4.js';
import { resolveCredentials, resolveRegion, endpointFromEnvironment, parseIni } from '../dist/repo-format/storage/s3-credentials.js';
import { parseListPage, parseErrorDocument, parseUploadId, decodeXmlText, MalformedXmlError } from '../dist/repo-format/storage/s3-xml.js';
import { s3Failure, networkFailure } from '../dist/repo-format/storage/s3-errors.js';
import { backoffDelay, DEFAULT_RETRY_POLICY } from '../dist/repo-format/storage/retry.js';
import { checkEndpoint } from '../dist/repo-format/storage/s3.js';
import { tempDir } from './helpers.js';

const EXAMPLE = { accessKeyId: 'AKIAIOSFODNN7EXAMPLE', secretAccessKey: 'wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY' };
const DAY = new Date(Date.UTC(2013, 4, 24));

test("SigV4: AWS's GET-object example (a Range header signed)", () => {
  const signature = sign(
    {
      method: 'GET',
      path: '/test.txt',
      query: [],
      headers: { host: 'examplebucket.s3.amazonaws.com', range: 'bytes=0-9', 'x-amz-content-sha256': EMPTY_SHA256, 'x-amz-date': '20130524T000000Z' },
      payloadHash: EMPTY_SHA256,
      region: 'us-east-1',
      date: DAY,
    },
    EXAMPLE,
  );
  expect(signature.authorization).toBe(
    'AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/aws4_request,SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41',
  );
});

test("SigV4: AWS's list-objects example (a sorted, encoded query)", () => {
  const signature = sign(
    {
      method: 'GET',
      path: '/',
      query: [['prefix', 'J'], ['max-keys', '2']],
      headers: { host: 'examplebucket.s3.amazonaws.com', 'x-amz-content-sha256': EMPTY_SHA256, 'x-amz-date': '20130524T000000Z' },
      payloadHash: EMPTY_SHA256,
      region: 'us-east-1',
      date: DAY,
    },
    EXAMPLE,
  );
  expect(signature.canonicalRequest.split('\n')[2]).toBe('max-keys=2&prefix=J');
  expect(signature.authorization.endsWith('Signature=34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7')).toBe(true);
});

test('SigV4: key paths keep "/" and escape the rest as RFC 3986 wants', () => {
  expect(uriEncodePath('repo/packs/ab/x y+z(1)*')).toBe('repo/packs/ab/x%20y%2Bz%281%29%2A');
  expect(uriEncodePath('a~b_c-d.e')).toBe('a~b_c-d.e');
});

test('s3:// URLs: bucket and prefix, and clear refusals', () => {
  expect(parseS3Url('s3://backups/site-a/repo')).toEqual({ bucket: 'backups', prefix: 'site-a/repo' });
  expect(parseS3Url('s3://backups/site-a/repo/')).toEqual({ bucket: 'backups', prefix: 'site-a/repo' });
  expect(parseS3Url('s3://backups')).toEqual({ bucket: 'backups', prefix: '' });
  expect(parseS3Url('S3://backups/')).toEqual({ bucket: 'backups', prefix: '' });
  expect(formatS3Url({ bucket: 'b.example', prefix: 'x/y' })).toBe('s3://b.example/x/y');
  for (const [bad, why] of [
    ['s3://AKIA:secret@bucket/x', 'credentials'],
    ['s3://bucket:9000/x', 'ports'],
    ['s3://bucket/x?region=eu', 'query'],
    ['s3://b/x', 'bucket name'],
    ['s3://-bucket/x', 'bucket name'],
    ['s3://bucket//x', 'empty segment'],
    ['s3://bucket/../x', 'prefix'],
    ['https://bucket/x', 's3://'],
  ] as const) {
    expect(() => parseS3Url(bad), bad).toThrow(why);
  }
});

test('endpoints: https anywhere, http only on this machine, nothing secret in the URL', () => {
  expect(checkEndpoint('https://rgw.example:7480', false).host).toBe('rgw.example:7480');
  expect(checkEndpoint('http://127.0.0.1:7480', false).port).toBe('7480');
  expect(checkEndpoint('http://[::1]:7480', false).hostname).toBe('[::1]');
  expect(() => checkEndpoint('http://rgw.example:7480', false)).toThrow('in clear');
  expect(checkEndpoint('http://rgw.example:7480', true).protocol).toBe('http:');
  expect(() => checkEndpoint('https://k:s@rgw.example', false)).toThrow('credentials');
  expect(() => checkEndpoint('ftp://rgw.example', false)).toThrow('https');
  expect(() => checkEndpoint('rgw.example:7480', false)).toThrow();
});

test('credentials: the environment first, then the shared file (profile, mode warning); never anything else', async () => {
  const { path, cleanup } = await tempDir();
  try {
    const env = { HOME: path };
    expect((await resolveCredentials({ ...env, AWS_ACCESS_KEY_ID: 'AK', AWS_SECRET_ACCESS_KEY: 'SK', AWS_SESSION_TOKEN: 'T' }, 'loc')).credentials).toEqual({ accessKeyId: 'AK', secretAccessKey: 'SK', sessionToken: 'T' });
    await expect(resolveCredentials({ ...env, AWS_ACCESS_KEY_ID: 'AK' }, 'loc')).rejects.toMatchObject({ code: 'ENGINE_STORAGE_AUTH', message: expect.stringContaining('AWS_SECRET_ACCESS_KEY') });
    await expect(resolveCredentials(env, 's3://b/p')).rejects.toMatchObject({ code: 'ENGINE_STORAGE_AUTH', message: expect.stringContaining('no S3 credentials') });
    await mkdir(join(path, '.aws'));
    const file = join(path, '.aws', 'credentials');
    await writeFile(file, '# comment\n[default]\naws_access_key_id = DEF\naws_secret_access_key = DEFSECRET ; trailing comment\n\n[site-b]\naws_access_key_id=BK\naws_secret_access_key=BS\n', { mode: 0o600 });
    await chmod(file, 0o600);
    const fromFile = await resolveCredentials(env, 'loc');
    expect(fromFile.credentials).toEqual({ accessKeyId: 'DEF', secretAccessKey: 'DEFSECRET', sessionToken: undefined });
    expect(fromFile.warnings).toEqual([]);
    expect(fromFile.source).not.toContain('DEFSECRET');
    expect((await resolveCredentials({ ...env, AWS_PROFILE: 'site-b' }, 'loc')).credentials.accessKeyId).toBe('BK');
    await expect(resolveCredentials({ ...env, AWS_PROFILE: 'nope' }, 'loc')).rejects.toMatchObject({ code: 'ENGINE_STORAGE_AUTH' });
    await chmod(file, 0o644);
    expect((await resolveCredentials(env, 'loc')).warnings[0]).toContain('chmod 600');
    // A profile that wants SSO or a role is refused by name, not half-used.
    await writeFile(join(path, '.aws', 'config'), '[profile sso]\nsso_start_url = https://x\nregion = eu-west-3\n[default]\nregion = eu-central-1\n');
    await expect(resolveCredentials({ ...env, AWS_PROFILE: 'sso' }, 'loc')).rejects.toMatchObject({ message: expect.stringContaining('sso_start_url') });
    expect(await resolveRegion(env, 'loc')).toBe('eu-central-1');
    expect(await resolveRegion({ ...env, AWS_PROFILE: 'sso' }, 'loc')).toBe('eu-west-3');
    expect(await resolveRegion({ ...env, AWS_REGION: 'ap-south-1' }, 'loc')).toBe('ap-south-1');
    expect(await resolveRegion({ HOME: join(path, 'none') }, 'loc')).toBe('us-east-1');
    expect(endpointFromEnvironment({ AWS_ENDPOINT_URL: 'https://a', AWS_ENDPOINT_URL_S3: 'https://s3' })).toBe('https://s3');
    // A huge "credentials file" is not read into memory.
    await writeFile(file, Buffer.alloc(2 * 1024 * 1024, 0x61));
    await expect(resolveCredentials(env, 'loc')).rejects.toMatchObject({ code: 'ENGINE_STORAGE_AUTH' });
  } finally {
    await cleanup();
  }
});

test('INI: sections, comments, spaces around "="', () => {
  const ini = parseIni('[a]\n KEY = v1 \n; c\n# c\n[ b ]\nk=v=w\n');
  expect(ini.get('a')?.get('key')).toBe('v1');
  expect(ini.get('b')?.get('k')).toBe('v=w');
});

test('XML: a listing page with URL-encoded keys, entities and CDATA; malformed ones are refused', () => {
  const page = parseListPage(
    '<?xml version="1.0"?><ListBucketResult><EncodingType>url</EncodingType><IsTruncated>true</IsTruncated><NextContinuationToken>t&amp;1</NextContinuationToken>' +
      '<Contents><Key>repo/a%20b%2Bc</Key><Size>12</Size></Contents><Contents><Key>repo/%C3%A9</Key><Size>0</Size></Contents></ListBucketResult>',
  );
  expect(page).toEqual({ objects: [{ key: 'repo/a b+c', size: 12 }, { key: 'repo/é', size: 0 }], truncated: true, nextToken: 't&1' });
  expect(decodeXmlText('a&lt;b&#x41;&#66;<![CDATA[<&>]]>')).toBe('a<bAB<&>');
  for (const bad of [
    '<Error><Code>x</Code></Error>',
    '<ListBucketResult><Contents><Key>k</Key><Size>-1</Size></Contents><IsTruncated>false</IsTruncated></ListBucketResult>',
    '<ListBucketResult><Contents><Key>k</Key><Size>99999999999999999999</Size></Contents><IsTruncated>false</IsTruncated></ListBucketResult>',
    '<ListBucketResult><Contents><Size>1</Size></Contents><IsTruncated>false</IsTruncated></ListBucketResult>',
    '<ListBucketResult><IsTruncated>true</IsTruncated></ListBucketResult>',
    '<ListBucketResult></ListBucketResult>',
    '<ListBucketResult><EncodingType>url</EncodingType><IsTruncated>false</IsTruncated><Contents><Key>%E0%A4%A</Key><Size>1</Size></Contents></ListBucketResult>',
    '',
  ]) {
    expect(() => parseListPage(bad), bad).toThrow(MalformedXmlError);
  }
  expect(() => parseUploadId('<InitiateMultipartUploadResult></InitiateMultipartUploadResult>')).toThrow(MalformedXmlError);
  expect(parseErrorDocument('<html>proxy error</html>')).toBeUndefined();
  expect(parseErrorDocument('<?xml version="1.0"?>\n<Error><Code>SlowDown</Code><Message>Reduce</Message></Error>')).toMatchObject({ code: 'SlowDown', message: 'Reduce' });
});

test('answers sorted: 5xx, SlowDown, resets and timeouts are retried; 4xx that mean a bug or a refusal are not', () => {
  const context = { location: 's3://b/p', operation: 'get', key: 'k' };
  const cases: [number, string | undefined, string, boolean][] = [
    [503, 'SlowDown', 'unavailable', true],
    [500, 'InternalError', 'unavailable', true],
    [502, undefined, 'unavailable', true],
    [429, undefined, 'unavailable', true],
    [400, 'RequestTimeout', 'unavailable', true],
    [400, 'BadDigest', 'integrity', true],
    [404, 'NoSuchKey', 'not-found', false],
    [404, 'NoSuchBucket', 'no-bucket', false],
    [404, undefined, 'not-found', false],
    [412, 'PreconditionFailed', 'exists', false],
    [403, 'AccessDenied', 'denied', false],
    [403, 'SignatureDoesNotMatch', 'auth', false],
    [403, 'InvalidAccessKeyId', 'auth', false],
    [403, 'RequestTimeTooSkewed', 'clock-skew', false],
    [400, 'InvalidArgument', 'refused', false],
    [400, 'AuthorizationHeaderMalformed', 'refused', false],
    [416, 'InvalidRange', 'out-of-range', false],
    [501, 'NotImplemented', 'refused', false],
  ];
  for (const [status, code, reason, transient] of cases) {
    const error = s3Failure(context, status, code ? { code, message: 'm' } : undefined);
    expect([status, code, error.reason, error.transient]).toEqual([status, code, reason, transient]);
    expect(error.message).not.toContain('\n');
  }
  expect(s3Failure(context, 400, { code: 'AuthorizationHeaderMalformed', region: 'eu-west-1' }).message).toContain('region eu-west-1');
  for (const code of ['ECONNRESET', 'ECONNREFUSED', 'EPIPE', 'ETIMEDOUT', 'S3_IDLE_TIMEOUT', 'S3_BODY_CUT', 'HPE_INVALID_CONSTANT']) {
    const error = networkFailure(context, Object.assign(new Error('x'), { code }));
    expect([code, error.reason, error.transient]).toEqual([code, 'unavailable', true]);
  }
  for (const code of ['DEPTH_ZERO_SELF_SIGNED_CERT', 'CERT_HAS_EXPIRED', 'ERR_TLS_CERT_ALTNAME_INVALID', 'ENOTFOUND']) {
    const error = networkFailure(context, Object.assign(new Error('x'), { code }));
    expect([code, error.reason, error.transient, error.code]).toEqual([code, 'unreachable', false, 'ENGINE_STORAGE_UNREACHABLE']);
  }
});

test('backoff: exponential with equal jitter, capped; the default policy rides out about a minute', () => {
  const policy = { attempts: 10, baseDelayMs: 100, maxDelayMs: 1_000, maxElapsedMs: 60_000 };
  expect(backoffDelay(policy, 1, () => 0)).toBe(50);
  expect(backoffDelay(policy, 1, () => 0.999999)).toBeCloseTo(100, 3);
  expect(backoffDelay(policy, 3, () => 0)).toBe(200);
  expect(backoffDelay(policy, 30, () => 1)).toBe(1_000);
  let worst = 0;
  let least = 0;
  for (let n = 1; n < DEFAULT_RETRY_POLICY.attempts; n += 1) {
    worst += backoffDelay(DEFAULT_RETRY_POLICY, n, () => 1);
    least += backoffDelay(DEFAULT_RETRY_POLICY, n, () => 0);
  }
  expect(least).toBeGreaterThanOrEqual(30_000);
  expect(worst).toBeLessThanOrEqual(DEFAULT_RETRY_POLICY.maxElapsedMs);
});
