/**
 * A thread of the shared pool (shared-pool.ts): runs block tasks of any job. Each task names its context (block size,
 * compression, keys) and carries what a runner for it needs (the arena's slots, the keys); the thread makes one
 * runner per context on first use and keeps the newest few (a runner holds zstd contexts and buffers). Every
 * outcome is an answer: what a task throws comes back as its code and message, so that only its own job fails and
 * the pool can tell a task's failure from a thread that died.
 */
import { blockRunner, type BlockRunner } from './block-runner.js';
import { EngineError } from '../../repo-format/errors.js';
import type { SharedAnswer, SharedTask, SharedWorkerData } from './shared-pool.js';
import { workerData } from 'node:worker_threads';
import { registerS3Settings } from '../../repo-format/v3/location.js';

for (const [where, settings] of (workerData as SharedWorkerData | undefined)?.s3Settings ?? []) registerS3Settings(where, settings);

/** Runners kept: a server's repositories × block sizes, seldom more than a few. */
const KEEP_RUNNERS = 8;
const runners = new Map<number, Promise<BlockRunner>>();

function runnerFor(context: number, setup: SharedTask['setup']): Promise<BlockRunner> {
  let runner = runners.get(context);
  if (runner) {
    // Newest last: the first in the map is the one used longest ago.
    runners.delete(context);
  } else {
    runner = blockRunner(setup, { collect: true });
  }
  runners.set(context, runner);
  if (runners.size > KEEP_RUNNERS) runners.delete(runners.keys().next().value!);
  return runner;
}

export default async function run(message: SharedTask): Promise<SharedAnswer> {
  try {
    const runner = await runnerFor(message.context, message.setup);
    return { result: await runner(message.task) };
  } catch (error) {
    if (error instanceof EngineError) return { thrown: { code: error.code, message: error.message, details: { ...error.details } } };
    return { thrown: { code: 'ENGINE_INTERNAL', message: `a block task failed: ${(error as Error).message ?? String(error)}`, details: {} } };
  }
}
