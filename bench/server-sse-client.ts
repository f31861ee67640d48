/**
 * An SSE client for bench/server.ts: `node server-sse-client.js URL JOB` follows a job's events and prints, for each as
 * soon as its `data` line is read, `JOB ID TYPE NS`: NS from process.hrtime (CLOCK_MONOTONIC, the clock the server
 * stamped the event with when it emitted it). A process of its own, so that the server's event loop is not its.
 */
import { request } from 'node:http';

const [url, job] = process.argv.slice(2);
if (!url || !job) throw new Error('usage: server-sse-client.js URL JOB');
request(url, (res) => {
  // Events emitted before this are history the server replays; the bench times only those emitted after.
  process.stdout.write(`${job} - connected ${process.hrtime.bigint()}\n`);
  let buffered = '';
  let id = '';
  let type = '';
  res.setEncoding('utf8');
  res.on('data', (chunk: string) => {
    const at = process.hrtime.bigint();
    buffered += chunk;
    const lines = buffered.split('\n');
    buffered = lines.pop()!;
    for (const line of lines) {
      if (line.startsWith('id: ')) id = line.slice(4);
      else if (line.startsWith('event: ')) type = line.slice(7);
      else if (line.startsWith('data: ')) process.stdout.write(`${job} ${id} ${type} ${at}\n`);
    }
  });
}).end();
