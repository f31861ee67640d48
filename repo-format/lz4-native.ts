/**
 * liblz4, the C reference library, through the engine's own N-API addon (native/lz4/lz4.c, built by
 * scripts/setup.sh against Debian's liblz4-dev): lz4 blocks compressed into and decompressed into buffers the
 * caller owns, where lz4-napi (Rust lz4_flex) allocates a new Buffer per call and compresses at about half
 * the speed (bench/lz4-codec.ts, bench/results/lz4-codec.md). Both write and read the same lz4 block format,
 * so the choice between them changes no byte on disk (SPEC.md, section 5). `undefined` where the addon is not
 * built (no compiler or liblz4-dev, another platform) or `ENGINE_LZ4=lz4-napi` asks for the fallback:
 * compression.ts then uses lz4-napi.
 */
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

export interface NativeLz4 {
  /** The most bytes a block of `length` bytes can compress to (LZ4_compressBound). */
  compressBound(length: number): number;
  /** Compresses all of `source` into `target`: the bytes written, or 0 when they do not fit in `target`. */
  compress(source: Uint8Array, target: Uint8Array): number;
  /**
   * Decodes one whole lz4 block, all of `source`, into at most `target.length` bytes (LZ4_decompress_safe):
   * the bytes written, or -1 when `source` is no valid block or decodes to more than `target` holds.
   */
  decompress(source: Uint8Array, target: Uint8Array): number;
}

/** Where node-gyp puts the addon: from dist/repo-format/ and dist/bundle/ alike, two folders up is the package's root. */
export const NATIVE_LZ4_PATH = fileURLToPath(new URL('../../native/lz4/build/Release/lz4.node', import.meta.url));

function load(): NativeLz4 | undefined {
  if (process.env.ENGINE_LZ4 === 'lz4-napi') return undefined;
  try {
    return createRequire(import.meta.url)(NATIVE_LZ4_PATH) as NativeLz4;
  } catch {
    // Not built here: lz4-napi reads and writes the same blocks, more slowly (README, Install).
    return undefined;
  }
}

export const nativeLz4: NativeLz4 | undefined = load();

/** Which lz4 implementation this process uses: for `engine bench` and the benches' reports. */
export const LZ4_IMPLEMENTATION: 'liblz4' | 'lz4-napi' = nativeLz4 ? 'liblz4' : 'lz4-napi';
