/**
 * A QEMU guest agent client (QEMU's qga/qapi-schema.json) over the Unix socket of the VM's virtio-serial
 * channel. The channel is open before the guest's agent is: what is written before the agent reads is
 * queued and answered later, so every exchange starts with `guest-sync-delimited` and a fresh id, and only
 * the answer carrying that id says the stream is clean from there on (an answer to an earlier sync is
 * taken as "the agent is up", and another sync follows).
 */
import { randomInt } from 'node:crypto';
import { EngineError } from '../../repo-format/errors.js';
import { JsonLineSocket } from './json-socket.js';

export interface GuestFilesystem {
  mountpoint: string;
  type: string;
  name: string;
}

export class GuestAgentClient {
  private synced = false;

  private constructor(private readonly socket: JsonLineSocket) {}

  static async connect(path: string, timeoutMs = 5_000): Promise<GuestAgentClient> {
    return new GuestAgentClient(await JsonLineSocket.connect(path, 'the guest agent', timeoutMs));
  }

  /**
   * Waits up to `timeoutMs` for the agent to answer a sync. Throws TimeoutError when it does not (not
   * started yet, or never): callers try again while their own deadline allows.
   */
  async sync(timeoutMs: number): Promise<void> {
    const ids = new Set<number>();
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const id = randomInt(1, 2 ** 31);
      ids.add(id);
      // 0xFF first: the agent drops any partial input before it (a command cut short by an earlier client).
      this.socket.write(Buffer.concat([Buffer.from([0xff]), Buffer.from(`${JSON.stringify({ execute: 'guest-sync-delimited', arguments: { id } })}\n`)]));
      const left = Math.max(1, deadline - Date.now());
      const reply = await this.socket.next((v) => typeof v.return === 'number' && ids.has(v.return), left);
      if (reply.return === id) {
        this.synced = true;
        return;
      }
      // An earlier sync's answer: the agent is up; the next one, answered in order, cleans the stream.
    }
  }

  /** Runs one command and gives its `return`, or throws with the agent's error. */
  async execute<T>(command: string, args?: Record<string, unknown>, timeoutMs = 10_000): Promise<T> {
    if (!this.synced) await this.sync(timeoutMs);
    this.socket.write(`${JSON.stringify(args ? { execute: command, arguments: args } : { execute: command })}\n`);
    const reply = await this.socket.next((v) => 'return' in v || 'error' in v, timeoutMs);
    if ('error' in reply) {
      const error = reply.error as { desc?: string } | undefined;
      throw new EngineError('ENGINE_TOOL_FAILED', `guest agent: ${command} failed: ${error?.desc ?? JSON.stringify(reply.error)}`, { command });
    }
    return reply.return as T;
  }

  /** `guest-shutdown` (power off): the agent may go before it answers, so no answer is awaited. */
  shutdown(): void {
    this.socket.write(`${JSON.stringify({ execute: 'guest-shutdown', arguments: { mode: 'powerdown' } })}\n`);
  }

  /** Whether the connection is gone (QEMU closed it: the VM ended). */
  get closed(): boolean {
    return this.socket.closed;
  }

  close(): void {
    this.socket.close();
  }
}
