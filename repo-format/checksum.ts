import xxhash from 'xxhash-wasm';

type Hasher = Awaited<ReturnType<typeof xxhash>>;
let hasher: Hasher | undefined;

/** Loads the xxhash WebAssembly module once per thread; every checksum call after that is synchronous. */
export async function initChecksum(): Promise<void> {
  hasher ??= await xxhash();
}

/** xxh64 (seed 0) of `data`: the frame checksum. */
export function checksum64(data: Uint8Array): bigint {
  if (!hasher) throw new Error('initChecksum() must be awaited before checksum64()');
  return hasher.h64Raw(data);
}
