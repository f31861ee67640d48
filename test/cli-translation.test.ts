/**
 * The CLI's translation between its flags and the engine's typed API, both ways: the backup and restore
 * flags into typed requests (cli/commands/backup-request.ts, restore-request.ts), and the engine's ways out
 * of an error (`details.remedies`, in the API's terms) into flag wording (cli/error-wording.ts). Pure: no
 * repository, no root, no qemu.
 */
import { describe, expect, test } from 'vitest';
import { backupRequest, chainPolicy } from '../dist/cli/commands/backup-request.js';
import { checkOvirtRestoreFlags, restoreRequest } from '../dist/cli/commands/restore-request.js';
import { cliMessage, remedyText, unlockWording } from '../dist/cli/error-wording.js';
import { EngineError, InvalidArgumentError, NotARepositoryError, PassphraseRequiredError, RepositoryLockedError } from '../dist/repo-format/errors.js';
import { TargetHoldsDataError, withRemedies, type Remedy } from '../dist/engine/errors.js';
import { planListen } from '../dist/engine/serve/listen-policy.js';
import type { UnlockReport } from '../dist/engine/catalogue/unlock.js';

function refused(run: () => unknown): string {
  try {
    run();
  } catch (error) {
    expect((error as EngineError).code).toBe('ENGINE_INVALID_ARGUMENT');
    return (error as Error).message;
  }
  throw new Error('expected a refusal');
}

describe('restore flags → RestoreTarget, RollbackPolicy, WritePolicy', () => {
  test('--to PATH, --to NBD URI, --to-qcow2 FILE', () => {
    expect(restoreRequest({ to: '/var/tmp/d.raw' })).toEqual({ target: { kind: 'path', path: '/var/tmp/d.raw' }, rollback: undefined, write: { force: false } });
    expect(restoreRequest({ to: 'nbd+unix:///d?socket=/run/s.sock', force: true }).target).toEqual({ kind: 'nbd', uri: 'nbd+unix:///d?socket=/run/s.sock' });
    expect(restoreRequest({ toQcow2: 'd.qcow2' }).target).toEqual({ kind: 'qcow2', path: 'd.qcow2' });
    expect(restoreRequest({ to: '/dev/vdc', force: true }).write).toEqual({ force: true });
  });

  test('--only-changed is a compare rollback; with --since-bitmap, a bitmap one', () => {
    expect(restoreRequest({ to: '/dev/vdc', onlyChanged: true }).rollback).toEqual({ kind: 'compare' });
    expect(restoreRequest({ to: 'nbd://h/e', onlyChanged: true, sinceBitmap: 'ck1' }).rollback).toEqual({ kind: 'bitmap', bitmap: 'ck1' });
  });

  test('combinations that make no sense are refused in the flags\' words', () => {
    expect(refused(() => restoreRequest({}))).toBe('give exactly one target: --to PATH|URI or --to-qcow2 FILE');
    expect(refused(() => restoreRequest({ to: 'a', toQcow2: 'b' }))).toBe('give exactly one target: --to PATH|URI or --to-qcow2 FILE');
    expect(refused(() => restoreRequest({ to: 'nbd://h/e', sinceBitmap: 'ck1' }))).toBe('--since-bitmap goes with --only-changed');
    expect(refused(() => restoreRequest({ toQcow2: 'x.qcow2', onlyChanged: true }))).toBe('--only-changed rolls back an existing target; --to-qcow2 creates a new one');
    expect(refused(() => restoreRequest({ to: '/dev/vdc', onlyChanged: true, sinceBitmap: 'ck1' }))).toMatch(/^--since-bitmap needs an NBD target/);
    expect(refused(() => restoreRequest({ to: 's3://bucket/x' }))).toMatch(/^--to s3:\/\/bucket\/x: looks like a URL/);
    expect(refused(() => restoreRequest({ toQcow2: 'sftp://h/x.qcow2' }))).toMatch(/^--to-qcow2 sftp:\/\/h\/x.qcow2: looks like a URL/);
  });

  test('restore --ovirt: a new VM or an existing one, and how the disks are written', () => {
    expect(() => checkOvirtRestoreFlags({ newVm: 'v', appliance: 'a' })).not.toThrow();
    expect(() => checkOvirtRestoreFlags({ toVm: 'v', disk: 'os', via: 'transfer' })).not.toThrow();
    expect(refused(() => checkOvirtRestoreFlags({ newVm: 'v' }))).toBe('--ovirt needs --appliance NAME (this backup appliance), or --via transfer');
    expect(refused(() => checkOvirtRestoreFlags({ appliance: 'a' }))).toBe('restore to oVirt needs either --new-vm NAME or --to-vm NAME');
    expect(refused(() => checkOvirtRestoreFlags({ toVm: 'v', appliance: 'a' }))).toBe('--to-vm restores one disk: name it with --disk');
  });
});

