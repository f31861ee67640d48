/**
 * The engine's oVirt requests checked against oVirt's API model (model-extract.json, extracted from
 * ovirt-engine-api-model's types/ and services/ by extract-model.ts): the path must walk the model's
 * service tree, the method must be one the service has (GET: Get/List, POST: Add or an action, PUT: Update,
 * DELETE: Remove), every query parameter one of that method's inputs, and every element of the body an
 * attribute of its type, with a value of its type (an enum value the model lists, a Boolean, an Integer).
 * A typo or an invented field fails here, without any simulator having to notice it.
 */
import { readFileSync } from 'node:fs';
import { XMLParser } from 'fast-xml-parser';

interface Extract {
  source: { repository: string; commit: string };
  conventions: { fault: string[] };
  types: Record<string, { attributes: Record<string, string> } | { values: string[] }>;
  services: Record<string, { service: string; methods: Record<string, { in: Record<string, string>; out?: string }> }>;
}

export const model = JSON.parse(readFileSync(new URL('./model-extract.json', import.meta.url), 'utf8')) as Extract;

const API = '/ovirt-engine/api';
const PRIMITIVES = new Set(['String', 'Boolean', 'Integer', 'Decimal', 'Date']);
const ENTITY_METHODS = new Set(['Get', 'List', 'Add', 'Update', 'Remove']);

/** TypeName → type_name, the element name of a type (ImageTransfer → image_transfer). */
export function elementName(type: string): string {
  return type.replace(/([a-z0-9])([A-Z])/g, '$1_$2').replace(/([A-Z]+)([A-Z][a-z])/g, '$1_$2').toLowerCase();
}

function struct(type: string): Record<string, string> | undefined {
  const t = model.types[type];
  return t && 'attributes' in t ? t.attributes : undefined;
}

function enumValues(type: string): string[] | undefined {
  const t = model.types[type];
  return t && 'values' in t ? t.values : undefined;
}

/** The method names of a service that a given HTTP method may call ("Add" also covers "Add.ForDisk"). */
function methodsFor(methods: Record<string, unknown>, http: string): string[] {
  const base = (name: string): string => name.split('.')[0]!;
  const names = Object.keys(methods);
  if (http === 'GET') return names.filter((n) => base(n) === 'Get' || base(n) === 'List');
  if (http === 'POST') return names.filter((n) => base(n) === 'Add');
  if (http === 'PUT') return names.filter((n) => base(n) === 'Update');
  if (http === 'DELETE') return names.filter((n) => base(n) === 'Remove');
  return [];
}

/** The model's action whose URL segment is `segment` (CancelMigration → cancelmigration). */
function actionFor(methods: Record<string, unknown>, segment: string): string | undefined {
  return Object.keys(methods).find((n) => !ENTITY_METHODS.has(n.split('.')[0]!) && !n.includes('.') && n.toLowerCase() === segment);
}

type Node = Record<string, unknown>;
const parser = new XMLParser({ ignoreAttributes: false, attributeNamePrefix: '@_', parseTagValue: false, parseAttributeValue: false, trimValues: true });

/** Problems of one element's children against `type` (its attributes), recursively. */
function checkElement(element: unknown, type: string, where: string, problems: string[]): void {
  if (PRIMITIVES.has(type) || enumValues(type)) {
    const text = typeof element === 'string' ? element : typeof element === 'object' && element !== null ? (element as Node)['#text'] : undefined;
    if (typeof text !== 'string') return void problems.push(`${where}: a ${type} must be text`);
    if (type === 'Boolean' && text !== 'true' && text !== 'false') problems.push(`${where}: "${text}" is not a Boolean`);
    if (type === 'Integer' && !/^-?\d+$/.test(text)) problems.push(`${where}: "${text}" is not an Integer`);
    const values = enumValues(type);
    if (values && !values.includes(text)) problems.push(`${where}: "${text}" is not a value of ${type} (${values.join(', ')})`);
    return;
  }
  const attributes = struct(type);
  if (!attributes) return void problems.push(`${where}: type ${type} is not in the model extract (add it to extract-model.ts if the engine must use it)`);
  if (typeof element !== 'object' || element === null) {
    if (element === '') return;
    return void problems.push(`${where}: a ${type} must be an element`);
  }
  for (const [name, value] of Object.entries(element as Node)) {
    if (name === '#text') continue;
    const attributeName = name.startsWith('@_') ? name.slice(2) : name;
    const declared = attributes[attributeName];
    if (!declared) {
      problems.push(`${where}/${name.startsWith('@_') ? '@' : ''}${attributeName}: no such attribute of ${type}`);
      continue;
    }
    if (name.startsWith('@_')) {
      if (attributeName !== 'id') problems.push(`${where}/@${attributeName}: only id is an XML attribute`);
      continue;
    }
    const list = declared.endsWith('[]');
    const itemType = list ? declared.slice(0, -2) : declared;
    if (list) {
      // <disks><disk …/>…</disks>: the items are named after their type.
      const items = typeof value === 'object' && value !== null ? (value as Node) : {};
      for (const [itemName, item] of Object.entries(items)) {
        if (itemName !== elementName(itemType)) {
          problems.push(`${where}/${name}/${itemName}: the items of ${name} are <${elementName(itemType)}>`);
          continue;
        }
        for (const one of Array.isArray(item) ? item : [item]) checkElement(one, itemType, `${where}/${name}/${itemName}`, problems);
      }
    } else {
      for (const one of Array.isArray(value) ? value : [value]) checkElement(one, itemType, `${where}/${name}`, problems);
    }
  }
}

