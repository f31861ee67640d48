/**
 * The few XML documents S3 answers with, read without a general XML parser: an Error, a ListObjectsV2
 * page, the answers of a multipart upload. Their shape is fixed by the S3 API (flat elements, text content,
 * no attributes that matter), so a reader of exactly that shape is short, allocates in proportion to the
 * document (itself bounded by the HTTP layer) and loads nothing at start-up. Anything else (no root element
 * where one must be, a size that is not a number) is reported as malformed: the caller turns it into a
 * 'protocol' StorageError.
 */

export class MalformedXmlError extends Error {
  constructor(what: string) {
    super(`malformed S3 answer: ${what}`);
    this.name = 'MalformedXmlError';
  }
}

const ENTITIES: Record<string, string> = { amp: '&', lt: '<', gt: '>', quot: '"', apos: "'" };

/** XML character data: the five named entities and numeric references decoded; CDATA taken as it is. */
export function decodeXmlText(text: string): string {
  return text
    .replace(/<!\[CDATA\[([\s\S]*?)\]\]>/g, (_all, data: string) => data.replace(/&/g, '&amp;'))
    .replace(/&(#x[0-9a-fA-F]+|#[0-9]+|[a-z]+);/g, (all, entity: string) => {
      if (entity.startsWith('#x')) return safeCodePoint(parseInt(entity.slice(2), 16)) ?? all;
      if (entity.startsWith('#')) return safeCodePoint(parseInt(entity.slice(1), 10)) ?? all;
      return ENTITIES[entity] ?? all;
    });
}

function safeCodePoint(code: number): string | undefined {
  return Number.isInteger(code) && code >= 0 && code <= 0x10ffff ? String.fromCodePoint(code) : undefined;
}

/** The raw content of each <name>…</name> (or nothing for <name/>) directly in `xml`, in order. */
export function elements(xml: string, name: string): string[] {
  const found: string[] = [];
  const pattern = new RegExp(`<${name}(?:\\s[^>]*)?(?:/>|>([\\s\\S]*?)</${name}\\s*>)`, 'g');
  for (let match = pattern.exec(xml); match; match = pattern.exec(xml)) found.push(match[1] ?? '');
  return found;
}

/** The decoded text of the first <name>, or undefined. */
export function elementText(xml: string, name: string): string | undefined {
  const [first] = elements(xml, name);
  return first === undefined ? undefined : decodeXmlText(first);
}

/** The name of the document's root element (after the declaration and comments). */
export function rootElement(xml: string): string | undefined {
  const body = xml.replace(/^\uFEFF?\s*(<\?[\s\S]*?\?>\s*)?(<!--[\s\S]*?-->\s*)*/, '');
  return /^<([A-Za-z][\w.-]*)/.exec(body)?.[1];
}

export interface S3ErrorDocument {
  code: string | undefined;
  message: string | undefined;
  /** AuthorizationHeaderMalformed and PermanentRedirect name the bucket's region or endpoint. */
  region: string | undefined;
  endpoint: string | undefined;
  serverTime: string | undefined;
}

/** An <Error> document, or undefined when the text is not one (an empty body, HTML from a proxy). */
export function parseErrorDocument(xml: string): S3ErrorDocument | undefined {
  if (rootElement(xml) !== 'Error') return undefined;
  return {
    code: elementText(xml, 'Code'),
    message: elementText(xml, 'Message'),
    region: elementText(xml, 'Region'),
    endpoint: elementText(xml, 'Endpoint'),
    serverTime: elementText(xml, 'ServerTime'),
  };
}

export interface ListPage {
  /** `modified`: LastModified in ms since the epoch, undefined when absent or not a date. */
  objects: { key: string; size: number; modified: number | undefined }[];
  truncated: boolean;
  nextToken: string | undefined;
}