describe('backup flags → BackupFrom, ChainPolicy', () => {
  test('--source (a path or an NBD URI) then --image, each with its --disk-name, in that order', () => {
    expect(backupRequest({ source: ['/dev/vdb', 'nbd://h/e'], image: ['/vm/c.qcow2'], diskName: ['b', 'e', 'c'], name: 'vm' })).toEqual({
      from: { kind: 'disks', disks: [{ kind: 'raw', path: '/dev/vdb', name: 'b' }, { kind: 'nbd', uri: 'nbd://h/e', name: 'e' }, { kind: 'image', path: '/vm/c.qcow2', name: 'c' }] },
      chain: { mode: 'auto' },
      name: 'vm',
    });
    expect(backupRequest({ source: ['/dev/vdb'] }).from).toEqual({ kind: 'disks', disks: [{ kind: 'raw', path: '/dev/vdb' }] });
    expect(backupRequest({ libvirt: 'vm42', differential: true })).toEqual({ from: { kind: 'libvirt', domain: 'vm42' }, chain: { mode: 'differential' }, name: undefined });
  });

  test('--full, --incremental, --differential, --auto', () => {
    expect([chainPolicy({ full: true }), chainPolicy({ incremental: true }), chainPolicy({ differential: true }), chainPolicy({ auto: true }), chainPolicy({})].map((p) => p.mode)).toEqual(['full', 'incremental', 'differential', 'auto', 'auto']);
  });

  test('combinations that make no sense are refused in the flags\' words', () => {
    expect(refused(() => backupRequest({}))).toBe('name at least one disk: --source PATH|URI, --image QCOW2 or --libvirt DOMAIN');
    expect(refused(() => backupRequest({ libvirt: 'vm', source: ['/x'] }))).toBe('--libvirt backs up all disks of the domain: do not combine it with --source or --image');
    expect(refused(() => backupRequest({ libvirt: 'vm', diskName: ['a'] }))).toBe('--libvirt names each disk after its target (vda, sdb…): --disk-name does not apply');
    expect(refused(() => backupRequest({ source: ['/a', '/b'], diskName: ['a'] }))).toBe('1 disk names for 2 disks: give one --disk-name per --source and --image, in that order');
    expect(refused(() => backupRequest({ source: ['/a'], diskName: ['x/y'] }))).toMatch(/^--disk-name "x\/y" is not allowed/);
    expect(refused(() => backupRequest({ source: ['/a'], name: 'a\u0007b' }))).toMatch(/^--name "a\\x07b" is not allowed/);
    expect(refused(() => backupRequest({ source: ['s3://b/d.img'] }))).toMatch(/^--source s3:\/\/b\/d.img: looks like a URL/);
    expect(refused(() => backupRequest({ image: ['https://h/vm.qcow2'] }))).toMatch(/^--image https:\/\/h\/vm.qcow2: looks like a URL/);
  });
});

