/**
 * An opened restore target, whatever its kind (a local file or device, an NBD export, a new qcow2 image, an
 * oVirt imageio upload): what the restore pipeline writes through.
 */
export interface TargetWriter {
  /** Where it writes, for messages and the result (a path, an NBD URI, a transfer URL). */
  readonly path: string;
  /** True when unwritten ranges already read as zeros (a new sparse file, a new disk). */
  readonly zeroed: boolean;
  /** True when this restore created the target: discard() removes it. */
  readonly created?: boolean;
  write(data: Buffer, offset: number): Promise<void>;
  /** Zeroes a range without sending zeros where the target can (NBD WRITE_ZEROES); absent: zeros are written. */
  writeZeroes?(offset: number, length: number): Promise<void>;
  /** Reads the target's present content (a rollback compares it with the restore point). */
  read?(target: Buffer, offset: number): Promise<void>;
  /** Flushes to stable storage; a restore is not reported done before this resolves. */
  finish(): Promise<void>;
  /** Closes after a failure; removes the file if this restore created it. */
  discard(): Promise<void>;
  /**
   * Optional, for a target whose writes are requests to a server (NBD): after a failure or an interruption,
   * the writes and reads in flight fail at once instead of being waited for (a stalled server would hold the
   * restore until it answers). discard() follows.
   */
  abandon?(): Promise<void>;
}
