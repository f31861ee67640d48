/**
 * A full collection of V8's heap, asked for once a piece of work has left much garbage behind (a catch-up of
 * the index cache over thousands of segments). V8 collects its old generation only when that generation
 * passes a limit it sets by its own size, so what such work promoted there and let go (its per-segment
 * Maps and Sets, the listing's pages of XML, the answers of many small GETs) otherwise stays resident
 * while the next phase (a backup's or a restore's data) adds its own peak on top.
 *
 * The "last-resort" flavour (V8's CollectAllAvailableGarbage, what a low-memory notification runs): full
 * collections that reduce memory, repeated while they free more, after which V8 shrinks the young generation
 * to its smallest and hands the pages it freed back to the system. A plain major collection frees the objects
 * but keeps their pages: the young generation stays at the 2 x 8 MiB a 20,000-segment catch-up grew it to
 * (bin/engine's --max-semi-space-size=8), the old generation at the size the catch-up reached, all resident
 * under the next phase's peak. Measured (bench/v3-s3.ts --rss-runs 3, twice, S3, a 256 MiB image, fresh host
 * cache, interleaved with the build before, load 19-39; bench/results/v3-s3-rss-ab-54c38c5-22946b4.md): peak RSS
 * growth from 100 to 20,000 index segments, 6 runs, backup mean +23 -> +3 MiB (-4..+7), restore +19 -> +5 MiB
 * (-4..+15); RSS right after the collection 118-126 -> 90-94 MiB. Its cost: 46-72 ms of CPU against 24-33 for a
 * plain major collection (after a catch-up of ~7 CPU-s).
 * `gc` is exposed as in engine/pipeline/block-runner.ts: the flag, then a context where it is defined.
 */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

type Collect = (options: { type: 'major'; execution: 'sync'; flavor: 'last-resort' }) => void;

let collect: Collect | undefined;
let asked = 0;

/** How many collections this process asked for: whether a piece of work ended with one is a real outcome a test can count. */
export function collectionsAsked(): number {
  return asked;
}

export function collectGarbage(): void {
  asked += 1;
  if (collect === undefined) {
    setFlagsFromString('--expose-gc');
    collect = runInNewContext('gc') as Collect;
  }
  collect({ type: 'major', execution: 'sync', flavor: 'last-resort' });
}
