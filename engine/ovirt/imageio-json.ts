/**
 * The two JSON documents ovirt-imageio answers, decoded without trusting them (ovirt-imageio
 * handlers/images.py `options`, handlers/extents.py): each decoder returns the value or a string saying
 * what is wrong, never a TypeError from a field that is not there.
 *
 *   OPTIONS            {"features": ["extents", "zero", "flush"], "max_readers": 8, "max_writers": 8}
 *   GET …/extents      [{"start": 0, "length": 65536, "zero": false, "dirty": true}, …] covering the image
 */

export interface ImageioExtent {
  start: number;
  length: number;
  zero: boolean;
  dirty: boolean;
}

export interface ImageioOptions {
  features: string[];
  maxReaders: number;
  maxWriters: number;
}

function json(body: Buffer): unknown {
  try {
    return JSON.parse(body.toString('utf8')) as unknown;
  } catch {
    return undefined;
  }
}

const isObject = (value: unknown): value is Record<string, unknown> => typeof value === 'object' && value !== null && !Array.isArray(value);

/** The answer to OPTIONS; counts outside 1..8 (or absent) count as 1. */
export function decodeOptions(body: Buffer): ImageioOptions | string {
  const options = json(body);
  if (!isObject(options)) return 'imageio OPTIONS answered something other than a JSON object';
  const count = (value: unknown): number => (typeof value === 'number' && Number.isSafeInteger(value) && value > 0 ? Math.min(value, 8) : 1);
  return {
    features: Array.isArray(options.features) ? options.features.filter((f): f is string => typeof f === 'string') : [],
    maxReaders: count(options.max_readers),
    maxWriters: count(options.max_writers),
  };
}

/** An extents answer: contiguous extents from 0 that cover exactly `size` bytes. */
export function decodeExtents(body: Buffer, size: number): ImageioExtent[] | string {
  const list = json(body);
  if (!Array.isArray(list)) return 'not a JSON list';
  const extents: ImageioExtent[] = [];
  let at = 0;
  for (const item of list) {
    if (!isObject(item) || item.start !== at || typeof item.length !== 'number' || !Number.isSafeInteger(item.length) || item.length <= 0) return `not contiguous at ${at}`;
    if (at + item.length > size) return `an extent runs past the end of the image (${size} bytes)`;
    extents.push({ start: at, length: item.length, zero: item.zero === true, dirty: item.dirty === true });
    at += item.length;
  }
  return at === size ? extents : `they cover ${at} of ${size} bytes`;
}
