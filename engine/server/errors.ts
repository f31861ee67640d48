/**
 * The service API's own failures (SPEC.md "The service API"): each is an EngineError with a stable code, sent
 * as `{"error": {"code", "message", "details"}}` with the HTTP status that goes with it. The engine's own
 * errors keep their codes and travel the same way (http.ts, statusOf).
 */
import { EngineError } from '../../repo-format/errors.js';

declare module '../../repo-format/errors.js' {
  interface ErrorCodes {
    ENGINE_UNAUTHORIZED: 'engine';
    ENGINE_FORBIDDEN: 'engine';
    ENGINE_NOT_FOUND: 'engine';
    ENGINE_BODY_TOO_LARGE: 'engine';
    ENGINE_QUEUE_FULL: 'engine';
    ENGINE_SERVER_RESTARTED: 'engine';
    ENGINE_VM_BUSY: 'engine';
    ENGINE_BOOT_TEST_FAILED: 'engine';
    ENGINE_VERIFY_FAILED: 'engine';
    ENGINE_SERVER_UNREACHABLE: 'engine';
  }
}

/** No bearer token, or one the tokens file does not hold: 401. */
export class UnauthorizedError extends EngineError {
  constructor(message: string) {
    super('ENGINE_UNAUTHORIZED', message);
  }
}

/** A token whose role does not allow the request (a `read` token starting or cancelling a job): 403. */
export class ForbiddenError extends EngineError {
  constructor(message: string, details: Record<string, unknown> = {}) {
    super('ENGINE_FORBIDDEN', message, details);
  }
}

/** No such route, job or repository: 404. */
export class NotFoundError extends EngineError {
  constructor(message: string, details: Record<string, unknown> = {}) {
    super('ENGINE_NOT_FOUND', message, details);
  }
}

/** A request body over the limit: 413, the connection closed without reading the rest. */
export class BodyTooLargeError extends EngineError {
  constructor(limit: number) {
    super('ENGINE_BODY_TOO_LARGE', `the request body is larger than ${limit} bytes`, { limit });
  }
}

/** Every job slot busy and the queue full: 429; the client tries again later. */
export class QueueFullError extends EngineError {
  constructor(queued: number) {
    super('ENGINE_QUEUE_FULL', `${queued} jobs are queued already, the most this server keeps waiting`, { queued });
  }
}

/** A job the server was running (or had queued) when it stopped without finishing it: a kill -9, a crash, a power cut. */
export class ServerRestartedError extends EngineError {
  constructor(jobId: string, state: string) {
    super('ENGINE_SERVER_RESTARTED', `the server stopped while job ${jobId} was ${state}, before it could record the outcome; the repository's recovery cleaned up after it (a backup's record is all or nothing: the catalogue shows whether it committed)`, { job: jobId, state });
  }
}

/** A policy's run for a VM that a job was reading already (policies/scheduler.ts): recorded `skipped`, not queued. */
export class VmBusyError extends EngineError {
  constructor(vm: string, by: string) {
    super('ENGINE_VM_BUSY', `${vm} was being read by ${by} already: this run skipped it (one job at a time per VM)`, { vm, by });
  }
}

/** A policy's boot test whose backup did not come up: the job fails, so that the run and its hooks say so. */
export class BootTestFailedError extends EngineError {
  constructor(backup: string, result: string) {
    super('ENGINE_BOOT_TEST_FAILED', `the boot test of backup ${backup} ended ${result}: see its verification record`, { backup, result });
  }
}

/** A policy's verify that found problems (the job itself succeeded: its result lists them). */
export class VerifyFailedError extends EngineError {
  constructor(job: string, problems: number) {
    super('ENGINE_VERIFY_FAILED', `the verify of job ${job} found ${problems} problems: see the job's result`, { job, problems });
  }
}

/** `engine --server`: the server cannot be reached, or a job's event stream kept breaking before its end (the job may run on). */
export class ServerUnreachableError extends EngineError {
  constructor(server: string, reason: string) {
    super('ENGINE_SERVER_UNREACHABLE', `the server ${server} cannot be reached, or its answers broke off: ${reason}`, { server, reason });
  }
}
