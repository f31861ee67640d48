/**
 * What the NBD server serves: an export is a size, a name and a handful of async operations. The server
 * (server.ts) speaks the protocol and validates every request against `size` before calling these, so an
 * export never sees a range outside [0, size) or longer than the server's maximum request.
 */

/** A piece of a read: bytes, or a range that reads as zeros (sent as a hole when the client allows). */
export type ReadPiece = { offset: number; data: Buffer } | { offset: number; length: number; zero: true };

/** One base:allocation extent: `flags` is a combination of NBD_STATE_HOLE and NBD_STATE_ZERO. */
export interface AllocationExtent {
  length: number;
  flags: number;
}

export interface NbdExport {
  readonly name: string;
  readonly description: string;
  readonly size: number;
  readonly writable: boolean;
  /** Pieces covering exactly [offset, offset + length), in order. */
  read(offset: number, length: number): Promise<ReadPiece[]>;
  /** base:allocation from `offset`: consecutive extents covering at least one byte of the range. */
  allocation(offset: number, length: number): Promise<AllocationExtent[]>;
  write?(data: Buffer, offset: number): Promise<void>;
  writeZeroes?(offset: number, length: number): Promise<void>;
  trim?(offset: number, length: number): Promise<void>;
  flush?(): Promise<void>;
}

/** An export's refusal with a specific NBD error value (NBD_EIO, NBD_ENOSPC, …). */
export class ExportError extends Error {
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
  }
}
