/**
 * The thread behind md5-off-thread.ts: keeps one running MD5 per stream and answers each message in the
 * order it came. Bytes arrive as views of a SharedArrayBuffer (the pipeline's frame slots: nothing copied)
 * or as buffers moved here; an `update` is answered once its bytes are hashed, so the sender may reuse them.
 */
import { createHash, type Hash } from 'node:crypto';
import { parentPort } from 'node:worker_threads';
import type { Md5Reply, Md5Request } from './md5-off-thread.js';

const port = parentPort!;
const streams = new Map<number, Hash>();

port.on('message', (request: Md5Request) => {
  let reply: Md5Reply;
  try {
    switch (request.op) {
      case 'update': {
        let hash = streams.get(request.stream);
        if (!hash) streams.set(request.stream, (hash = createHash('md5')));
        hash.update(request.bytes);
        reply = { seq: request.seq };
        break;
      }
      case 'digest': {
        const hash = streams.get(request.stream) ?? createHash('md5');
        streams.delete(request.stream);
        reply = { seq: request.seq, md5: hash.digest('base64') };
        break;
      }
      case 'drop':
        streams.delete(request.stream);
        reply = { seq: request.seq };
        break;
    }
  } catch (error) {
    reply = { seq: request.seq, error: String(error) };
  }
  port.postMessage(reply);
});