describe("the engine's remedies in the CLI's words", () => {
  /** Each remedy beside its wording. */
  const every: [Remedy, string][] = [
    [{ kind: 'passphrase' }, 'give its passphrase with --password-file FILE, in a file named by ENGINE_PASSWORD_FILE, or in ENGINE_PASSWORD'],
    [{ kind: 'unlock', repo: '/r', force: true, removes: 'the lock', when: 'if it is not an engine process' }, 'if it is not an engine process, `engine unlock --repo /r --force` removes the lock'],
    [{ kind: 'unlock', repo: '/r', force: false, removes: 'the lock' }, '`engine unlock --repo /r` removes the lock'],
    [{ kind: 'repair', repo: '/r', does: 'rebuilds the config from them' }, '`engine repair --repo /r` rebuilds the config from them'],
    [{ kind: 'repair', does: 'restores the backup' }, '`engine repair` restores the backup'],
    [{ kind: 'override', option: 'force', to: 'overwrite it' }, 'give --force to overwrite it'],
    [{ kind: 'rollback' }, '--only-changed rolls it back writing only what differs'],
    [{ kind: 'rollback-through-nbd' }, 'roll it back through an NBD export of it (--to nbd+unix://… --only-changed)'],
    [{ kind: 'compare-every-block' }, 'use --only-changed without --since-bitmap to compare every block'],
    [{ kind: 'new-image' }, 'restore with --to-qcow2 NEW'],
    [{ kind: 'choose-disk', into: 'nbd://h/e' }, 'name the one to restore into nbd://h/e with --disk'],
    [{ kind: 'choose-disk', otherwise: 'into-directory' }, 'name one with --disk, or restore them all into a directory'],
    [{ kind: 'choose-disk', otherwise: 'one-by-one' }, 'restore them one by one with --disk NAME --to FILE'],
    [{ kind: 'name-disks' }, 'give distinct --disk-name values'],
    [{ kind: 'disk-kind', use: 'raw' }, 'back up raw images with --source'],
    [{ kind: 'disk-kind', use: 'image' }, "back up a stopped VM's qcow2 images with --image"],
    [{ kind: 'unprotect', backup: 'abc' }, '`engine unprotect abc` first, if it really is to go'],
    [{ kind: 'ovirt-ca' }, "give --ca-file with the engine's CA (https://ENGINE/ovirt-engine/services/pki-resource?resource=ca-certificate&format=X509-PEM-CA)"],
    [{ kind: 'ovirt-address' }, "give the engine's own https:// address as --ovirt"],
    [{ kind: 'ovirt-credentials' }, 'give them with --ovirt-credentials FILE (or ENGINE_OVIRT_USER and ENGINE_OVIRT_PASSWORD), never in the URL'],
    [{ kind: 'ovirt-https' }, "use https:// (with --ca-file for the engine's CA), or add --insecure-http if this network is trusted"],
    [{ kind: 'serve-securely' }, 'give --tls-certificates DIR (ca-cert.pem, server-cert.pem, server-key.pem) or --tls-psk-file FILE, use --socket PATH, or add --insecure to serve in clear to anyone who can connect'],
    [{ kind: 'socket-path', because: 'not-a-socket' }, 'choose another --socket path'],
    [{ kind: 'socket-path', because: 'in-use' }, 'stop it or choose another --socket path'],
    [{ kind: 'socket-path', because: 'run-dir' }, 'set ENGINE_RUN_DIR or give --socket PATH'],
  ];

  test('every kind has its wording', () => {
    for (const [remedy, wording] of every) expect(remedyText(remedy)).toBe(wording);
  });

  test("errors: the engine's message states the condition, the CLI's adds the way out", () => {
    const holds = new TargetHoldsDataError('/dev/vdc', 'an ext4 filesystem');
    expect(holds.message).toBe('refusing to overwrite /dev/vdc: it holds an ext4 filesystem');
    expect(cliMessage(holds)).toBe('refusing to overwrite /dev/vdc: it holds an ext4 filesystem; give --force to overwrite it');
    const encrypted = new PassphraseRequiredError('/r');
    expect(encrypted.message).toBe('repository /r is encrypted, and no passphrase was given');
    expect(cliMessage(encrypted)).toBe('repository /r is encrypted, and no passphrase was given: give its passphrase with --password-file FILE, in a file named by ENGINE_PASSWORD_FILE, or in ENGINE_PASSWORD');
    const lost = new NotARepositoryError('/r', 'it has no config file', { condition: "it has a repository's packs/ and backups/", remedy: { kind: 'repair', repo: '/r', does: 'rebuilds the config from them' } });
    expect(cliMessage(lost)).toBe("/r is not an engine repository: it has no config file; it has a repository's packs/ and backups/: `engine repair --repo /r` rebuilds the config from them");
    const locked = new RepositoryLockedError('/r', undefined, { remedy: { kind: 'unlock', repo: '/r', force: true, removes: 'the lock', when: 'if no engine process uses the repository' } });
    expect(cliMessage(locked)).toBe('repository /r is locked by another process (its lock file could not be read); if no engine process uses the repository, `engine unlock --repo /r --force` removes the lock');
    const two = new InvalidArgumentError('refusing to write /x: it is the image …', withRemedies({}, { kind: 'new-image' }, { kind: 'override', option: 'force', to: 'overwrite it all the same' }));
    expect(cliMessage(two)).toBe('refusing to write /x: it is the image …; restore with --to-qcow2 NEW; give --force to overwrite it all the same');
    expect(cliMessage(new EngineError('ENGINE_INTERNAL', 'odd', { remedies: [{ kind: 'no-such-kind' }, 'junk'] }))).toBe('odd');
    expect(cliMessage(new Error('plain'))).toBe('plain');
  });

  test("serve's listen options that do not go together: the API's fields in the engine, the flags in the CLI", () => {
    const cases: [Parameters<typeof planListen>[0], string][] = [
      [{ tls: { certificates: '/c', pskFile: '/p' } }, 'give one of --tls-certificates DIR or --tls-psk-file FILE, not both'],
      [{ socket: '/s', port: 1 }, 'give one of --socket PATH or --port N, not both'],
      [{ host: 'h' }, '--host is the address of a TCP server: give --port N too'],
      [{ insecure: true }, '--insecure is for a TCP server (--port); a Unix socket is private (0600) already'],
      [{ port: 1, insecure: true, tls: { pskFile: '/p' } }, '--insecure serves without TLS: leave it out with --tls-certificates or --tls-psk-file'],
      [{ port: 0 }, 'serving over TCP (127.0.0.1 port 0) needs TLS with client authentication: give --tls-certificates DIR (ca-cert.pem, server-cert.pem, server-key.pem) or --tls-psk-file FILE, use --socket PATH, or add --insecure to serve in clear to anyone who can connect'],
    ];
    for (const [request, cli] of cases) {
      let error: unknown;
      try {
        planListen(request);
      } catch (e) {
        error = e;
      }
      expect((error as Error).message).not.toMatch(/--[a-z]/);
      expect(cliMessage(error)).toBe(cli);
    }
  });

  test("unlock's report: what it kept, worded", () => {
    const report: UnlockReport = {
      repo: '/r',
      force: false,
      lock: { file: 'lock', holder: null, state: 'unreadable', removed: false, message: 'kept the lock of an unknown holder', remedies: [{ kind: 'unlock', repo: '/r', force: true, removes: 'the lock', when: 'if no engine process uses the repository' }] },
      registrations: [{ file: 'readers/x.json', holder: null, state: 'unreadable', removed: false, message: 'kept readers/x.json: it cannot be read', remedies: [{ kind: 'unlock', repo: '/r', force: true, removes: 'it' }] }],
      locked: true,
    };
    const worded = unlockWording(report);
    expect(worded.lock!.message).toBe('kept the lock of an unknown holder; if no engine process uses the repository, `engine unlock --repo /r --force` removes the lock');
    expect(worded.registrations[0]!.message).toBe('kept readers/x.json: it cannot be read; `engine unlock --repo /r --force` removes it');
  });
});