export interface RecordedRequest {
  method: string;
  /** Path and query. */
  path: string;
  body: string;
}

/** What is wrong with one request, by the model; an empty list when nothing is. */
export function requestProblems(request: RecordedRequest): string[] {
  const url = new URL(request.path, 'http://engine');
  const what = `${request.method} ${url.pathname}`;
  if (url.pathname === '/ovirt-engine/sso/oauth/token' || url.pathname === '/ovirt-engine/services/sso-logout') return [];
  if (!url.pathname.startsWith(API)) return [`${what}: not under ${API}`];
  const segments = url.pathname.slice(API.length).split('/').filter(Boolean);
  let at = '';
  let action: string | undefined;
  for (const [i, segment] of segments.entries()) {
    const literal = at ? `${at}/${segment}` : segment;
    const byId = at ? `${at}/{id}` : '{id}';
    if (model.services[literal] && segment !== '{id}') at = literal;
    else if (model.services[byId]) at = byId;
    else if (i === segments.length - 1 && model.services[at] && (action = actionFor(model.services[at]!.methods, segment))) break;
    else return [`${what}: the model has no service at ${at ? `${at}/` : ''}${segment}`];
  }
  const service = model.services[at]!;
  const candidates = action ? (request.method === 'POST' ? [action] : []) : methodsFor(service.methods, request.method);
  if (candidates.length === 0) return [`${what}: ${service.service} has no ${action ? `${request.method} action ${action}` : `method for ${request.method}`}`];
  const problems: string[] = [];
  const inputs = Object.assign({}, ...candidates.map((c) => service.methods[c]!.in)) as Record<string, string>;
  for (const [name, value] of url.searchParams) {
    const type = inputs[name];
    if (!type || !PRIMITIVES.has(type)) problems.push(`${what}: ?${name} is not a parameter of ${service.service}.${candidates.join('|')}`);
    else if (type === 'Boolean' && value !== 'true' && value !== 'false') problems.push(`${what}: ?${name}=${value} is not a Boolean`);
  }
  if (request.body.trim()) {
    let parsed: Node;
    try {
      parsed = parser.parse(request.body) as Node;
    } catch (error) {
      return [...problems, `${what}: the body is not XML: ${(error as Error).message}`];
    }
    const [root, content] = Object.entries(parsed).find(([k]) => !k.startsWith('?')) ?? [];
    if (action) {
      if (root !== 'action') problems.push(`${what}: an action's body is <action>, not <${root}>`);
      else if (content && typeof content === 'object') {
        for (const name of Object.keys(content as Node)) if (!inputs[name]) problems.push(`${what}: <action><${name}> is not a parameter of ${service.service}.${action}`);
      }
    } else {
      const entity = Object.values(inputs).find((t) => struct(t) !== undefined || (!PRIMITIVES.has(t) && !enumValues(t)));
      if (!entity) problems.push(`${what}: ${service.service}.${candidates.join('|')} takes no body`);
      else if (root !== elementName(entity)) problems.push(`${what}: the body must be <${elementName(entity)}>, not <${root}>`);
      else {
        const found: string[] = [];
        checkElement(content ?? '', entity, root, found);
        problems.push(...found.map((p) => `${what}: ${p}`));
      }
    }
  }
  return problems;
}

/** Problems of many requests, each named once. */
export function contractProblems(requests: RecordedRequest[]): string[] {
  return [...new Set(requests.flatMap(requestProblems))];
}

/** Every element name the model knows: the attributes of the extracted types, and the types' own names. */
export function knownElementNames(): Set<string> {
  const names = new Set<string>(['fault', ...model.conventions.fault]);
  for (const [typeName, type] of Object.entries(model.types)) {
    if (!('attributes' in type)) continue;
    // A type's element, and its collection's (<vm>, <vms>; <disk_attachment>, <disk_attachments>).
    names.add(elementName(typeName));
    names.add(`${elementName(typeName)}s`);
    for (const [attribute, attributeType] of Object.entries(type.attributes)) {
      names.add(attribute);
      if (attributeType.endsWith('[]')) names.add(elementName(attributeType.slice(0, -2)));
    }
  }
  return names;
}
