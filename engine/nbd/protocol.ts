/**
 * NBD protocol values, from the NBD protocol document (NetworkBlockDevice/nbd doc/proto.md) and qemu's
 * docs/interop/nbd.rst. All integers on the wire are big-endian.
 */
export const NBDMAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const OPTION_REPLY_MAGIC = 0x0003e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server) and client flags. */
export const FLAG_FIXED_NEWSTYLE = 1;
export const FLAG_NO_ZEROES = 2;

/** Options. */
export const OPT_EXPORT_NAME = 1;
export const OPT_ABORT = 2;
export const OPT_LIST = 3;
export const OPT_STARTTLS = 5;
export const OPT_INFO = 6;
export const OPT_GO = 7;
export const OPT_STRUCTURED_REPLY = 8;
export const OPT_LIST_META_CONTEXT = 9;
export const OPT_SET_META_CONTEXT = 10;

/** Option replies; errors have bit 31 set. */
export const REP_ACK = 1;
export const REP_SERVER = 2;
export const REP_INFO = 3;
export const REP_META_CONTEXT = 4;
export const REP_ERROR_BIT = 2 ** 31;
export const REP_ERR_UNSUP = REP_ERROR_BIT + 1;
export const REP_ERR_POLICY = REP_ERROR_BIT + 2;
export const REP_ERR_INVALID = REP_ERROR_BIT + 3;
export const REP_ERR_TLS_REQD = REP_ERROR_BIT + 5;
export const REP_ERR_UNKNOWN = REP_ERROR_BIT + 6;
export const REP_ERR_SHUTDOWN = REP_ERROR_BIT + 7;
export const REP_ERR_TOO_BIG = REP_ERROR_BIT + 9;
export const REP_ERRORS: Record<number, string> = {
  [REP_ERROR_BIT + 1]: 'NBD_REP_ERR_UNSUP (option not supported)',
  [REP_ERROR_BIT + 2]: 'NBD_REP_ERR_POLICY (refused by server policy)',
  [REP_ERROR_BIT + 3]: 'NBD_REP_ERR_INVALID (invalid option)',
  [REP_ERROR_BIT + 4]: 'NBD_REP_ERR_PLATFORM',
  [REP_ERROR_BIT + 5]: 'NBD_REP_ERR_TLS_REQD (the server requires TLS)',
  [REP_ERROR_BIT + 6]: 'NBD_REP_ERR_UNKNOWN (no such export)',
  [REP_ERROR_BIT + 7]: 'NBD_REP_ERR_SHUTDOWN (server shutting down)',
  [REP_ERROR_BIT + 8]: 'NBD_REP_ERR_BLOCK_SIZE_REQD',
  [REP_ERROR_BIT + 9]: 'NBD_REP_ERR_TOO_BIG',
};

/** NBD_INFO types (NBD_OPT_GO / NBD_OPT_INFO). */
export const INFO_EXPORT = 0;
export const INFO_NAME = 1;
export const INFO_DESCRIPTION = 2;
export const INFO_BLOCK_SIZE = 3;

/** Transmission flags. */
export const TFLAG_HAS_FLAGS = 1;
export const TFLAG_READ_ONLY = 2;
export const TFLAG_SEND_FLUSH = 4;
export const TFLAG_SEND_FUA = 8;
export const TFLAG_SEND_TRIM = 32;
export const TFLAG_SEND_WRITE_ZEROES = 64;
export const TFLAG_CAN_MULTI_CONN = 256;

/** Commands and command flags. */
export const CMD_READ = 0;
export const CMD_WRITE = 1;
export const CMD_DISC = 2;
export const CMD_FLUSH = 3;
export const CMD_TRIM = 4;
export const CMD_WRITE_ZEROES = 6;
export const CMD_CACHE = 5;
export const CMD_BLOCK_STATUS = 7;
export const CMD_FLAG_FUA = 1;
export const CMD_FLAG_NO_HOLE = 2;
export const CMD_FLAG_DF = 4;
export const CMD_FLAG_REQ_ONE = 8;

/** Structured reply flags and chunk types. */
export const REPLY_FLAG_DONE = 1;
export const REPLY_TYPE_NONE = 0;
export const REPLY_TYPE_OFFSET_DATA = 1;
export const REPLY_TYPE_OFFSET_HOLE = 2;
export const REPLY_TYPE_BLOCK_STATUS = 5;
export const REPLY_TYPE_ERROR_BIT = 2 ** 15;
export const REPLY_TYPE_ERROR = REPLY_TYPE_ERROR_BIT + 1;

/** base:allocation flags; qemu:dirty-bitmap:* uses bit 0 for "dirty". */
export const STATE_HOLE = 1;
export const STATE_ZERO = 2;
export const STATE_DIRTY = 1;

export const CONTEXT_BASE_ALLOCATION = 'base:allocation';

/** Error values (NBD_E*). */
export const NBD_EPERM = 1;
export const NBD_EIO = 5;
export const NBD_EINVAL = 22;
export const NBD_ENOSPC = 28;
export const NBD_EOVERFLOW = 75;
export const NBD_ENOTSUP = 95;
export const NBD_ESHUTDOWN = 108;

/** Error names, for messages. */
export const ERRNO_NAMES: Record<number, string> = {
  1: 'EPERM',
  5: 'EIO',
  12: 'ENOMEM',
  22: 'EINVAL',
  28: 'ENOSPC',
  75: 'EOVERFLOW',
  95: 'ENOTSUP',
  108: 'ESHUTDOWN',
};

/** Limits this client enforces on what a server sends. */
export const MAX_OPTION_REPLY = 64 * 1024;
export const MAX_STRING = 4096;
