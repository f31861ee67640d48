/**
 * Writes model-extract.json: the part of oVirt's API model (github.com/oVirt/ovirt-engine-api-model,
 * src/main/java/types/*.java and services/*.java) that the engine's oVirt flows use — element names and
 * their types, enum values, and the service tree (paths, methods, parameters, actions) — with the
 * repository and commit it was read from.
 *
 *   node dist/test/ovirt-contract/extract-model.js <git dir or checkout of ovirt-engine-api-model> > test/ovirt-contract/model-extract.json
 *
 * The model is Java interfaces read by oVirt's metamodel: a type's attribute `fooBar()` is the element
 * `foo_bar`; an enum constant `FOO_BAR` is the value `foo_bar`; a service locator `fooBar()` is the URL
 * segment `foobar` (`{id}` when it takes an id); a nested interface other than Get, List, Add, Update and
 * Remove is an action, POSTed to `…/<name in lower case>`. The parser below understands that subset of
 * Java (the model's files use nothing else); it was written from reading those files.
 */
import { execFileSync } from 'node:child_process';

/** The services and types the engine's oVirt flows touch: their closure over attributes is extracted. */
const ROOT_SERVICE = 'SystemService';
const SERVICE_PATHS = [
  'vms/{id}/backups/{id}/disks',
  'vms/{id}/backups/{id}',
  'vms/{id}/checkpoints/{id}',
  'vms/{id}/diskattachments/{id}',
  'vms/{id}/snapshots/{id}/disks',
  'vms/{id}',
  'disks/{id}',
  'imagetransfers/{id}',
  'storagedomains/{id}',
  'clusters/{id}',
  'datacenters/{id}/storagedomains/{id}',
  'events',
];
/**
 * The types whose elements the engine sends or reads: each is extracted whole (every attribute, with the
 * enums those attributes use), so a misspelt or invented element fails the contract test. A type outside
 * this list is named (as an attribute's type) but not described: adding it here is a deliberate step.
 */
const TYPES = [
  'Api', 'ProductInfo', 'Version', 'Vm', 'Cluster', 'DataCenter', 'StorageDomain', 'HostStorage', 'Disk',
  'DiskAttachment', 'Snapshot', 'Backup', 'Checkpoint', 'ImageTransfer', 'Initialization', 'Configuration', 'Host',
  'Event',
];

interface TypeDecl {
  kind: 'struct';
  extends: string[];
  attributes: Record<string, { type: string; list: boolean; link: boolean }>;
}
interface EnumDecl {
  kind: 'enum';
  values: string[];
}
interface MethodDecl {
  extends: string[];
  params: Record<string, { type: string; list: boolean; in: boolean; out: boolean }>;
  variants: string[];
}
interface ServiceDecl {
  methods: Record<string, MethodDecl>;
  locators: Record<string, { service: string; id: boolean }>;
}

function git(dir: string, args: string[]): string {
  return execFileSync('git', ['-C', dir, ...args], { encoding: 'utf8', maxBuffer: 256 * 1024 * 1024 });
}

/** camelCase or PascalCase → snake_case, the metamodel's element names. */
export function snake(name: string): string {
  // `_interface()`: a Java keyword, escaped with an underscore, is the element `interface`.
  return name
    .replace(/^_/, '').replace(/([a-z0-9])([A-Z])/g, '$1_$2').replace(/([A-Z]+)([A-Z][a-z])/g, '$1_$2').toLowerCase();
}

