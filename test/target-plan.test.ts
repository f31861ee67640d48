/**
 * Restore target planning (engine/restore/target-plan.ts) as a pure function: which disk goes where, into a
 * directory or not, which rollbacks a target can take, what is refused before anything is opened, and what
 * is checked once the paths are known (checkExisting). No repository, no root, no qemu: the facts of the
 * paths are given.
 */
import { describe, expect, test } from 'vitest';
import { join } from 'node:path';
import { checkExisting, planTargets, type PathFacts, type PathKind, type PlanRequest, type TargetPlan } from '../dist/engine/restore/target-plan.js';
import type { BackupRecord, DiskRecord } from '../dist/repo-format/backup-record.js';
import type { RestoreTarget } from '../dist/engine/restore/request.js';
import type { Remedy } from '../dist/engine/errors.js';
import { EngineError } from '../dist/repo-format/errors.js';

const record = (...names: string[]): BackupRecord => ({ id: 'b'.repeat(32), disks: names.map((name) => ({ name, size: 1 << 20 }) as DiskRecord) }) as BackupRecord;
const facts = (known: Record<string, PathKind>): PathFacts => (path) => known[path] ?? 'missing';
const plan = (rec: BackupRecord, target: RestoreTarget, extra: Partial<PlanRequest> = {}, known: Record<string, PathKind> = {}): TargetPlan =>
  planTargets(rec, { target, force: false, ...extra }, facts(known));

/** Where each disk goes, as [disk, how it is opened, where]. */
const where = (p: TargetPlan): string[][] => p.targets.map((t) => [t.disk.name, t.opening.kind, 'path' in t.opening ? t.opening.path : 'uri' in t.opening ? t.opening.uri : t.opening.describe]);

function refusal(run: () => unknown): EngineError {
  try {
    run();
  } catch (error) {
    expect(error).toBeInstanceOf(EngineError);
    // A library caller is never told to pass a command-line flag.
    expect((error as EngineError).message).not.toMatch(/--[a-z]/);
    return error as EngineError;
  }
  throw new Error('expected a refusal');
}

describe('a path target: what is there decides', () => {
  test('one disk to a new or existing file or device; a named disk into an existing directory', () => {
    expect(where(plan(record('os'), { kind: 'path', path: '/t/os.raw' }))).toEqual([['os', 'local', '/t/os.raw']]);
    expect(where(plan(record('os'), { kind: 'path', path: '/dev/sdx' }, {}, { '/dev/sdx': 'device' }))).toEqual([['os', 'local', '/dev/sdx']]);
    expect(where(plan(record('os', 'data'), { kind: 'path', path: '/t' }, { disk: 'data' }, { '/t': 'directory' }))).toEqual([['data', 'local', '/t/data']]);
    expect(where(plan(record('os', 'data'), { kind: 'path', path: '/t/d.raw' }, { disk: 'data' }))).toEqual([['data', 'local', '/t/d.raw']]);
    expect(plan(record('os'), { kind: 'path', path: '/t/os.raw' }).directory).toBeNull();
  });

  test('every disk of a backup with several into a directory, created when new; a file there is refused', () => {
    const into = plan(record('os', 'data'), { kind: 'path', path: '/t/vm' });
    expect(where(into)).toEqual([['os', 'local', '/t/vm/os'], ['data', 'local', '/t/vm/data']]);
    expect(into.directory).toEqual({ path: '/t/vm', create: true });
    expect(plan(record('os', 'data'), { kind: 'path', path: '/t/vm' }, {}, { '/t/vm': 'directory' }).directory).toEqual({ path: '/t/vm', create: false });
    const refused = refusal(() => plan(record('os', 'data'), { kind: 'path', path: '/t/vm.raw' }, {}, { '/t/vm.raw': 'file' }));
    expect([refused.code, refused.message]).toEqual(['ENGINE_INVALID_ARGUMENT', `backup ${'b'.repeat(32)} has 2 disks`]);
    expect(refused.details.remedies).toEqual([{ kind: 'choose-disk', otherwise: 'into-directory' }] satisfies Remedy[]);
  });

  test('two disks whose files would collide are refused; a disk that is not there is named', () => {
    const collide = refusal(() => plan(record('a/b', 'a\\b'), { kind: 'path', path: '/t/vm' }));
    expect(collide.details.remedies).toEqual([{ kind: 'choose-disk', otherwise: 'one-by-one' }]);
    expect(refusal(() => plan(record('os'), { kind: 'path', path: '/t/x' }, { disk: 'data' })).code).toBe('ENGINE_DISK_NOT_FOUND');
  });
});

