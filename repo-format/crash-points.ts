/**
 * Fault injection for the crash tests: when ENGINE_CRASH_AT names a point, the process kills itself
 * with SIGKILL on reaching it (as `kill -9` or a power cut would), leaving whatever is on disk; when
 * ENGINE_FAIL_AT names it, an ordinary error is thrown there instead (a failure the engine must clean up
 * after). Off unless those variables are set; each call is two comparisons.
 */
export type CrashPoint =
  | 'pack-written' // a pack's frames are written, not yet fsynced or renamed
  | 'pack-sealed' // a pack is durable under its final name, its index batch not yet written
  | 'index-written' // a pack's index batch is written
  | 'before-record' // every blob is indexed, the backup record not yet written
  | 'record-written'; // the backup record is durable, the catalogue entry not yet written

const crashAt = process.env.ENGINE_CRASH_AT;
const failAt = process.env.ENGINE_FAIL_AT;

export function crashPoint(point: CrashPoint): void {
  if (crashAt === point) process.kill(process.pid, 'SIGKILL');
  if (failAt === point) throw new Error(`injected failure at ${point} (ENGINE_FAIL_AT)`);
}
