/**
 * Fault injection for the crash tests: when ENGINE_CRASH_AT names a point, the process kills itself
 * with SIGKILL on reaching it (as `kill -9` or a power cut would), leaving whatever is on disk; when
 * ENGINE_FAIL_AT names it, an ordinary error is thrown there instead (a failure the engine must clean up
 * after); when ENGINE_STOP_AT names it, the process stops itself with SIGSTOP there (a test then runs
 * another command against the repository and resumes it with SIGCONT: a real interleaving, no mock).
 * Off unless those variables are set; each call is a few comparisons.
 */
export type CrashPoint =
  | 'pack-written' // a pack's frames are written, not yet fsynced or renamed
  | 'pack-sealed' // a pack is durable under its final name, its index batch not yet written
  | 'index-written' // a pack's index batch is written
  | 'before-record' // every blob is indexed, the backup record not yet written
  | 'record-written' // the backup record is durable, the catalogue entry not yet written
  | 'backup-verifications-swept' // prune or forget removed a backup's verification records, not yet its record
  | 'backup-record-deleted' // prune or forget deleted a backup's record, not yet its verification records' second sweep
  | 'prune-record-removed' // prune removed one backup record, others (and catalogue entries) may remain
  | 'gc-marked' // gc marked under the lock and released it; nothing written yet
  | 'gc-copied' // gc copied live frames into new packs under tmp/ (durable there), lock not held
  | 'gc-published' // gc holds the lock again; new packs renamed into packs/, not yet indexed
  | 'gc-indexed' // gc's index batch (entries moved and removed) is written; no pack deleted yet
  | 'gc-pack-deleted' // gc deleted its first pack
  | 'gc-v3-copied' // v3 gc stored its copies (packs no segment names) under its shared lease
  | 'gc-v3-exclusive' // v3 gc holds the exclusive lease; nothing changed yet
  | 'gc-v3-entries' // v3 gc wrote its first entry segment (a plan split in several segments)
  | 'gc-v3-switched' // v3 gc wrote a switch segment (the old segments count for nothing)
  | 'gc-v3-segment-deleted' // v3 gc deleted its first superseded segment
  | 'gc-v3-pack-deleted' // v3 gc deleted its first pack
  | 'migrate-segment-written' // migrate wrote its first segment under tmp/migrate-index/
  | 'migrate-index-aside' // migrate renamed index/ to index.v2/, the segments not yet in index/
  | 'migrate-index-swapped' // migrate's segments are index/, the config still version 1/2
  | 'migrate-config-written' // migrate's version-3 config is durable (the commit point), leftovers remain
  | 'migrate-leftover-removed' // migrate removed its first leftover
  | 'repair-quarantined' // repair wrote its quarantine files; the new index is not yet swapped in
  | 'repair-index-swapped' // repair's rebuilt index is in place; the old one not yet deleted
  | 'repair-pack-read' // repair entered the first pack into its new index under tmp/ (ENGINE_STOP_AT: interruption tests)
  | 'verify-pack-scanned' // verify scanned its first pack
  | 'restore-block-written' // restore wrote its first data block to the target
  | 'index-rebuild-pack' // an index rebuild (index/ was missing) entered its first pack under tmp/
  | 'lease-held' // version 3: the command's lease is written and checked, the cache not yet caught up
  | 'segment-written' // version 3: a writer's segment is durable in the store, its record not yet written
  | 'cache-part-written' // version 3: the host cache wrote a part of a large segment's entries (19.4), not its last
  | 'segment-replaced' // version 3: a backup replaced a segment naming a lost pack by a copy without those entries (SPEC.md 19.7, 3a)
  | 'forget-record-removed' // forget removed the record, its lease not yet released
  | 'guard-releasing' // the command is about to release its lock or lease (ENGINE_STOP_AT: the slow-stop notice)
  | 'guest-frozen' // backup --quiesce: the guest's file systems are frozen (libvirt: backup-begin not yet asked; oVirt: the snapshot or hybrid backup not yet asked)
  | 'guest-checkpoint-taken' // backup --libvirt --quiesce: backup-begin returned, the guest not yet thawed
  | 'outcome-written'; // the CLI wrote its last line (result or error); the process has not exited yet

const crashAt = process.env.ENGINE_CRASH_AT;
const failAt = process.env.ENGINE_FAIL_AT;
/** ENGINE_STOP_AT may name several points, comma-separated: a test that steps a process through them. */
const stopAt = process.env.ENGINE_STOP_AT?.split(',');

export function crashPoint(point: CrashPoint): void {
  if (crashAt === point) process.kill(process.pid, 'SIGKILL');
  if (failAt === point) throw new Error(`injected failure at ${point} (ENGINE_FAIL_AT)`);
  if (stopAt?.includes(point)) process.kill(process.pid, 'SIGSTOP');
}