function stripComments(source: string): string {
  return source.replace(/\/\*[\s\S]*?\*\//g, '').replace(/\/\/[^\n]*/g, '');
}

/** The body of the first `{ … }` after `from`, with nested blocks kept. */
function block(source: string, from: number): { body: string; end: number } {
  const open = source.indexOf('{', from);
  let depth = 0;
  for (let i = open; i < source.length; i += 1) {
    if (source[i] === '{') depth += 1;
    else if (source[i] === '}') {
      depth -= 1;
      if (depth === 0) return { body: source.slice(open + 1, i), end: i + 1 };
    }
  }
  throw new Error('unbalanced braces');
}

/** Top-level members of a block body: nested blocks (with their headers) and `…;` declarations. */
function members(body: string): { header: string; body?: string }[] {
  const out: { header: string; body?: string }[] = [];
  let i = 0;
  while (i < body.length) {
    const semi = body.indexOf(';', i);
    const brace = body.indexOf('{', i);
    if (semi === -1 && brace === -1) break;
    if (brace !== -1 && (semi === -1 || brace < semi)) {
      const { body: inner, end } = block(body, brace);
      out.push({ header: body.slice(i, brace).trim(), body: inner });
      i = end;
    } else {
      out.push({ header: body.slice(i, semi).trim() });
      i = semi + 1;
    }
  }
  return out;
}

function parseType(source: string): [string, TypeDecl | EnumDecl] | undefined {
  const clean = stripComments(source);
  const head = /public\s+(interface|enum)\s+(\w+)(?:\s+extends\s+([\w\s,]+))?\s*\{/.exec(clean);
  if (!head) return undefined;
  const { body } = block(clean, head.index);
  if (head[1] === 'enum') {
    const values = body.split(/[,;]/).map((v) => v.replace(/@\w+(\([^)]*\))?/g, '').trim()).filter((v) => /^[A-Z][A-Z0-9_]*$/.test(v));
    return [head[2]!, { kind: 'enum', values: values.map((v) => v.toLowerCase()) }];
  }
  const attributes: TypeDecl['attributes'] = {};
  for (const m of members(body)) {
    if (m.body !== undefined) continue;
    const decl = /^((?:@\w+(?:\([^)]*\))?\s+)*)(\w+)(\[\])?\s+(\w+)\s*\(\s*\)$/.exec(m.header.replace(/\s+/g, ' '));
    if (!decl) continue;
    attributes[snake(decl[4]!)] = { type: decl[2]!, list: decl[3] === '[]', link: /@Link\b/.test(decl[1]!) };
  }
  return [head[2]!, { kind: 'struct', extends: (head[3] ?? '').split(',').map((s) => s.trim()).filter(Boolean), attributes }];
}

function parseMethod(name: string, header: string, body: string, into: Record<string, MethodDecl>): void {
  const ext = /extends\s+([\w\s,]+)$/.exec(header)?.[1]?.split(',').map((s) => s.trim()) ?? [];
  const method: MethodDecl = { extends: ext, params: {}, variants: [] };
  for (const m of members(body)) {
    if (m.body !== undefined) {
      const nested = /interface\s+(\w+)/.exec(m.header);
      if (nested) {
        method.variants.push(nested[1]!);
        parseMethod(`${name}.${nested[1]}`, m.header, m.body, into);
      }
      continue;
    }
    const decl = /^((?:@\w+(?:\([^)]*\))?\s+)*)(\w+)(\[\])?\s+(\w+)\s*\(\s*\)$/.exec(m.header.replace(/\s+/g, ' '));
    if (!decl) continue;
    method.params[snake(decl[4]!)] = { type: decl[2]!, list: decl[3] === '[]', in: /@In\b/.test(decl[1]!), out: /@Out\b/.test(decl[1]!) };
  }
  into[name] = method;
}

