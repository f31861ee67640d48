/**
 * XXH64 (seed 0 by default), written from the xxHash specification (doc/xxhash_spec.md, "XXH64 Algorithm
 * Description"): SPEC.md section 5 names it as the frame checksum and section 19.3 as the segment trailer.
 * BigInt arithmetic modulo 2^64: simple to check against the specification; fast enough for the
 * repositories this independent reader is run on (tens of MiB).
 */
const MASK = (1n << 64n) - 1n;
const P1 = 0x9e3779b185ebca87n;
const P2 = 0xc2b2ae3d27d4eb4fn;
const P3 = 0x165667b19e3779f9n;
const P4 = 0x85ebca77c2b2ae63n;
const P5 = 0x27d4eb2f165667c5n;

function rotl(value: bigint, count: bigint): bigint {
  return ((value << count) | (value >> (64n - count))) & MASK;
}

function round(acc: bigint, lane: bigint): bigint {
  const mixed = (acc + lane * P2) & MASK;
  return (rotl(mixed, 31n) * P1) & MASK;
}

function mergeRound(acc: bigint, value: bigint): bigint {
  return (((acc ^ round(0n, value)) * P1) & MASK) + P4 & MASK;
}

/** XXH64 of `data` (a whole buffer), as an unsigned 64-bit BigInt. */
export function xxh64(data: Uint8Array, seed = 0n): bigint {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  const length = data.byteLength;
  let offset = 0;
  let acc: bigint;
  if (length >= 32) {
    let v1 = (seed + P1 + P2) & MASK;
    let v2 = (seed + P2) & MASK;
    let v3 = seed & MASK;
    let v4 = (seed - P1) & MASK;
    const lastStripe = length - 32;
    while (offset <= lastStripe) {
      v1 = round(v1, view.getBigUint64(offset, true));
      v2 = round(v2, view.getBigUint64(offset + 8, true));
      v3 = round(v3, view.getBigUint64(offset + 16, true));
      v4 = round(v4, view.getBigUint64(offset + 24, true));
      offset += 32;
    }
    acc = (rotl(v1, 1n) + rotl(v2, 7n) + rotl(v3, 12n) + rotl(v4, 18n)) & MASK;
    acc = mergeRound(acc, v1);
    acc = mergeRound(acc, v2);
    acc = mergeRound(acc, v3);
    acc = mergeRound(acc, v4);
  } else {
    acc = (seed + P5) & MASK;
  }
  acc = (acc + BigInt(length)) & MASK;
  while (length - offset >= 8) {
    acc ^= round(0n, view.getBigUint64(offset, true));
    acc = ((rotl(acc, 27n) * P1) & MASK) + P4 & MASK;
    offset += 8;
  }
  if (length - offset >= 4) {
    acc ^= (BigInt(view.getUint32(offset, true)) * P1) & MASK;
    acc = ((rotl(acc, 23n) * P2) & MASK) + P3 & MASK;
    offset += 4;
  }
  while (offset < length) {
    acc ^= (BigInt(data[offset] as number) * P5) & MASK;
    acc = (rotl(acc, 11n) * P1) & MASK;
    offset += 1;
  }
  acc ^= acc >> 33n;
  acc = (acc * P2) & MASK;
  acc ^= acc >> 29n;
  acc = (acc * P3) & MASK;
  acc ^= acc >> 32n;
  return acc;
}
