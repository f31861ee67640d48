/**
 * Notices: what the storage layer has to tell the user without failing (a key file other users can read,
 * a repository keyed by an older engine's passphrase decoding). Whoever presents the engine (the CLI)
 * listens; a library caller may too. Without a listener a notice goes nowhere.
 */
type Listener = (message: string) => void;

const listeners = new Set<Listener>();

/** Subscribes; returns the function that unsubscribes. */
export function onNotice(listener: Listener): () => void {
  listeners.add(listener);
  return () => listeners.delete(listener);
}

export function notice(message: string): void {
  for (const listener of listeners) listener(message);
}
