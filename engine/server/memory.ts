/**
 * Memory a finished job leaves behind, given back. Each backup, restore or verify allocates its worker pool's
 * slots as SharedArrayBuffers (engine/pipeline/block-pool.ts: 32 MiB per pool). A CLI command ends with its
 * process; a long-running server does not, and V8 does not count those backing stores as pressure on a heap
 * that is itself small (~20 MiB), so no full collection runs and every job's 32 MiB stays: measured, 20
 * sequential 64 MiB backups in one process, RSS 164 -> 793 MiB, arrayBuffers 32 -> 641 MiB. One full
 * collection after a job ends frees them (the same run with it: 138-177 MiB throughout). The cure at the
 * source, a pool that reuses its slots across jobs, is the pipeline's to make.
 */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

let collect: (() => void) | undefined;

/** A full garbage collection, after each job (a few milliseconds on the server's small heap). */
export function releaseJobMemory(): void {
  if (!collect) {
    // Node exposes gc() only with --expose-gc; setting the flag at run time and reading gc from a fresh context gets it.
    setFlagsFromString('--expose-gc');
    collect = runInNewContext('gc') as () => void;
  }
  collect();
}
