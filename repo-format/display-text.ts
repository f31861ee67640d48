/**
 * Untrusted text shown on a terminal (names, record fields, arguments echoed in errors): the characters
 * that would act instead of being shown — C0 and C1 controls and DEL (newlines, ESC and CSI, which start
 * terminal escape sequences), line and paragraph separators, bidirectional formatting characters (they
 * reorder what a terminal shows) and lone surrogates — are written as escapes. SPEC.md, section 9.1.
 */

/** Every character `displayText` escapes: also every character the name rule forbids (names.ts). */
export const UNSAFE_TEXT = /[\u0000-\u001f\u007f-\u009f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]|\p{Surrogate}/gu;

/**
 * Untrusted text made safe for a terminal: each forbidden character (controls, separators, bidirectional
 * formatting, lone surrogates) written as \xNN or \uNNNN, and, past `maxCharacters` code points, cut and
 * marked with its full size.
 */
export function displayText(text: string, maxCharacters = Infinity): string {
  const escaped = text.replace(UNSAFE_TEXT, (c) => {
    const code = c.charCodeAt(0);
    return code < 0x100 ? `\\x${code.toString(16).padStart(2, '0')}` : `\\u${code.toString(16).padStart(4, '0')}`;
  });
  if (maxCharacters === Infinity) return escaped;
  let count = 0;
  let end = 0;
  for (const character of escaped) {
    if (count === maxCharacters) return `${escaped.slice(0, end)}…(${Buffer.byteLength(text, 'utf8')} bytes)`;
    count += 1;
    end += character.length;
  }
  return escaped;
}

