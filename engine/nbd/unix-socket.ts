/**
 * A server's Unix socket, created safely (the access control of a Unix socket is its file mode and the
 * directory it lives in):
 *
 * - The directory must exist (it is not created: a typo must not become a new directory) and must not let
 *   other users replace the socket: owned by us or root, and not writable by group or others unless it is
 *   sticky (like /tmp, where only the owner of a file can remove it).
 * - Whatever is at the path already: a live socket (a connect succeeds) is another server and is refused;
 *   a socket nobody listens on (ECONNREFUSED: provably stale, left by a server that was killed) is
 *   replaced; anything else (a file, a directory) is refused, never deleted.
 * - The socket is bound inside a private (0700) directory beside the path, made 0600, then hard-linked to
 *   the path (which fails if something appeared there meanwhile: never replaced behind our back), so no
 *   other user can connect to it for a single moment whatever the umask.
 * - When the server stops, the path is removed only while it is still this socket (same inode).
 */
import { connect, type Server } from 'node:net';
import { chmod, link, lstat, mkdtemp, rmdir, unlink } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import { InvalidArgumentError } from '../../repo-format/errors.js';
import { withRemedies } from '../errors.js';

export interface ListeningSocket {
  path: string;
  /** Removes the path if it is still this server's socket. */
  remove(): Promise<void>;
}

/** The directory a socket may be created in: it exists, and no other user can swap what is in it. */
export async function checkSocketDirectory(dir: string): Promise<void> {
  const info = await lstat(dir).catch((error: NodeJS.ErrnoException) => {
    if (error.code === 'ENOENT') throw new InvalidArgumentError(`cannot create a socket in ${dir}: the directory does not exist`);
    throw new InvalidArgumentError(`cannot create a socket in ${dir}: ${error.code ?? error.message}`);
  });
  if (!info.isDirectory()) throw new InvalidArgumentError(`cannot create a socket in ${dir}: not a directory`);
  const uid = process.getuid?.() ?? 0;
  if (info.uid !== uid && info.uid !== 0) throw new InvalidArgumentError(`cannot create a socket in ${dir}: the directory belongs to another user (uid ${info.uid}), who could replace the socket`);
  const sticky = (info.mode & 0o1000) !== 0;
  if ((info.mode & 0o022) !== 0 && !sticky) {
    throw new InvalidArgumentError(`cannot create a socket in ${dir}: other users can write to the directory (mode ${(info.mode & 0o7777).toString(8)}) and could replace the socket`);
  }
}

/** Whether a server answers on the socket at `path`: true (live), false (ECONNREFUSED: nobody listens). */
function socketIsLive(path: string): Promise<boolean> {
  return new Promise((resolve, reject) => {
    const probe = connect(path);
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', (error: NodeJS.ErrnoException) => {
      probe.destroy();
      if (error.code === 'ECONNREFUSED') resolve(false);
      else reject(new InvalidArgumentError(`${path}: cannot tell whether a server uses this socket (${error.code ?? error.message}); remove it if none does`));
    });
  });
}

/** Makes `path` free for a new socket, or says why it is not; `onLog` hears of a stale socket replaced. */
async function clearPath(path: string, onLog?: (message: string) => void): Promise<void> {
  const existing = await lstat(path).catch((error: NodeJS.ErrnoException) => {
    if (error.code === 'ENOENT') return undefined;
    throw new InvalidArgumentError(`${path}: ${error.code ?? error.message}`);
  });
  if (!existing) return;
  if (!existing.isSocket()) throw new InvalidArgumentError(`${path} exists and is not a socket; it is left alone`, withRemedies({ path }, { kind: 'socket-path', because: 'not-a-socket' }));
  if (await socketIsLive(path)) throw new InvalidArgumentError(`${path} is the socket of a running server`, withRemedies({ path }, { kind: 'socket-path', because: 'in-use' }));
  onLog?.(`${path}: replacing a stale socket (no server listens on it)`);
  await unlink(path).catch((error: NodeJS.ErrnoException) => {
    if (error.code !== 'ENOENT') throw new InvalidArgumentError(`${path}: the stale socket cannot be removed (${error.code ?? error.message})`);
  });
}

function listen(server: Server, path: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (error: NodeJS.ErrnoException): void => reject(new InvalidArgumentError(`cannot listen on ${path}: ${error.code ?? error.message}`));
    server.once('error', onError);
    server.listen(path, () => {
      server.removeListener('error', onError);
      resolve();
    });
  });
}

/** The longest path a Unix socket address holds (sun_path is 108 bytes with its NUL). */
const MAX_SOCKET_PATH = 107;

/**
 * Checks that a socket can be created at `path` (its length, its directory, nothing live or precious there)
 * and removes a stale socket: a caller that has other work to do first (serve opens the repository) learns
 * of a bad path before doing it. listenOnUnixSocket does the same again.
 */
export async function prepareSocketPath(path: string, onLog?: (message: string) => void): Promise<void> {
  if (Buffer.byteLength(path) > MAX_SOCKET_PATH) throw new InvalidArgumentError(`${path}: a socket path has at most ${MAX_SOCKET_PATH} bytes (this one ${Buffer.byteLength(path)}); choose a shorter one`);
  await checkSocketDirectory(dirname(path));
  await clearPath(path, onLog);
}

/** Listens on a new Unix socket at `path`, mode 0600, as described above. */
export async function listenOnUnixSocket(server: Server, path: string, onLog?: (message: string) => void): Promise<ListeningSocket> {
  await prepareSocketPath(path, onLog);
  const dir = dirname(path);
  // Short names: the path bound first must fit in a socket address too.
  const privateDir = await mkdtemp(join(dir, '.s')).catch((error: NodeJS.ErrnoException) => {
    throw new InvalidArgumentError(`cannot create a socket in ${dir}: ${error.code ?? error.message}`);
  });
  const bound = join(privateDir, 's');
  if (Buffer.byteLength(bound) > MAX_SOCKET_PATH) {
    await rmdir(privateDir).catch(() => undefined);
    throw new InvalidArgumentError(`${dir}: the directory's path is too long for a socket (at most ${MAX_SOCKET_PATH - 10} bytes); choose a shorter one`);
  }
  try {
    await listen(server, bound);
    await chmod(bound, 0o600);
    await link(bound, path).catch((error: NodeJS.ErrnoException) => {
      server.close();
      if (error.code === 'EEXIST') throw new InvalidArgumentError(`${path} appeared while the server started; it is left alone`);
      throw new InvalidArgumentError(`cannot create the socket ${path}: ${error.code ?? error.message}`);
    });
  } finally {
    await unlink(bound).catch(() => undefined);
    await rmdir(privateDir).catch(() => undefined);
  }
  const inode = (await lstat(path)).ino;
  return {
    path,
    remove: async () => {
      const now = await lstat(path).catch(() => undefined);
      if (now?.isSocket() && now.ino === inode) await unlink(path).catch(() => undefined);
    },
  };
}
