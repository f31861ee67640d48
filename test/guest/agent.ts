/**
 * A QEMU guest agent client for the tests: one JSON command per line over the Unix socket QEMU's chardev
 * listens on (QEMU's qga/qapi-schema.json; `guest-sync-delimited` first, so that a reply left from an earlier
 * client is never taken for this one's).
 */
import { createConnection, type Socket } from 'node:net';

export class GuestAgent {
  private buffered = '';
  private waiting: ((line: string) => void) | undefined;

  private constructor(private readonly socket: Socket) {
    // latin1: the agent's 0xFF delimiter stays one character; its JSON is ASCII (guest-exec output comes base64).
    socket.setEncoding('latin1');
    socket.on('data', (text: string) => {
      this.buffered += text;
      this.deliver();
    });
  }

  static async connect(path: string): Promise<GuestAgent> {
    const socket = await new Promise<Socket>((resolve, reject) => {
      const s = createConnection(path, () => resolve(s));
      s.once('error', reject);
    });
    const agent = new GuestAgent(socket);
    const id = Math.floor(Math.random() * 2 ** 31);
    // The agent answers a sync with 0xFF then the id; lines before it are stale replies.
    socket.write(Buffer.concat([Buffer.from([0xff]), Buffer.from(`${JSON.stringify({ execute: 'guest-sync-delimited', arguments: { id } })}\n`)]));
    for (;;) {
      const line = await agent.nextLine(10_000);
      if (/"return": ?(\d+)/u.exec(line)?.[1] === String(id)) return agent;
    }
  }

  /** Runs one command and gives its `return`, or throws with the agent's error. */
  async execute<T>(command: string, args?: Record<string, unknown>, timeoutMs = 30_000): Promise<T> {
    this.socket.write(`${JSON.stringify(args ? { execute: command, arguments: args } : { execute: command })}\n`);
    const reply = JSON.parse(await this.nextLine(timeoutMs)) as { return?: T; error?: { desc?: string } };
    if (reply.error) throw new Error(`guest agent ${command}: ${reply.error.desc ?? JSON.stringify(reply.error)}`);
    return reply.return as T;
  }

  /** Runs a shell command in the guest (busybox sh) and gives its exit code and output. */
  async shell(script: string): Promise<{ exitcode: number; stdout: string }> {
    const { pid } = await this.execute<{ pid: number }>('guest-exec', { path: '/bin/sh', arg: ['-c', script], 'capture-output': true });
    for (let i = 0; i < 600; i += 1) {
      const status = await this.execute<{ exited: boolean; exitcode?: number; 'out-data'?: string }>('guest-exec-status', { pid });
      if (status.exited) return { exitcode: status.exitcode ?? -1, stdout: Buffer.from(status['out-data'] ?? '', 'base64').toString() };
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    throw new Error(`guest command did not end: ${script}`);
  }

  close(): void {
    this.socket.destroy();
  }

  private deliver(): void {
    const end = this.buffered.indexOf('\n');
    if (end < 0 || !this.waiting) return;
    const line = this.buffered.slice(0, end);
    this.buffered = this.buffered.slice(end + 1);
    const waiting = this.waiting;
    this.waiting = undefined;
    waiting(line);
  }

  private nextLine(timeoutMs: number): Promise<string> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting = undefined;
        reject(new Error(`the guest agent did not answer within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiting = (line) => {
        clearTimeout(timer);
        resolve(line);
      };
      this.deliver();
    });
  }
}