/** A ListObjectsV2 answer; keys percent-decoded when the answer says EncodingType url. */
export function parseListPage(xml: string): ListPage {
  if (rootElement(xml) !== 'ListBucketResult') throw new MalformedXmlError(`a listing was expected, the root element is ${rootElement(xml) ?? 'missing'}`);
  const decode = keyDecoder(xml);
  const objects = elements(xml, 'Contents').map((contents) => {
    const rawKey = elementText(contents, 'Key');
    const sizeText = elementText(contents, 'Size');
    if (rawKey === undefined) throw new MalformedXmlError('a listed object has no Key');
    const size = sizeText === undefined || !/^\d+$/.test(sizeText.trim()) ? NaN : Number(sizeText.trim());
    if (!Number.isSafeInteger(size)) throw new MalformedXmlError(`object ${rawKey.slice(0, 100)} has the size ${JSON.stringify(sizeText?.slice(0, 40))}`);
    const lastModified = elementText(contents, 'LastModified');
    const parsedTime = lastModified === undefined ? NaN : Date.parse(lastModified.trim());
    const modified = Number.isFinite(parsedTime) ? parsedTime : undefined;
    return { key: decode(rawKey), size, modified };
  });
  const truncatedText = elementText(xml, 'IsTruncated')?.trim().toLowerCase();
  if (truncatedText !== 'true' && truncatedText !== 'false') throw new MalformedXmlError('a listing without IsTruncated');
  const truncated = truncatedText === 'true';
  const nextToken = elementText(xml, 'NextContinuationToken');
  if (truncated && !nextToken) throw new MalformedXmlError('a truncated listing without NextContinuationToken');
  return { objects, truncated, nextToken };
}

/**
 * Keys of a listing answer as they are: percent-decoded when the answer says EncodingType url (the engine asks
 * for it, so that any key survives XML), else as given; a bad escape is a malformed answer.
 */
function keyDecoder(xml: string): (raw: string) => string {
  const urlEncoded = elementText(xml, 'EncodingType')?.toLowerCase() === 'url';
  return (raw) => {
    if (!urlEncoded) return raw;
    try {
      return decodeURIComponent(raw.replace(/\+/g, ' '));
    } catch {
      throw new MalformedXmlError(`key ${raw.slice(0, 100)} is not valid URL encoding`);
    }
  };
}

export interface UploadsPage {
  /** `initiated`: Initiated in ms since the epoch, undefined when absent or not a date. */
  uploads: { key: string; uploadId: string; initiated: number | undefined }[];
  truncated: boolean;
  nextKeyMarker: string | undefined;
  nextUploadIdMarker: string | undefined;
}

/** A ListMultipartUploads answer; keys (and the key marker) percent-decoded when the answer says EncodingType url. */
export function parseUploadsPage(xml: string): UploadsPage {
  if (rootElement(xml) !== 'ListMultipartUploadsResult') throw new MalformedXmlError(`a list of uploads was expected, the root element is ${rootElement(xml) ?? 'missing'}`);
  const decode = keyDecoder(xml);
  const uploads = elements(xml, 'Upload').map((upload) => {
    const key = elementText(upload, 'Key');
    const uploadId = elementText(upload, 'UploadId');
    if (key === undefined || !uploadId) throw new MalformedXmlError('a listed upload has no Key or no UploadId');
    const parsed = Date.parse(elementText(upload, 'Initiated')?.trim() ?? '');
    return { key: decode(key), uploadId, initiated: Number.isFinite(parsed) ? parsed : undefined };
  });
  const truncatedText = elementText(xml, 'IsTruncated')?.trim().toLowerCase();
  if (truncatedText !== 'true' && truncatedText !== 'false') throw new MalformedXmlError('a list of uploads without IsTruncated');
  const truncated = truncatedText === 'true';
  const nextKey = elementText(xml, 'NextKeyMarker');
  const nextKeyMarker = nextKey ? decode(nextKey) : undefined;
  const nextUploadIdMarker = elementText(xml, 'NextUploadIdMarker') || undefined;
  if (truncated && !nextKeyMarker) throw new MalformedXmlError('a truncated list of uploads without NextKeyMarker');
  return { uploads, truncated, nextKeyMarker, nextUploadIdMarker };
}

/** InitiateMultipartUploadResult's UploadId. */
export function parseUploadId(xml: string): string {
  const id = rootElement(xml) === 'InitiateMultipartUploadResult' ? elementText(xml, 'UploadId') : undefined;
  if (!id) throw new MalformedXmlError('a multipart upload was started but no UploadId came back');
  return id;
}

function escapeXml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => `&${{ '&': 'amp', '<': 'lt', '>': 'gt', '"': 'quot', "'": 'apos' }[c]};`);
}

/** The body of CompleteMultipartUpload. */
export function completeMultipartBody(parts: { number: number; etag: string }[]): string {
  const items = parts.map((part) => `<Part><PartNumber>${part.number}</PartNumber><ETag>${escapeXml(part.etag)}</ETag></Part>`).join('');
  return `<?xml version="1.0" encoding="UTF-8"?><CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/">${items}</CompleteMultipartUpload>`;
}

