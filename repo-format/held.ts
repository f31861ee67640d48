/**
 * What this process holds in repositories right now: the lock of versions 1 and 2 (a file), or a lease of
 * version 3 (an object in the store). The CLI's notice on a slow stop after SIGINT/SIGTERM says which it is
 * releasing (cli/interrupt.ts): "the lock" on a version-3 repository would send the user looking for a file
 * that does not exist. A process may hold both at once (migrate: the old lock and the new exclusive lease).
 */
export type Guard = 'lock' | 'lease';

const counts = new Map<Guard, number>();

/** Records one guard as held; the function returned records its release (once, however often it is called). */
export function holding(guard: Guard): () => void {
  counts.set(guard, (counts.get(guard) ?? 0) + 1);
  let released = false;
  return () => {
    if (released) return;
    released = true;
    counts.set(guard, (counts.get(guard) ?? 1) - 1);
  };
}

/** The kinds of guard held now, in a fixed order (lock before lease). */
export function heldGuards(): Guard[] {
  return (['lock', 'lease'] as const).filter((guard) => (counts.get(guard) ?? 0) > 0);
}
