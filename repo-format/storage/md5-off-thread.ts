/**
 * MD5 computed on a thread of its own, for the Content-MD5 of uploads: S3 (RGW 16.2 included) checks no
 * other checksum of a PUT (x-amz-checksum-* are ignored there), and MD5 runs at ~0.6 GB/s a core here, which
 * on the main thread made it the pipeline's slowest stage (profile: issue 14, bench/v3-s3.ts). The bytes of
 * a pipeline frame sit in a SharedArrayBuffer and are hashed where they are; other bytes are copied once and
 * moved to the thread. Updates of a stream are hashed in the order they were made.
 *
 * One thread per process, started on first use, holding the process open only while it has work.
 */
import { Worker } from 'node:worker_threads';

export type Md5Request =
  | { op: 'update'; seq: number; stream: number; bytes: Uint8Array }
  | { op: 'digest'; seq: number; stream: number }
  | { op: 'drop'; seq: number; stream: number };
export type Md5Reply = { seq: number; md5?: string; error?: string };
/** A request before the thread numbers it. */
type Unnumbered = Md5Request extends infer R ? (R extends Md5Request ? Omit<R, 'seq'> : never) : never;

interface Waiting {
  resolve: (reply: Md5Reply) => void;
  reject: (error: Error) => void;
}

class Md5Thread {
  private readonly worker: Worker;
  private readonly waiting = new Map<number, Waiting>();
  private seq = 0;
  private dead: Error | undefined;

  constructor() {
    this.worker = new Worker(new URL('./md5-thread.js', import.meta.url));
    this.worker.unref();
    this.worker.on('message', (reply: Md5Reply) => {
      const waiting = this.waiting.get(reply.seq);
      if (!waiting) return;
      this.waiting.delete(reply.seq);
      if (this.waiting.size === 0) this.worker.unref();
      if (reply.error !== undefined) waiting.reject(new Error(`MD5 thread: ${reply.error}`));
      else waiting.resolve(reply);
    });
    const die = (error: Error): void => {
      this.dead ??= error;
      if (thread === this) thread = undefined;
      for (const waiting of this.waiting.values()) waiting.reject(this.dead);
      this.waiting.clear();
    };
    this.worker.on('error', die);
    this.worker.on('exit', (code) => die(new Error(`the MD5 thread exited (code ${code})`)));
  }

  ask(request: Unnumbered, transfer?: ArrayBuffer[]): Promise<Md5Reply> {
    if (this.dead) return Promise.reject(this.dead);
    const seq = (this.seq += 1);
    return new Promise<Md5Reply>((resolve, reject) => {
      if (this.waiting.size === 0) this.worker.ref();
      this.waiting.set(seq, { resolve, reject });
      this.worker.postMessage({ ...request, seq } as Md5Request, transfer);
    });
  }
}

let thread: Md5Thread | undefined;
let streams = 0;

/** A running MD5 whose bytes are hashed on the MD5 thread, in the order `update` is called. */
export class Md5Stream {
  private readonly thread: Md5Thread;
  private readonly id: number;

  constructor() {
    this.thread = thread ??= new Md5Thread();
    this.id = (streams += 1);
  }

  /**
   * Hashes `bytes` after every earlier update of this stream. A view of a SharedArrayBuffer is read in
   * place: it must stay unchanged until the promise resolves. Any other bytes are copied at once.
   */
  update(bytes: Uint8Array): Promise<void> {
    if (bytes.byteLength === 0) return Promise.resolve();
    if (bytes.buffer instanceof SharedArrayBuffer) return this.thread.ask({ op: 'update', stream: this.id, bytes }).then(() => undefined);
    // A copy of exactly these bytes, moved (posting a view would clone its whole backing buffer).
    const copy = new Uint8Array(bytes);
    return this.thread.ask({ op: 'update', stream: this.id, bytes: copy }, [copy.buffer]).then(() => undefined);
  }

  /** The base64 MD5 of every byte given (the stream is finished). */
  async digest(): Promise<string> {
    const reply = await this.thread.ask({ op: 'digest', stream: this.id });
    return reply.md5!;
  }

  /** Forgets the stream (an aborted pack). */
  drop(): void {
    this.thread.ask({ op: 'drop', stream: this.id }).catch(() => undefined);
  }
}
