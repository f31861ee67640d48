import { isNbdUri } from '../nbd/uri.js';
import { FileSource } from './file-source.js';
import { NbdSource } from './nbd-source.js';
import type { BlockSource } from './source.js';

/** A source from what the user typed: an NBD URI, or a path to an image file or block device. */
export function openSource(spec: string): Promise<BlockSource> {
  return isNbdUri(spec) ? NbdSource.open(spec) : FileSource.open(spec);
}
