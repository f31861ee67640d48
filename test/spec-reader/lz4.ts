/**
 * An LZ4 *block* decoder (not the LZ4 frame format), written from the LZ4 block format description
 * (lz4/doc/lz4_Block_format.md): sequences of a token, literals and a match (2-byte little-endian offset,
 * length + 4); the last sequence holds literals only. SPEC.md section 5 prefixes the block with the
 * plaintext length (u32 LE); the caller checks that prefix and passes the expected length here, so the
 * output is sized before any byte is decoded and a block that would write past it is refused.
 */
export class Lz4Error extends Error {}

export function lz4BlockDecode(src: Uint8Array, expectedLength: number): Buffer {
  const out = Buffer.alloc(expectedLength);
  let ip = 0;
  let op = 0;
  const end = src.length;
  if (end === 0) throw new Lz4Error('empty lz4 block');
  for (;;) {
    const token = src[ip++] as number;
    let literals = Math.floor(token / 16);
    if (literals === 15) {
      for (;;) {
        if (ip >= end) throw new Lz4Error('lz4 literal length runs past the block');
        const more = src[ip++] as number;
        literals += more;
        if (more !== 255) break;
      }
    }
    if (ip + literals > end) throw new Lz4Error('lz4 literals run past the block');
    if (op + literals > expectedLength) throw new Lz4Error('lz4 output longer than the size prefix');
    out.set(src.subarray(ip, ip + literals), op);
    ip += literals;
    op += literals;
    if (ip === end) break; // the last sequence: literals only
    if (ip + 2 > end) throw new Lz4Error('lz4 match offset cut short');
    const distance = (src[ip] as number) + (src[ip + 1] as number) * 256;
    ip += 2;
    if (distance === 0 || distance > op) throw new Lz4Error(`lz4 match offset ${distance} out of range at output ${op}`);
    let matchLength = token % 16;
    if (matchLength === 15) {
      for (;;) {
        if (ip >= end) throw new Lz4Error('lz4 match length runs past the block');
        const more = src[ip++] as number;
        matchLength += more;
        if (more !== 255) break;
      }
    }
    matchLength += 4;
    if (op + matchLength > expectedLength) throw new Lz4Error('lz4 output longer than the size prefix');
    let from = op - distance;
    if (distance >= matchLength) {
      out.copyWithin(op, from, from + matchLength);
      op += matchLength;
    } else {
      // Overlapping match: copy byte by byte, repeating the last `distance` bytes.
      for (let i = 0; i < matchLength; i++) out[op++] = out[from++] as number;
    }
  }
  if (op !== expectedLength) throw new Lz4Error(`lz4 decompressed length ${op}, expected ${expectedLength}`);
  return out;
}
