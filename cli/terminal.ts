/**
 * What reaches a terminal: results printed for a person carry strings from records and from the outside
 * (names, paths, host names, reasons), which may hold newlines, escape sequences or bidirectional controls,
 * and may be huge (a record written before names were bounded). Every string is escaped and bounded here,
 * once, before the printers see it (SPEC.md, section 9.1).
 */
import { displayText } from '../repo-format/display-text.js';

/** The longest string shown from a result, in characters: longer ones are cut and marked with their size. */
const MAX_FIELD_CHARACTERS = 1024;
/** The longest error or notice line, in characters. */
const MAX_LINE_CHARACTERS = 4096;

/** A copy of `value` with every string escaped and bounded; plain objects and arrays are copied, the rest kept. */
export function forTerminal<T>(value: T): T {
  if (typeof value === 'string') return displayText(value, MAX_FIELD_CHARACTERS) as T;
  if (Array.isArray(value)) return value.map((item: unknown) => forTerminal(item)) as T;
  if (typeof value === 'object' && value !== null) {
    const prototype = Object.getPrototypeOf(value) as unknown;
    if (prototype !== Object.prototype && prototype !== null) return value;
    return Object.fromEntries(Object.entries(value).map(([key, item]) => [key, forTerminal(item)])) as T;
  }
  return value;
}

/** One line of an error or notice: escaped (a newline in it shows as \x0a) and bounded. */
export function terminalLine(message: string): string {
  return displayText(message, MAX_LINE_CHARACTERS);
}

/**
 * JSON text safe on a terminal too: JSON.stringify escapes C0 controls and lone surrogates but writes DEL, C1
 * controls, U+2028/U+2029 and bidirectional controls raw; they can only occur inside strings, where \uXXXX
 * means the same character.
 */
export function jsonForTerminal(json: string): string {
  return json.replace(/[\u007f-\u009f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`);
}
