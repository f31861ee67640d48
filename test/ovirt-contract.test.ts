/**
 * The engine's oVirt vocabulary checked against oVirt's API model (test/ovirt-contract/model-extract.json,
 * extracted from ovirt-engine-api-model's types/ and services/ with its commit): every element name the
 * engine's parsers read, every enum value it compares with or sends, and — in every oVirt test file — every
 * request it made to the simulator (path, method, query parameters, body elements and values). Here also:
 * the checker itself catches a misspelt element, an invented enum value, a wrong path or parameter.
 */
import { describe, expect, test } from 'vitest';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import * as vocabulary from '../dist/engine/ovirt/vocabulary.js';
import { contractProblems, knownElementNames, model, requestProblems } from './ovirt-contract/contract.js';

const OVIRT_DIR = fileURLToPath(new URL('../engine/ovirt/', import.meta.url));
/** Modules that read other documents than the REST API's XML (OVF, imageio's JSON) or define the accessors. */
const NOT_API = new Set(['xml.ts', 'ovf.ts', 'vocabulary.ts', 'imageio-connection.ts', 'imageio-source.ts', 'imageio-target.ts']);

/** Every literal element name passed to child(), children(), text() or attribute() in the engine's oVirt code. */
function namesRead(): { file: string; call: string; name: string }[] {
  const found: { file: string; call: string; name: string }[] = [];
  for (const file of readdirSync(OVIRT_DIR).filter((f) => f.endsWith('.ts') && !NOT_API.has(f))) {
    const source = readFileSync(join(OVIRT_DIR, file), 'utf8');
    for (const match of source.matchAll(/\b(child|children|text|attribute)\(/g)) {
      // The call's last argument, found by matching parentheses (calls nest: child(child(x, 'a'), 'b')).
      let depth = 0;
      let end = match.index + match[0].length - 1;
      for (; end < source.length; end += 1) {
        if (source[end] === '(') depth += 1;
        else if (source[end] === ')' && --depth === 0) break;
      }
      const last = /,\s*'([^']*)'\s*$/.exec(source.slice(match.index, end));
      if (last) found.push({ file, call: match[1]!, name: last[1]! });
    }
  }
  return found;
}

describe('the engine against oVirt\'s API model', () => {
  test('the extract names its source', () => {
    expect(model.source.repository).toBe('https://github.com/oVirt/ovirt-engine-api-model');
    expect(model.source.commit).toMatch(/^[0-9a-f]{40}$/);
  });

  test('every element name the parsers read is in the model', () => {
    const reads = namesRead();
    expect(reads.length).toBeGreaterThan(40);
    const known = knownElementNames();
    const unknown = reads.filter((r) => (r.call === 'attribute' ? r.name !== 'id' : !known.has(r.name)));
    expect(unknown).toEqual([]);
  });

  test('every enum value the engine compares with or sends is a value of that enum in the model', () => {
    const problems: string[] = [];
    let checked = 0;
    for (const [name, values] of Object.entries(vocabulary)) {
      if (typeof values !== 'object') continue;
      const type = model.types[name];
      if (!type || !('values' in type)) {
        problems.push(`${name} is not an enum of the model`);
        continue;
      }
      for (const value of Object.values(values as Record<string, string>)) {
        checked += 1;
        if (!type.values.includes(value)) problems.push(`${name}.${value} is not in the model (${type.values.join(', ')})`);
      }
    }
    expect(problems).toEqual([]);
    expect(checked).toBeGreaterThan(25);
  });

  test('the checker catches a misspelt element, an invented value, a wrong path, method or parameter', () => {
    const vm = 'vms/0b1c4e5e-0000-4000-8000-000000000001';
    const ok = { method: 'POST', path: `/ovirt-engine/api/${vm}/backups`, body: '<backup><from_checkpoint_id>c</from_checkpoint_id><disks><disk id="d"/></disks></backup>' };
    expect(requestProblems(ok)).toEqual([]);
    expect(requestProblems({ ...ok, body: '<backup><from_checkpointid>c</from_checkpointid></backup>' })).toEqual([
      `POST /ovirt-engine/api/${vm}/backups: backup/from_checkpointid: no such attribute of Backup`,
    ]);
    expect(requestProblems({ method: 'POST', path: '/ovirt-engine/api/imagetransfers', body: '<image_transfer><disk id="d"/><direction>download</direction><timeout_policy>abort</timeout_policy></image_transfer>' })).toEqual([
      'POST /ovirt-engine/api/imagetransfers: image_transfer/timeout_policy: "abort" is not a value of ImageTransferTimeoutPolicy (legacy, pause, cancel)',
    ]);
    expect(requestProblems({ method: 'POST', path: `/ovirt-engine/api/${vm}/backups/b/finalise`, body: '<action/>' })).toEqual([
      `POST /ovirt-engine/api/${vm}/backups/b/finalise: the model has no service at vms/{id}/backups/{id}/finalise`,
    ]);
    expect(requestProblems({ method: 'PUT', path: `/ovirt-engine/api/${vm}/checkpoints/c`, body: '' })).toEqual([
      `PUT /ovirt-engine/api/${vm}/checkpoints/c: VmCheckpointService has no method for PUT`,
    ]);
    expect(requestProblems({ method: 'GET', path: `/ovirt-engine/api/${vm}?allcontent=true`, body: '' })).toEqual([
      `GET /ovirt-engine/api/${vm}: ?allcontent is not a parameter of VmService.Get`,
    ]);
    expect(requestProblems({ method: 'POST', path: '/ovirt-engine/api/vms', body: '<vm><initialization><regenerate_ids>yes</regenerate_ids></initialization></vm>' })).toEqual([
      'POST /ovirt-engine/api/vms: vm/initialization/regenerate_ids: "yes" is not a Boolean',
    ]);
    expect(contractProblems([ok, ok])).toEqual([]);
  });
});
