/**
 * A QMP client (QEMU's machine protocol, docs/interop/qmp-spec.rst): the greeting, `qmp_capabilities`,
 * then one command at a time; events are skipped.
 */
import { EngineError } from '../../repo-format/errors.js';
import { JsonLineSocket } from './json-socket.js';

export class QmpClient {
  /** One command at a time: answers carry no id, so a second command sent before the first's answer could take it. */
  private queue: Promise<unknown> = Promise.resolve();

  private constructor(private readonly socket: JsonLineSocket) {}

  static async connect(path: string, timeoutMs = 10_000): Promise<QmpClient> {
    const socket = await JsonLineSocket.connect(path, 'QEMU monitor (QMP)', timeoutMs);
    try {
      await socket.next((v) => 'QMP' in v, timeoutMs);
      const client = new QmpClient(socket);
      await client.execute('qmp_capabilities', undefined, timeoutMs);
      return client;
    } catch (error) {
      socket.close();
      throw error;
    }
  }

  execute<T>(command: string, args?: Record<string, unknown>, timeoutMs = 10_000): Promise<T> {
    const run = this.queue.then(() => this.send<T>(command, args, timeoutMs));
    this.queue = run.catch(() => undefined);
    return run;
  }

  private async send<T>(command: string, args: Record<string, unknown> | undefined, timeoutMs: number): Promise<T> {
    this.socket.write(`${JSON.stringify(args ? { execute: command, arguments: args } : { execute: command })}\n`);
    const reply = await this.socket.next((v) => 'return' in v || 'error' in v, timeoutMs);
    if ('error' in reply) {
      const error = reply.error as { desc?: string } | undefined;
      throw new EngineError('ENGINE_TOOL_FAILED', `QEMU monitor: ${command} failed: ${error?.desc ?? JSON.stringify(reply.error)}`, { command });
    }
    return reply.return as T;
  }

  close(): void {
    this.socket.close();
  }
}
