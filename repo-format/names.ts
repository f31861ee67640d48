/**
 * Names that reach a terminal or a file name — backup names, disk names (SPEC.md, section 9.1) — and how
 * any untrusted text is shown. One rule for every writer:
 *
 *   1 to 255 bytes of UTF-8 (a disk name becomes a file name, and file names are limited in bytes);
 *   well-formed Unicode (no lone surrogate: it has no UTF-8);
 *   no C0 control (U+0000–U+001F), DEL (U+007F) or C1 control (U+0080–U+009F): newlines, and the ESC and
 *   CSI that start terminal escape sequences; no line or paragraph separator (U+2028, U+2029); no
 *   bidirectional formatting character (U+061C, U+200E, U+200F, U+202A–U+202E, U+2066–U+2069), which makes a
 *   terminal show text in another order than it has;
 *   disk names also: not "." or "..", no "/" or "\".
 *
 * A name the user gives (--name, --disk-name, --vm) that breaks the rule is refused; a name that comes from
 * elsewhere (a file name, a libvirt domain or target, an oVirt VM or disk alias) is mapped to a safe one,
 * with a notice. Records written before the rule may hold other names: they are read, and shown escaped.
 */
import { InvalidArgumentError } from './errors.js';
import { displayText, UNSAFE_TEXT } from './display-text.js';

export { displayText } from './display-text.js';

export const MAX_NAME_BYTES = 255;
/** What engines before the rule could write at most: 255 UTF-16 code units, up to 3 bytes each. */
export const MAX_LEGACY_DISK_NAME_BYTES = 765;

export type NameKind = 'backup' | 'disk';

const CONTROL = /[\u0000-\u001f\u007f-\u009f]/u;
const SEPARATOR = /[\u2028\u2029]/u;
const BIDI = /[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/u;
const LONE_SURROGATE = /\p{Surrogate}/u;

function codePoint(character: string): string {
  return `U+${character.codePointAt(0)!.toString(16).toUpperCase().padStart(4, '0')}`;
}

/** Why `name` breaks the rule for a `kind` name, or undefined. */
export function nameProblem(name: string, kind: NameKind): string | undefined {
  if (name.length === 0) return 'it is empty';
  const surrogate = LONE_SURROGATE.exec(name);
  if (surrogate) return `it is not valid Unicode (a lone surrogate ${codePoint(surrogate[0])})`;
  const control = CONTROL.exec(name);
  if (control) return `it contains a control character (${codePoint(control[0])})`;
  const separator = SEPARATOR.exec(name);
  if (separator) return `it contains a line or paragraph separator (${codePoint(separator[0])})`;
  const bidi = BIDI.exec(name);
  if (bidi) return `it contains a bidirectional formatting character (${codePoint(bidi[0])})`;
  const bytes = Buffer.byteLength(name, 'utf8');
  if (bytes > MAX_NAME_BYTES) return `it has ${bytes} bytes of UTF-8, more than ${MAX_NAME_BYTES}`;
  if (kind === 'disk') {
    if (name === '.' || name === '..') return 'a disk name must not be "." or ".." (it becomes a file name)';
    if (/[/\\]/.test(name)) return 'a disk name must not contain "/" or "\\" (it becomes a file name)';
  }
  return undefined;
}

/** Refuses a name the user gave (exit code 2), naming the option and the problem; the name is shown escaped and cut. */
export function checkName(name: string, kind: NameKind, what: string): void {
  const problem = nameProblem(name, kind);
  if (problem) throw new InvalidArgumentError(`${what} "${displayText(name, 64)}" is not allowed: ${problem}`, { name: displayText(name, 1024) });
}

/**
 * The safe name for `name`: every character the rule forbids becomes "_", then it is cut to 255 bytes at a
 * character boundary; an empty, "." or ".." result becomes `fallback`. A name that keeps the rule is itself.
 */
export function safeName(name: string, kind: NameKind, fallback: string = kind): string {
  if (nameProblem(name, kind) === undefined) return name;
  let mapped = name.replace(UNSAFE_TEXT, '_');
  if (kind === 'disk') mapped = mapped.replace(/[/\\]/g, '_');
  let cut = '';
  for (const character of mapped) {
    if (Buffer.byteLength(cut + character, 'utf8') > MAX_NAME_BYTES) break;
    cut += character;
  }
  return cut === '' || (kind === 'disk' && (cut === '.' || cut === '..')) ? fallback : cut;
}

/**
 * A name from outside the engine (a file name, a libvirt domain or target, an oVirt VM or disk alias): itself
 * when it keeps the rule, else its safe name, with a notice saying so. Deterministic, so that a chain keyed on
 * it continues from one backup to the next.
 */
export function adoptName(name: string, kind: NameKind, what: string, notice: (message: string) => void, fallback?: string): string {
  const problem = nameProblem(name, kind);
  if (problem === undefined) return name;
  const safe = safeName(name, kind, fallback);
  notice(`${what} "${displayText(name, 64)}" cannot be a ${kind} name (${problem}): recorded as "${safe}"`);
  return safe;
}

/**
 * What a reader refuses in a disk name (SPEC.md, 9.1): what would make restoring into a directory write
 * outside it, or what no engine ever wrote. Names the writer rule refuses but older engines wrote (DEL, C1,
 * up to 255 UTF-16 units) are read.
 */
export function storedDiskNameProblem(name: string): string | undefined {
  if (name.length === 0) return 'it is empty';
  if (name === '.' || name === '..' || /[/\\]/.test(name)) return 'it must not be "." or "..", nor contain "/" or "\\"';
  if (/[\u0000-\u001f]/.test(name)) return 'it contains a C0 control character';
  if (Buffer.byteLength(name, 'utf8') > MAX_LEGACY_DISK_NAME_BYTES) return `it has more than ${MAX_LEGACY_DISK_NAME_BYTES} bytes`;
  return undefined;
}

/** The file name a disk is restored or mounted under: its name, or for a name older engines allowed, its safe name. */
export function diskFileName(name: string): string {
  return safeName(name, 'disk', 'disk');
}

/** Whether `given` (an argument) names `actual`: the name itself, or the escaped form `displayText` shows. */
export function nameMatches(actual: string, given: string): boolean {
  return given === actual || given === displayText(actual);
}
