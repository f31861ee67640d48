/**
 * The writer registry: a process that writes into the repository while NOT holding the lock (gc copying
 * live chunks into new packs between its two locked phases) says so in `writers/<token>.json`. Its
 * temporary files are named `tmp/<token>.*`: whoever holds the lock and clears tmp/ leaves them alone
 * while the registration is live. There is at most one live gc: a second one is refused, naming the first.
 */
import { LAYOUT } from './constants.js';
import { RepositoryLockedError } from './errors.js';
import { lockedHint } from './lock.js';
import { listRegistrations, register, removeStaleRegistrations, type Registered, type Registration } from './registry.js';

export type WriterRegistration = Registration;

export async function registerWriter(root: string, command: string): Promise<Registered> {
  await removeStaleRegistrations(root, LAYOUT.writers);
  const { live } = await listRegistrations(root, LAYOUT.writers);
  const other = live.find((w) => !('unreadable' in w) && w.command === command) as Registration | undefined;
  if (other) {
    const holder = { pid: other.pid, hostname: other.hostname, since: other.since, command: other.command, ...(other.identity === undefined ? {} : { identity: other.identity }) };
    throw new RepositoryLockedError(root, holder, lockedHint(root, holder, `its registration ${LAYOUT.writers}/${other.token}.json`));
  }
  return register(root, LAYOUT.writers, command, []);
}

/** Tokens of live writers (an unreadable registration protects nothing: its token is unknown). */
export async function liveWriterTokens(root: string): Promise<string[]> {
  const { live } = await listRegistrations(root, LAYOUT.writers);
  return live.filter((w): w is Registration => !('unreadable' in w)).map((w) => w.token);
}
