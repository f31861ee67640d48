/**
 * A piscina worker: runs the pipeline's block tasks (block-runner.ts) on blocks in the pool's shared memory. Runs with
 * piscina `atomics: 'disabled'` so that this thread's event loop turns between tasks: lz4-napi frees its output
 * buffers from N-API finalizers, which only run then.
 */
import { workerData } from 'node:worker_threads';
import { blockRunner } from './block-runner.js';
import type { WorkerSetup } from './tasks.js';

export default await blockRunner(workerData as WorkerSetup, { collect: true });
