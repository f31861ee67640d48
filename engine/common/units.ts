import { InvalidArgumentError } from '../../repo-format/errors.js';

const UNITS: Record<string, number> = { '': 1, b: 1, k: 1024, kib: 1024, m: 1024 ** 2, mib: 1024 ** 2, g: 1024 ** 3, gib: 1024 ** 3, t: 1024 ** 4, tib: 1024 ** 4 };

/** Parses "1048576", "1M", "256KiB", "4g" (binary units) into bytes. */
export function parseSize(text: string): number {
  const match = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  const unit = match ? UNITS[match[2]!.toLowerCase()] : undefined;
  if (!match || unit === undefined) throw new InvalidArgumentError(`"${text}" is not a size (examples: 1048576, 256K, 1M, 4GiB)`);
  const bytes = Number(match[1]) * unit;
  if (!Number.isSafeInteger(bytes)) throw new InvalidArgumentError(`"${text}" is not a whole number of bytes`);
  return bytes;
}

export function formatBytes(bytes: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let unit = 0;
  while (unit < units.length - 1 && bytes >= 1024 ** (unit + 1)) unit += 1;
  if (unit === 0) return `${bytes} B`;
  const value = bytes / 1024 ** unit;
  const digits = value >= 100 ? 0 : value >= 10 ? 1 : 2;
  const text = value.toFixed(digits);
  // Rounding can reach the next unit (1048575 B is "1024 KiB" at 0 digits): show it in that unit.
  if (Number(text) >= 1024 && unit < units.length - 1) return `${(1).toFixed(2)} ${units[unit + 1]}`;
  if (Number(text) >= 100 && digits > 0) return `${value.toFixed(0)} ${units[unit]}`;
  if (Number(text) >= 10 && digits > 1) return `${value.toFixed(1)} ${units[unit]}`;
  return `${text} ${units[unit]}`;
}
