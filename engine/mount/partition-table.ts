/**
 * Partition tables of a disk image, read from its first sectors: MBR (primary entries and the logical
 * partitions of an extended partition's EBR chain) and GPT (protective MBR, header at LBA 1, entry
 * array). 512-byte sectors, as on virtual disks; a GPT header found at 4096 bytes means 4 KiB sectors.
 * Only what a mount needs: number, byte offset and byte length of each partition. Anything inconsistent
 * (an entry past the end of the disk, a malformed header) is dropped, never trusted: the bytes come from a
 * guest.
 *
 *   MBR  sector 0: 446 bytes boot code || 4 × 16-byte entries (status, CHS, type @4, first LBA u32 LE @8,
 *        sector count u32 LE @12) || 0x55 0xAA
 *   GPT  LBA 1: "EFI PART" || … entries LBA u64 LE @72, entry count u32 @80, entry size u32 @84;
 *        entry: type GUID (16, all zero = unused) @0, first LBA u64 @32, last LBA u64 (inclusive) @40
 */

export interface Partition {
  /** 1-based, as Linux names them: MBR primaries 1–4, logicals from 5; GPT entries in table order. */
  number: number;
  offset: number;
  length: number;
  /** MBR type byte as hex ("83"), or the GPT type GUID. */
  type: string;
}

export interface PartitionTable {
  scheme: 'mbr' | 'gpt' | 'none';
  partitions: Partition[];
}

/** Reads `length` bytes at `offset` of the disk (short reads at the end are zero-filled). */
export type ReadAt = (offset: number, length: number) => Promise<Buffer>;

const EXTENDED_TYPES = new Set([0x05, 0x0f, 0x85]);
const MAX_LOGICAL = 128;
const MAX_GPT_ENTRIES = 1024;

function u64(buffer: Buffer, at: number): number {
  const value = buffer.readBigUInt64LE(at);
  return value > BigInt(Number.MAX_SAFE_INTEGER) ? Number.POSITIVE_INFINITY : Number(value);
}

function guid(bytes: Buffer): string {
  const hex = bytes.toString('hex');
  const swap = (s: string): string => s.match(/../g)!.reverse().join('');
  return `${swap(hex.slice(0, 8))}-${swap(hex.slice(8, 12))}-${swap(hex.slice(12, 16))}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

function hasBootSignature(sector: Buffer): boolean {
  return sector.length >= 512 && sector[510] === 0x55 && sector[511] === 0xaa;
}

export async function readPartitionTable(readAt: ReadAt, diskSize: number): Promise<PartitionTable> {
  const mbr = await readAt(0, 512);
  if (!hasBootSignature(mbr)) return { scheme: 'none', partitions: [] };
  const entries = [0, 1, 2, 3].map((i) => {
    const at = 446 + 16 * i;
    return { type: mbr[at + 4]!, firstLba: mbr.readUInt32LE(at + 8), sectors: mbr.readUInt32LE(at + 12) };
  });
  if (entries.some((e) => e.type === 0xee)) {
    for (const sectorSize of [512, 4096]) {
      const gpt = await readGpt(readAt, diskSize, sectorSize);
      if (gpt) return { scheme: 'gpt', partitions: gpt };
    }
    return { scheme: 'gpt', partitions: [] };
  }
  // A boot sector with a filesystem (FAT, NTFS) also ends in 55 AA: only plausible entries count.
  const partitions: Partition[] = [];
  for (const [i, entry] of entries.entries()) {
    if (entry.type === 0 || entry.sectors === 0) continue;
    const offset = entry.firstLba * 512;
    const length = entry.sectors * 512;
    if (entry.firstLba === 0 || offset + length > diskSize) continue;
    if (EXTENDED_TYPES.has(entry.type)) partitions.push(...(await readLogical(readAt, diskSize, entry.firstLba)));
    else partitions.push({ number: i + 1, offset, length, type: entry.type.toString(16).padStart(2, '0') });
  }
  return partitions.length > 0 ? { scheme: 'mbr', partitions: partitions.sort((a, b) => a.number - b.number) } : { scheme: 'none', partitions: [] };
}

/** The EBR chain: each EBR's first entry is a logical partition (relative to the EBR), its second the next EBR (relative to the extended partition). */
async function readLogical(readAt: ReadAt, diskSize: number, extendedLba: number): Promise<Partition[]> {
  const found: Partition[] = [];
  let ebrLba = extendedLba;
  const seen = new Set<number>();
  while (found.length < MAX_LOGICAL && !seen.has(ebrLba) && ebrLba * 512 + 512 <= diskSize) {
    seen.add(ebrLba);
    const ebr = await readAt(ebrLba * 512, 512);
    if (!hasBootSignature(ebr)) break;
    const type = ebr[446 + 4]!;
    const first = ebr.readUInt32LE(446 + 8);
    const sectors = ebr.readUInt32LE(446 + 12);
    const offset = (ebrLba + first) * 512;
    if (type !== 0 && sectors > 0 && first > 0 && offset + sectors * 512 <= diskSize) {
      found.push({ number: 5 + found.length, offset, length: sectors * 512, type: type.toString(16).padStart(2, '0') });
    }
    const next = ebr.readUInt32LE(446 + 16 + 8);
    if (next === 0) break;
    ebrLba = extendedLba + next;
  }
  return found;
}

async function readGpt(readAt: ReadAt, diskSize: number, sectorSize: number): Promise<Partition[] | undefined> {
  const header = await readAt(sectorSize, 92);
  if (header.toString('latin1', 0, 8) !== 'EFI PART') return undefined;
  const entriesLba = u64(header, 72);
  const count = header.readUInt32LE(80);
  const entrySize = header.readUInt32LE(84);
  if (entrySize < 128 || entrySize > 4096 || count === 0 || count > MAX_GPT_ENTRIES) return undefined;
  const tableOffset = entriesLba * sectorSize;
  if (!Number.isFinite(tableOffset) || tableOffset + count * entrySize > diskSize) return undefined;
  const table = await readAt(tableOffset, count * entrySize);
  const partitions: Partition[] = [];
  for (let i = 0; i < count; i += 1) {
    const entry = table.subarray(i * entrySize, (i + 1) * entrySize);
    const type = entry.subarray(0, 16);
    if (type.equals(Buffer.alloc(16))) continue;
    const first = u64(entry, 32);
    const last = u64(entry, 40);
    const offset = first * sectorSize;
    const length = (last - first + 1) * sectorSize;
    if (!(last >= first) || !Number.isFinite(offset) || offset + length > diskSize) continue;
    partitions.push({ number: i + 1, offset, length, type: guid(type) });
  }
  return partitions;
}
