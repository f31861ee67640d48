/**
 * `engine --server URL backup|restore|verify|prune|gc …` (SPEC.md 23.5): the command's flags become the body
 * of `POST /api/v1/jobs` on a running `engine server` instead of a local engine call; the job's events are
 * followed (progress on stderr, notices as notices), and its result printed as the local command prints it,
 * text or --json, with the same exit code (a failed job's code maps to the exit code as the local error would).
 *
 * `--repo` names a repository of the server's config. Paths (sources, targets, credentials files) are the
 * server's: given as absolute paths. The token comes from `--server-token-file FILE` or ENGINE_SERVER_TOKEN,
 * never from an argument (`ps` shows arguments to every user of the host).
 */
import { EngineError, InvalidArgumentError } from '../repo-format/errors.js';
import type { BackupRecord } from '../repo-format/backup-record.js';
import type { JobRecord } from '../engine/server/journal.js';
import { createProgress } from './progress.js';
import { forTerminal } from './terminal.js';
import { output, printNotice, interruptSignal } from './context.js';
import { EXIT } from './exit-codes.js';
import { printBackup, printGc, printJson, printPrune, printRestore, printVerify } from './output.js';
import type { RestoreResult } from '../engine/restore/restore.js';
import type { VerifyReport } from '../engine/verify/verify.js';
import type { PruneReport } from '../engine/retention/prune.js';
import type { GcReport } from '../engine/gc/gc.js';

export const REMOTE_COMMANDS = ['backup', 'restore', 'verify', 'prune', 'gc'] as const;
export type RemoteKind = (typeof REMOTE_COMMANDS)[number];

/** Set from the global flags before a command runs (main.ts). */
export const remote: { server: string | undefined; tokenFile: string | undefined } = { server: undefined, tokenFile: undefined };

/** Whether this run goes to a server. */
export function isRemote(): boolean {
  return remote.server !== undefined;
}

/** The flags a command was given that only a local run has: refused, by their names. */
export function refuseLocalOnly(flags: Record<string, unknown>, names: readonly string[]): void {
  const given = names.filter((name) => flags[name] !== undefined && flags[name] !== false);
  if (given.length > 0) {
    const shown = given.map((name) => `--${name.replace(/[A-Z]/g, (c) => `-${c.toLowerCase()}`)}`);
    throw new InvalidArgumentError(`${shown.join(', ')}: not with --server (${given.includes('passwordFile') ? "the repository's passphrase is the server's, from its config" : 'a local run only'})`);
  }
}

async function token(): Promise<string | undefined> {
  if (remote.tokenFile !== undefined) {
    const { readSecretFile } = await import('../engine/host/secret-file.js');
    const secret = await readSecretFile(remote.tokenFile, `--server-token-file ${remote.tokenFile}`);
    for (const warning of secret.warnings) printNotice(warning);
    const text = secret.bytes.toString('utf8').trim();
    if (text === '' || /\s/.test(text)) throw new InvalidArgumentError(`--server-token-file ${remote.tokenFile}: expected one token on one line`);
    return text;
  }
  const fromEnv = process.env.ENGINE_SERVER_TOKEN?.trim();
  return fromEnv === '' ? undefined : fromEnv;
}

/** Runs the job on the server and prints its result as the local command `kind` would. */
export async function runRemote(body: Record<string, unknown> & { kind: RemoteKind; repository: string }): Promise<void> {
  const { runServerJob } = await import('../engine/server/client.js');
  const progress = createProgress({ json: output.json });
  const job: JobRecord = await runServerJob({ url: remote.server!, token: await token() }, body, {
    signal: interruptSignal(),
    onProgress: (p) => progress.update(p.phase, p.done, p.total, p.unit),
    onLog: printNotice,
  });
  progress.done();
  if (job.state !== 'succeeded' || job.result === null) {
    const error = job.error ?? { code: 'ENGINE_INTERNAL', message: `job ${job.id} ended ${job.state} without an error`, details: {} };
    throw new EngineError(error.code as never, error.message, { ...error.details, job: job.id });
  }
  const result = job.result;
  if (output.json) printJson(result);
  else printText(body.kind, result);
  if (body.kind === 'verify' && result.ok === false) process.exitCode = EXIT.integrity;
}

function printText(kind: RemoteKind, result: Record<string, unknown>): void {
  switch (kind) {
    case 'backup':
      printBackup(forTerminal(recordOf(result)));
      return;
    case 'restore':
      printRestore(forTerminal({ ...result, backup: { id: String(result.backup) } } as unknown as RestoreResult));
      return;
    case 'verify':
      printVerify(forTerminal(result as unknown as VerifyReport));
      return;
    case 'prune':
      printPrune(forTerminal(result as unknown as PruneReport));
      return;
    case 'gc':
      printGc(forTerminal(result as unknown as GcReport));
  }
}

/** What printBackup reads of a record, from `backup --json`'s object (each disk's stats spread in it: diskJson). */
function recordOf(json: Record<string, unknown>): BackupRecord {
  const disks = (json.disks as Record<string, unknown>[]).map((d) => ({ ...d, stats: d }));
  return { ...json, disks } as unknown as BackupRecord;
}

/** `backup`'s flags as the API's backup body (job-requests.ts). */
export function backupBody(repository: string, request: { name: string | undefined; chain: { mode: string }; from: { kind: string } & Record<string, unknown> }, workers: number | undefined): Record<string, unknown> & { kind: 'backup'; repository: string } {
  const from = request.from;
  const base = { kind: 'backup' as const, repository, mode: request.chain.mode, ...(request.name !== undefined ? { name: request.name } : {}), ...(workers !== undefined ? { workers } : {}) };
  if (from.kind === 'disks') return { ...base, disks: from.disks };
  if (from.kind === 'libvirt') {
    const quiesce = from.quiesce as { mode: string } | undefined;
    return { ...base, libvirt: { domain: from.domain, ...(quiesce ? { quiesce: quiesce.mode } : {}) } };
  }
  throw new InvalidArgumentError('with --server a backup reads --source, --image or --libvirt (oVirt: see the API\'s ovirt body)');
}

export function remoteRepository(repo: string | undefined): string {
  if (!repo) throw new InvalidArgumentError("with --server, --repo names a repository of the server's config");
  return repo;
}
