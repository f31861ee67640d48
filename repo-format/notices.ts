/**
 * Where the repository layer says what it did on its own that the user must hear about, whatever the
 * command: a stale lock it broke, an index it rebuilt, a read-only or full repository it reads without
 * the lock, the space reserve it used. The CLI sets the sink once (stderr, or nothing with --json); a
 * library caller may set its own, or pass `onNotice` to the call that opens the repository.
 */
export type NoticeSink = (message: string) => void;

let sink: NoticeSink | undefined;

/** Sets (or, with undefined, clears) the process-wide sink. */
export function setNoticeSink(next: NoticeSink | undefined): void {
  sink = next;
}

/** The sink a call uses: its own, else the process-wide one, else none. */
export function noticeSink(own?: NoticeSink): NoticeSink {
  return own ?? ((message) => sink?.(message));
}
