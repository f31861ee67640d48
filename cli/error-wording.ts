/**
 * The CLI's wording of what a caller can do about an engine error, or about what unlock kept: the engine
 * carries each way out in the API's terms (`details.remedies`, engine/errors.ts `Remedy`; a refused
 * combination of serve's listen options as `details.conflict`) and states only the condition in its
 * message. This is the one place where they become this CLI's flags and commands.
 */
import { EngineError } from '../repo-format/errors.js';
import type { Remedy } from '../engine/errors.js';
import type { ListenConflict } from '../engine/serve/listen-policy.js';
import type { UnlockItem, UnlockReport } from '../engine/catalogue/unlock.js';

type Wording = { [K in Remedy['kind']]: (remedy: Extract<Remedy, { kind: K }>) => string };

const REMEDY_WORDING: Wording = {
  passphrase: () => 'give its passphrase with --password-file FILE, in a file named by ENGINE_PASSWORD_FILE, or in ENGINE_PASSWORD',
  unlock: (r) => `${r.when ? `${r.when}, ` : ''}\`engine unlock --repo ${r.repo}${r.force ? ' --force' : ''}\` removes ${r.removes}`,
  repair: (r) => `\`engine repair${r.repo === undefined ? '' : ` --repo ${r.repo}`}\` ${r.does}`,
  override: (r) => `give --${r.option} to ${r.to}`,
  rollback: () => '--only-changed rolls it back writing only what differs',
  'rollback-through-nbd': () => 'roll it back through an NBD export of it (--to nbd+unix://… --only-changed)',
  'compare-every-block': () => 'use --only-changed without --since-bitmap to compare every block',
  'new-image': () => 'restore with --to-qcow2 NEW',
  'choose-disk': (r) =>
    r.otherwise === 'one-by-one'
      ? 'restore them one by one with --disk NAME --to FILE'
      : `name ${r.into === undefined ? 'one' : `the one to restore into ${r.into}`} with --disk${r.otherwise === 'into-directory' ? ', or restore them all into a directory' : ''}`,
  'name-disks': () => 'give distinct --disk-name values',
  'disk-kind': (r) => (r.use === 'raw' ? 'back up raw images with --source' : "back up a stopped VM's qcow2 images with --image"),
  unprotect: (r) => `\`engine unprotect ${r.backup}\` first, if it really is to go`,
  'ovirt-ca': () => "give --ca-file with the engine's CA (https://ENGINE/ovirt-engine/services/pki-resource?resource=ca-certificate&format=X509-PEM-CA)",
  'ovirt-address': () => "give the engine's own https:// address as --ovirt",
  'ovirt-credentials': () => 'give them with --ovirt-credentials FILE (or ENGINE_OVIRT_USER and ENGINE_OVIRT_PASSWORD), never in the URL',
  'ovirt-https': () => "use https:// (with --ca-file for the engine's CA), or add --insecure-http if this network is trusted",
  'serve-securely': () => 'give --tls-certificates DIR (ca-cert.pem, server-cert.pem, server-key.pem) or --tls-psk-file FILE, use --socket PATH, or add --insecure to serve in clear to anyone who can connect',
  'socket-path': (r) => (r.because === 'run-dir' ? 'set ENGINE_RUN_DIR or give --socket PATH' : `${r.because === 'in-use' ? 'stop it or ' : ''}choose another --socket path`),
};

/** What joins a remedy to the message: a colon where it answers the condition directly, else a semicolon. */
const COLON: ReadonlySet<Remedy['kind']> = new Set(['passphrase', 'repair', 'unprotect', 'ovirt-address', 'serve-securely', 'socket-path']);

/** serve's listen options that do not go together, in this CLI's words. */
const CONFLICT_WORDING: Record<ListenConflict, string> = {
  'tls-both': 'give one of --tls-certificates DIR or --tls-psk-file FILE, not both',
  'socket-and-port': 'give one of --socket PATH or --port N, not both',
  'host-without-port': '--host is the address of a TCP server: give --port N too',
  'insecure-without-port': '--insecure is for a TCP server (--port); a Unix socket is private (0600) already',
  'insecure-with-tls': '--insecure serves without TLS: leave it out with --tls-certificates or --tls-psk-file',
};

export function remedyText(remedy: Remedy): string {
  return (REMEDY_WORDING[remedy.kind] as (r: Remedy) => string)(remedy);
}

/** `message` followed by each remedy in this CLI's words. */
export function wordRemedies(message: string, remedies: readonly Remedy[] | undefined): string {
  let text = message;
  for (const remedy of remedies ?? []) text += `${COLON.has(remedy.kind) ? ':' : ';'} ${remedyText(remedy)}`;
  return text;
}

/** The remedies an error's details carry, if they are the engine's (anything else is ignored). */
export function remediesOf(details: Readonly<Record<string, unknown>>): Remedy[] {
  const list = details.remedies;
  if (!Array.isArray(list)) return [];
  return list.filter((r): r is Remedy => typeof r === 'object' && r !== null && typeof (r as { kind?: unknown }).kind === 'string' && (r as { kind: string }).kind in REMEDY_WORDING);
}

/** An error's message as this CLI says it: a refused listen combination in its flags, remedies appended. */
export function cliMessage(error: unknown): string {
  if (!(error instanceof EngineError)) return error instanceof Error ? error.message : String(error);
  const conflict = error.details.conflict;
  if (typeof conflict === 'string' && conflict in CONFLICT_WORDING) return CONFLICT_WORDING[conflict as ListenConflict];
  return wordRemedies(error.message, remediesOf(error.details));
}

/** unlock's report with what it kept worded as this CLI's commands. */
export function unlockWording(report: UnlockReport): UnlockReport {
  const word = (item: UnlockItem): UnlockItem => ({ ...item, message: wordRemedies(item.message, item.remedies) });
  return { ...report, lock: report.lock && word(report.lock), registrations: report.registrations.map(word) };
}