function parseService(source: string): [string, ServiceDecl] | undefined {
  const clean = stripComments(source);
  const head = /public\s+interface\s+(\w+)(?:\s+extends\s+([\w\s,]+))?\s*\{/.exec(clean);
  if (!head) return undefined;
  const { body } = block(clean, head.index);
  const service: ServiceDecl = { methods: {}, locators: {} };
  for (const m of members(body)) {
    const header = m.header.replace(/\s+/g, ' ');
    if (m.body !== undefined) {
      const nested = /interface (\w+)/.exec(header);
      if (nested) parseMethod(nested[1]!, header, m.body, service.methods);
      continue;
    }
    const locator = /@Service (\w+) (\w+)\s*\(\s*(String \w+)?\s*\)$/.exec(header);
    if (locator) service.locators[locator[2]!.toLowerCase()] = { service: locator[1]!, id: locator[3] !== undefined };
  }
  const ext = (head[2] ?? '').split(',').map((s) => s.trim()).filter(Boolean);
  return [head[1]!, { ...service, ...(ext.length ? { extends: ext } : {}) } as ServiceDecl];
}

function main(): void {
  const dir = process.argv[2];
  if (!dir) throw new Error('usage: extract-model.js <ovirt-engine-api-model git dir or checkout>');
  const commit = git(dir, ['rev-parse', 'HEAD']).trim();
  const files = git(dir, ['ls-tree', '-r', '--name-only', 'HEAD', 'src/main/java']).split('\n').filter((f) => f.endsWith('.java'));
  const read = (f: string): string => git(dir, ['show', `HEAD:${f}`]);
  const types = new Map<string, TypeDecl | EnumDecl>();
  const services = new Map<string, ServiceDecl & { extends?: string[] }>();
  const mixins = new Map<string, Record<string, MethodDecl['params'][string]>>();
  for (const file of files) {
    const source = read(file);
    if (file.includes('/types/')) {
      const parsed = parseType(source);
      if (parsed) types.set(...parsed);
    } else if (file.includes('/services/')) {
      const parsed = parseService(source);
      if (parsed) services.set(...parsed);
    } else if (file.includes('/mixins/')) {
      const parsed = parseType(source);
      if (parsed && parsed[1].kind === 'struct') {
        const params: Record<string, MethodDecl['params'][string]> = {};
        for (const m of members(block(stripComments(source), stripComments(source).indexOf('interface')).body)) {
          const decl = /^((?:@\w+\s+)*)(\w+)(\[\])?\s+(\w+)\s*\(\s*\)$/.exec(m.header.replace(/\s+/g, ' '));
          if (decl) params[snake(decl[4]!)] = { type: decl[2]!, list: decl[3] === '[]', in: /@In\b/.test(decl[1]!), out: /@Out\b/.test(decl[1]!) };
        }
        mixins.set(parsed[0], params);
      }
    }
  }

  // Walk the service tree along the engine's paths; collect the services and the types they carry.
  const usedServices = new Map<string, string>(); // path -> service
  for (const path of SERVICE_PATHS) {
    let service = ROOT_SERVICE;
    let at = '';
    usedServices.set(at, service);
    for (const segment of path.split('/')) {
      const decl = services.get(service)!;
      const entry = segment === '{id}' ? Object.values(decl.locators).find((l) => l.id) : decl.locators[segment];
      if (!entry || entry.id !== (segment === '{id}')) throw new Error(`${service} has no locator for ${segment} (path ${path})`);
      service = entry.service;
      at = at ? `${at}/${segment}` : segment;
      usedServices.set(at, service);
    }
  }
  /** Per path: the service, and per method its input parameters and its output type ("Type" or "Type[]"). */
  const serviceOut: Record<string, { service: string; methods: Record<string, { in: Record<string, string>; out?: string }> }> = {};
  const typeName = (p: { type: string; list: boolean }): string => `${p.type}${p.list ? '[]' : ''}`;
  for (const [path, name] of usedServices) {
    const decl = services.get(name)!;
    const methods: (typeof serviceOut)[string]['methods'] = {};
    for (const [methodName, method] of Object.entries(decl.methods)) {
      const params: MethodDecl['params'] = {};
      const collect = (m: MethodDecl): void => {
        for (const base of m.extends) {
          if (mixins.has(base)) Object.assign(params, mixins.get(base));
          else if (decl.methods[base]) collect(decl.methods[base]!);
        }
        Object.assign(params, m.params);
      };
      collect(method);
      const inputs = Object.fromEntries(Object.entries(params).filter(([, p]) => p.in).map(([n, p]) => [n, typeName(p)]));
      const output = Object.values(params).find((p) => p.out);
      methods[methodName] = { in: inputs, ...(output ? { out: typeName(output) } : {}) };
    }
    serviceOut[path] = { service: name, methods };
  }
  // The listed types, whole, and the enums their attributes use.
  const typeOut: Record<string, { attributes: Record<string, string> } | { values: string[] }> = {};
  for (const name of TYPES) {
    const decl = types.get(name);
    if (!decl || decl.kind !== 'struct') throw new Error(`type ${name} not found in the model`);
    const attributes: TypeDecl['attributes'] = {};
    const collect = (t: TypeDecl): void => {
      for (const base of t.extends) {
        const b = types.get(base);
        if (b?.kind === 'struct') collect(b);
      }
      Object.assign(attributes, t.attributes);
    };
    collect(decl);
    typeOut[name] = { attributes: Object.fromEntries(Object.entries(attributes).map(([n, a]) => [n, typeName(a)])) };
    for (const a of Object.values(attributes)) {
      const target = types.get(a.type);
      if (target?.kind === 'enum') typeOut[a.type] = { values: target.values };
    }
  }
  const sorted = <T>(record: Record<string, T>): Record<string, T> => Object.fromEntries(Object.entries(record).sort(([a], [b]) => a.localeCompare(b)));
  const lines = (record: Record<string, unknown>): string =>
    Object.entries(sorted(record)).map(([k, v]) => `  ${JSON.stringify(k)}: ${JSON.stringify(v)}`).join(',\n');
  process.stdout.write(
    '{\n' +
      ` "source": ${JSON.stringify({ repository: 'https://github.com/oVirt/ovirt-engine-api-model', commit, paths: ['src/main/java/types', 'src/main/java/services', 'src/main/java/mixins'] })},\n` +
      ` "note": ${JSON.stringify('Generated by test/ovirt-contract/extract-model.ts. Element names snake_case, enum values lower case, paths relative to /ovirt-engine/api with {id} for an id.')},\n` +
      // Not types of the model but its conventions (src/main/java/003-CommonConcepts.adoc): an error
      // answer is <fault> with <reason> and <detail>; an action's body is <action>.
      ` "conventions": ${JSON.stringify({ fault: ['reason', 'detail'], action: [] })},\n` +
      ` "types": {\n${lines(typeOut)}\n },\n` +
      ` "services": {\n${lines(serviceOut)}\n }\n}\n`,
  );
}

main();
