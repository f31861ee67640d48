/**
 * A full collection of V8's heap, asked for once a piece of work has left much garbage behind (a catch-up of
 * the index cache over thousands of segments). V8 collects its old generation only when that generation
 * passes a limit it sets by its own size, so what such work promoted there and let go (its per-segment
 * Maps and Sets, the listing's pages of XML, the answers of many small GETs) otherwise stays resident
 * while the next phase (a backup's or a restore's data) adds its own peak on top.
 * `gc` is exposed as in engine/pipeline/block-runner.ts: the flag, then a context where it is defined.
 */
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';

let collect: ((options: { type: 'major' }) => void) | undefined;

export function collectGarbage(): void {
  if (collect === undefined) {
    setFlagsFromString('--expose-gc');
    collect = runInNewContext('gc') as (options: { type: 'major' }) => void;
  }
  collect({ type: 'major' });
}