describe('the other kinds of target', () => {
  test('file: never a device or a directory', () => {
    expect(where(plan(record('os'), { kind: 'file', path: '/t/os.raw' }, {}, { '/t/os.raw': 'file' }))).toEqual([['os', 'local', '/t/os.raw']]);
    expect(refusal(() => plan(record('os'), { kind: 'file', path: '/dev/sdx' }, {}, { '/dev/sdx': 'device' })).code).toBe('ENGINE_TARGET_UNWRITABLE');
    expect(refusal(() => plan(record('os'), { kind: 'file', path: '/t' }, {}, { '/t': 'directory' })).code).toBe('ENGINE_TARGET_UNWRITABLE');
  });

  test('device: never created (a mistyped /dev name does not become a file); blank when the caller just made it', () => {
    expect(refusal(() => plan(record('os'), { kind: 'device', path: '/dev/sdx' })).message).toContain('never created');
    const blank = plan(record('os'), { kind: 'device', path: '/dev/vdb', blank: true }, {}, { '/dev/vdb': 'device' });
    expect(blank.targets[0]!.opening).toEqual({ kind: 'local', path: '/dev/vdb', blank: true });
    expect(refusal(() => plan(record('os'), { kind: 'device', path: '/t' }, {}, { '/t': 'directory' })).code).toBe('ENGINE_TARGET_UNWRITABLE');
  });

  test('directory: also for one disk; refused over a file', () => {
    const one = plan(record('os'), { kind: 'directory', path: '/t/out' });
    expect([where(one), one.directory]).toEqual([[['os', 'local', '/t/out/os']], { path: '/t/out', create: true }]);
    expect(refusal(() => plan(record('os'), { kind: 'directory', path: '/t/f' }, {}, { '/t/f': 'file' })).code).toBe('ENGINE_TARGET_UNWRITABLE');
  });

  test('nbd and qcow2 take one disk: the only one, or the one named', () => {
    expect(where(plan(record('os'), { kind: 'nbd', uri: 'nbd://h/e' }))).toEqual([['os', 'nbd', 'nbd://h/e']]);
    expect(where(plan(record('os', 'data'), { kind: 'qcow2', path: '/t/d.qcow2' }, { disk: 'data' }))).toEqual([['data', 'qcow2', '/t/d.qcow2']]);
    const many = refusal(() => plan(record('os', 'data'), { kind: 'nbd', uri: 'nbd://h/e' }));
    expect(many.details.remedies).toEqual([{ kind: 'choose-disk', into: 'nbd://h/e' }]);
  });

  test('custom: every disk or the one named, opened by the caller', () => {
    const open = async (): Promise<never> => {
      throw new Error('not opened while planning');
    };
    expect(where(plan(record('os', 'data'), { kind: 'custom', describe: 'upload', open }))).toEqual([['os', 'custom', 'upload'], ['data', 'custom', 'upload']]);
    expect(refusal(() => plan(record('os'), { kind: 'custom', describe: 'upload', open }, { disk: 'x' })).code).toBe('ENGINE_DISK_NOT_FOUND');
  });
});

describe('rollback policies and what is already there', () => {
  test('a qcow2 target is new: no rollback; a bitmap rollback needs an NBD target', () => {
    expect(refusal(() => plan(record('os'), { kind: 'qcow2', path: '/t/x.qcow2' }, { rollback: { kind: 'compare' } })).code).toBe('ENGINE_INVALID_ARGUMENT');
    expect(refusal(() => plan(record('os'), { kind: 'path', path: '/t/x' }, { rollback: { kind: 'bitmap', bitmap: 'b1' } }, { '/t/x': 'file' })).message).toContain('needs an NBD target');
    expect(plan(record('os'), { kind: 'nbd', uri: 'nbd://h/e' }, { rollback: { kind: 'bitmap', bitmap: 'b1' } }).write).toEqual({ kind: 'bitmap', bitmap: 'b1' });
  });

  test('a rollback needs existing targets', () => {
    const missing = plan(record('os'), { kind: 'path', path: '/t/x' }, { rollback: { kind: 'compare' } });
    expect(refusal(() => checkExisting(missing)).message).toBe('a rollback writes over an existing target; /t/x does not exist');
    const newDirectory = plan(record('os', 'data'), { kind: 'path', path: '/t/vm' }, { rollback: { kind: 'compare' } });
    expect(refusal(() => checkExisting(newDirectory)).message).toContain('directory /t/vm does not exist');
    expect(() => checkExisting(plan(record('os'), { kind: 'path', path: '/t/x' }, { rollback: { kind: 'compare' } }, { '/t/x': 'file' }))).not.toThrow();
  });

  test('a same-named file in the directory is somebody\'s data: refused unless forced or rolled back', () => {
    const known = { '/t/vm': 'directory', [join('/t/vm', 'data')]: 'file' } as const;
    const refused = refusal(() => checkExisting(plan(record('os', 'data'), { kind: 'path', path: '/t/vm' }, {}, known)));
    expect(refused.code).toBe('ENGINE_TARGET_HOLDS_DATA');
    expect(refused.details.remedies).toEqual([{ kind: 'override', option: 'force', to: 'overwrite it' }]);
    expect(() => checkExisting(plan(record('os', 'data'), { kind: 'path', path: '/t/vm' }, { force: true }, known))).not.toThrow();
    expect(() => checkExisting(plan(record('os', 'data'), { kind: 'path', path: '/t/vm' }, { rollback: { kind: 'compare' } }, { ...known, '/t/vm/os': 'file' }))).not.toThrow();
  });
});