export interface ObjectVersion {
  key: string;
  versionId: string;
  /** The key's current version (or delete marker). */
  latest: boolean;
  /** A delete marker: the key reads as absent while it is the latest. */
  deleteMarker: boolean;
  /** LastModified, ms since the epoch (whole seconds); undefined when absent. */
  modified: number | undefined;
  size: number;
}

export interface VersionsPage {
  /** Versions and delete markers in the answer's order: by key, newest first within a key. */
  versions: ObjectVersion[];
  truncated: boolean;
  nextKeyMarker: string | undefined;
  nextVersionIdMarker: string | undefined;
}

/** A ListObjectVersions answer (ListVersionsResult): Version and DeleteMarker elements in document order. */
export function parseVersionsPage(xml: string): VersionsPage {
  if (rootElement(xml) !== 'ListVersionsResult') throw new MalformedXmlError(`a list of versions was expected, the root element is ${rootElement(xml) ?? 'missing'}`);
  const decode = keyDecoder(xml);
  const versions: ObjectVersion[] = [];
  const pattern = /<(Version|DeleteMarker)(?:\s[^>]*)?>([\s\S]*?)<\/\1\s*>/g;
  for (let match = pattern.exec(xml); match; match = pattern.exec(xml)) {
    const body = match[2]!;
    const key = elementText(body, 'Key');
    const versionId = elementText(body, 'VersionId');
    if (key === undefined || versionId === undefined) throw new MalformedXmlError('a listed version has no Key or no VersionId');
    const sizeText = elementText(body, 'Size')?.trim();
    const size = sizeText === undefined ? 0 : Number(sizeText);
    if (!Number.isSafeInteger(size) || size < 0) throw new MalformedXmlError(`version ${key.slice(0, 100)} has the size ${JSON.stringify(sizeText?.slice(0, 40))}`);
    const parsed = Date.parse(elementText(body, 'LastModified')?.trim() ?? '');
    versions.push({
      key: decode(key),
      versionId,
      latest: elementText(body, 'IsLatest')?.trim().toLowerCase() === 'true',
      deleteMarker: match[1] === 'DeleteMarker',
      modified: Number.isFinite(parsed) ? parsed : undefined,
      size,
    });
  }
  const truncatedText = elementText(xml, 'IsTruncated')?.trim().toLowerCase();
  if (truncatedText !== 'true' && truncatedText !== 'false') throw new MalformedXmlError('a list of versions without IsTruncated');
  const truncated = truncatedText === 'true';
  const nextKey = elementText(xml, 'NextKeyMarker');
  const nextKeyMarker = nextKey ? decode(nextKey) : undefined;
  const nextVersionIdMarker = elementText(xml, 'NextVersionIdMarker') || undefined;
  if (truncated && !nextKeyMarker) throw new MalformedXmlError('a truncated list of versions without NextKeyMarker');
  return { versions, truncated, nextKeyMarker, nextVersionIdMarker };
}

/** A GetObjectRetention answer: the mode and the date, or undefined when the object carries none. */
export function parseRetention(xml: string): { mode: string; until: number } | undefined {
  if (rootElement(xml) !== 'Retention') throw new MalformedXmlError(`a retention was expected, the root element is ${rootElement(xml) ?? 'missing'}`);
  const mode = elementText(xml, 'Mode')?.trim();
  const until = Date.parse(elementText(xml, 'RetainUntilDate')?.trim() ?? '');
  if (!mode || !Number.isFinite(until)) return undefined;
  return { mode, until };
}

/** The body of PutObjectRetention. */
export function retentionBody(mode: string, until: number): string {
  return `<?xml version="1.0" encoding="UTF-8"?><Retention xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Mode>${escapeXml(mode)}</Mode><RetainUntilDate>${new Date(until).toISOString()}</RetainUntilDate></Retention>`;
}

/** GetObjectLockConfiguration: whether Object Lock is enabled on the bucket. */
export function parseObjectLockEnabled(xml: string): boolean {
  if (rootElement(xml) !== 'ObjectLockConfiguration') throw new MalformedXmlError(`an object lock configuration was expected, the root element is ${rootElement(xml) ?? 'missing'}`);
  return elementText(xml, 'ObjectLockEnabled')?.trim() === 'Enabled';
}

/** GetBucketVersioning: Enabled, Suspended, or undefined (never enabled). */
export function parseVersioningStatus(xml: string): string | undefined {
  if (rootElement(xml) !== 'VersioningConfiguration') throw new MalformedXmlError(`a versioning configuration was expected, the root element is ${rootElement(xml) ?? 'missing'}`);
  return elementText(xml, 'Status')?.trim() || undefined;
}
