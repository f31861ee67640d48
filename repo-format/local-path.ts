/**
 * Path arguments that look like URLs. A user of any other backup tool types `s3://bucket/repo`,
 * `sftp:host:/srv/repo` or `rest:https://…`; taken as a relative path, that would create a directory named
 * `s3:` in the current folder and "succeed". A path argument that has a URL scheme (`scheme://`), or the
 * `name:` prefix of another tool's storage backend, is refused (SPEC.md, section 14). A local directory that
 * really has such a name is reached as `./s3:…`.
 */
import { InvalidArgumentError } from './errors.js';

/** restic's backend prefixes (`s3:host/bucket`, `sftp:user@host:/path`, …), also the scheme-less forms. */
const BACKEND_PREFIX = /^(s3|sftp|rest|b2|azure|gs|swift|rclone|smb|ftp|ftps|http|https|ssh|scp|file):/i;
const URL_SCHEME = /^([a-z][a-z0-9+.-]*):\/\//i;

/**
 * Why `path` cannot be a local path, or undefined. `accepted`: what the argument takes besides local paths
 * (e.g. "nbd:// and nbd+unix:// URIs"), for the message.
 */
export function urlPathProblem(path: string, accepted?: string): string | undefined {
  const scheme = URL_SCHEME.exec(path)?.[1] ?? BACKEND_PREFIX.exec(path)?.[1];
  if (scheme === undefined) return undefined;
  const takes = accepted ? `only ${accepted} and local paths` : 'only local paths';
  if (scheme.toLowerCase() === 'file') return `is a file: URL; give the path itself`;
  return `looks like a URL (${scheme.toLowerCase()}:), and this argument takes ${takes}; mount remote storage and give its local path (a local name that starts like this: ./${path.slice(0, 40)})`;
}

/** Throws ENGINE_INVALID_ARGUMENT (exit code 2) for a path argument that looks like a URL. `what`: "repository", "--to" … */
export function checkLocalPath(path: string, what: string, accepted?: string): void {
  const problem = urlPathProblem(path, accepted);
  if (problem) throw new InvalidArgumentError(`${what} ${path.length > 200 ? `${path.slice(0, 200)}…` : path}: ${problem}`, { path });
}
