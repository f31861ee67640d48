/**
 * The oVirt API's XML, through fast-xml-parser. Elements become objects, attributes live under "@_name"
 * (oVirt puts `id` and `href` in attributes), repeated elements become arrays. Every value stays a string:
 * the caller converts what it needs, so nothing is silently coerced (ids that look like numbers, "false").
 */
import { XMLBuilder, XMLParser } from 'fast-xml-parser';
import { displayText } from '../../repo-format/display-text.js';
import { OvirtFaultError } from '../errors.js';

export interface XmlElement {
  [name: string]: XmlValue;
}
export type XmlValue = string | XmlElement | XmlValue[];

const parser = new XMLParser({
  ignoreAttributes: false,
  attributeNamePrefix: '@_',
  parseTagValue: false,
  parseAttributeValue: false,
  trimValues: true,
  processEntities: true,
});

const builder = new XMLBuilder({ ignoreAttributes: false, attributeNamePrefix: '@_', suppressEmptyNode: true, format: false });

/**
 * The parsed document, or what is wrong with it: the parser's own refusal (not XML, an unclosed CDATA, more
 * than its 100 nested elements, a reserved name such as __proto__) as one line, never an exception.
 */
export function decodeXml(text: string): XmlElement | string {
  let value: unknown;
  try {
    value = parser.parse(text) as unknown;
  } catch (error) {
    return `not XML the API sends (${displayText(String((error as Error).message ?? error).split('\n')[0]!, 160)})`;
  }
  if (typeof value !== 'object' || value === null) return 'not an XML document';
  return value as XmlElement;
}

/** The parsed document; one that cannot be read is an OvirtFaultError (ENGINE_OVIRT_FAULT) naming `what`. */
export function parseXml(text: string, what = 'an oVirt answer'): XmlElement {
  const decoded = decodeXml(text);
  if (typeof decoded === 'string') throw new OvirtFaultError(what, 200, decoded, '');
  return decoded;
}

/** Input for buildXml: nested objects; attributes as "@_id"; booleans and numbers are written as text. */
export interface XmlInput {
  [name: string]: string | number | boolean | XmlInput | XmlInput[] | undefined;
}

export function buildXml(root: string, value: XmlInput): string {
  return builder.build({ [root]: value }) as string;
}

function asElement(value: XmlValue | undefined): XmlElement | undefined {
  if (value === undefined || typeof value === 'string' || Array.isArray(value)) return undefined;
  return value;
}

/** The single child element `name` (the first, if repeated). */
export function child(element: XmlElement | undefined, name: string): XmlElement | undefined {
  const value = element?.[name];
  return Array.isArray(value) ? asElement(value[0]) : asElement(value);
}

/** All child elements `name` (none, one or many). */
export function children(element: XmlElement | undefined, name: string): XmlElement[] {
  const value = element?.[name];
  if (value === undefined) return [];
  const list = Array.isArray(value) ? value : [value];
  return list.map((v) => (typeof v === 'string' ? { '#text': v } : asElement(v))).filter((v): v is XmlElement => v !== undefined);
}

/** The text of child element `name` (an element with only text is a string after parsing). */
export function text(element: XmlElement | undefined, name: string): string | undefined {
  const value = element?.[name];
  const first = Array.isArray(value) ? value[0] : value;
  if (typeof first === 'string') return first;
  const inner = asElement(first)?.['#text'];
  return typeof inner === 'string' ? inner : undefined;
}

export function attribute(element: XmlElement | undefined, name: string): string | undefined {
  const value = element?.[`@_${name}`];
  return typeof value === 'string' ? value : undefined;
}
