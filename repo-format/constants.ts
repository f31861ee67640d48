/**
 * Every magic number, version and limit of the repository format. PLEASE DO NOT CHANGE a value here
 * without bumping FORMAT_VERSION and describing the change in SPEC.md ("Changes").
 */

/** The format of unencrypted repositories: what this code writes for them and the newest it reads. */
export const FORMAT_VERSION = 1;
/** The format of encrypted repositories (keyed blob ids, AES-256-GCM frames and records): SPEC.md, section 18. */
export const ENCRYPTED_FORMAT_VERSION = 2;
/** Many writers, on a folder or on S3, plain or encrypted (SPEC.md, section 19). */
export const MANY_WRITERS_FORMAT_VERSION = 3;
/** `init`'s lease timing of a version-3 repository (SPEC.md 19.1): T and B, in milliseconds. */
export const LEASE_TIME_MS = 300_000;
export const LEASE_SKEW_BOUND_MS = 60_000;

/** `config` file `format` field: tells a repository apart from any other JSON file. */
export const CONFIG_FORMAT_NAME = 'vm-backup-engine repository';

export const HASH_ID = 'sha256';
export const CHECKSUM_ID = 'xxh64';
/** `config.compression` of a repository whose writers compress with lz4 (every repository before zstd). */
export const COMPRESSION_ID = 'lz4-block';
/** `config.compression` of a repository whose writers compress with zstd at `config.compressionLevel` (SPEC.md 3, 5). */
export const ZSTD_COMPRESSION_ID = 'zstd';
/** zstd levels `init` accepts: 1 (fastest of the regular levels) to 19 (the slowest before the --ultra ones). */
export const MIN_ZSTD_LEVEL = 1;
export const MAX_ZSTD_LEVEL = 19;
/** Blob ids of encrypted repositories: HMAC-SHA256 under the repository's id key. */
export const KEYED_HASH_ID = 'hmac-sha256';
export const CIPHER_ID = 'aes-256-gcm' as const;
export const KDF_ID = 'scrypt' as const;

/** Pack file header: "EPACK" + 0x00 0x01 0x0a (format 1), 8 bytes. */
export const PACK_MAGIC = Buffer.from([0x45, 0x50, 0x41, 0x43, 0x4b, 0x00, 0x01, 0x0a]);
export const PACK_HEADER_SIZE = 32;
export const PACK_VERSION = 1;

/** Frame header magic "EFRM". */
export const FRAME_MAGIC = 0x4d524645; // "EFRM" read as a little-endian u32
export const FRAME_HEADER_SIZE = 48;
export const FRAME_TRAILER_SIZE = 8;
export const FRAME_OVERHEAD = FRAME_HEADER_SIZE + FRAME_TRAILER_SIZE;

export const ID_SIZE = 32;
export const PACK_ID_SIZE = 16;

/** Frame kinds. */
export const KIND_DATA = 1;
export const KIND_MAP_LEAF = 2;
export const KIND_MAP_NODE = 3;

/**
 * Frame flags. Bit 1 is set on every frame of an encrypted repository and on none of a plain one. Bits 0 and
 * 2 say how the payload is compressed (at most one of them); bits 3..7 are reserved.
 */
export const FLAG_LZ4 = 1;
export const FLAG_ENCRYPTED = 2;
export const FLAG_ZSTD = 4;
/** The flags that say the payload is compressed. */
export const COMPRESSION_FLAGS = FLAG_LZ4 | FLAG_ZSTD;
/** Flags a frame of an unencrypted repository may carry. */
export const KNOWN_FRAME_FLAGS = FLAG_LZ4 | FLAG_ZSTD;
/** Flags a frame of an encrypted repository may carry (FLAG_ENCRYPTED is required there). */
export const KNOWN_ENCRYPTED_FRAME_FLAGS = FLAG_LZ4 | FLAG_ZSTD | FLAG_ENCRYPTED;

/** AES-256-GCM: 32-byte keys, a random 12-byte nonce before the ciphertext, a 16-byte tag after it. */
export const KEY_SIZE = 32;
export const GCM_NONCE_SIZE = 12;
export const GCM_TAG_SIZE = 16;
export const ENCRYPTION_OVERHEAD = GCM_NONCE_SIZE + GCM_TAG_SIZE;

/** Encrypted metadata files (backup records): "EENC" || version byte 1 || nonce || ciphertext || tag. */
export const SEALED_METADATA_MAGIC = Buffer.from('EENC', 'latin1');
export const SEALED_METADATA_VERSION = 1;
export const SEALED_METADATA_HEADER_SIZE = SEALED_METADATA_MAGIC.length + 1;

/** scrypt parameters written by init, and the bounds a key file's parameters must respect (a cost cap against a forged file). */
export const SCRYPT_DEFAULTS = { N: 2 ** 15, r: 8, p: 1 } as const;
export const SCRYPT_MIN_N = 2 ** 15;
export const SCRYPT_MAX_MEMORY = 1024 * 1024 * 1024;
export const SCRYPT_SALT_SIZE = 32;

/** Block size bounds: a power of two, a multiple of 64 KiB (QEMU's dirty-bitmap granularity). */
export const MIN_BLOCK_SIZE = 64 * 1024;
export const MAX_BLOCK_SIZE = 16 * 1024 * 1024;
export const DEFAULT_BLOCK_SIZE = 1024 * 1024;

/** Largest raw length a frame may declare; anything bigger is corruption, never an allocation. */
export const MAX_FRAME_RAW_LENGTH = MAX_BLOCK_SIZE;
/** Largest frame of any repository: an incompressible block, encrypted. */
export const MAX_FRAME_LENGTH = FRAME_OVERHEAD + ENCRYPTION_OVERHEAD + MAX_FRAME_RAW_LENGTH;

/** Packs are sealed once they reach this many bytes (the spec allows 16–64 MiB). */
export const PACK_TARGET_SIZE = 32 * 1024 * 1024;
/** A pack must never exceed this size: offsets inside a pack are u32. */
export const PACK_MAX_SIZE = 0xffff_ffff;

/**
 * The largest disk a backup record may describe: 1 PiB (2^50 bytes), 16 times the 64 TiB of the largest
 * virtual disks in use (VHDX, VMware, thin LUNs). At the smallest block size (64 KiB) that is 2^34 blocks,
 * a map of depth 3. Readers refuse larger records as damaged (SPEC.md, section 9), so that no size in a
 * record can make them plan more than this.
 */
export const MAX_DISK_SIZE = 2 ** 50;

/**
 * Largest files of their kind this engine writes, and so the most a reader reads of one (bounded-read.ts):
 * `config` and key files are well under 1 KiB; a backup record holds its disks and attachments (a VM's
 * OVF, tens of KiB); locks, registrations, quarantine records and journals are small JSON.
 */
export const CONFIG_FILE_LIMIT = 64 * 1024;
export const KEY_FILE_LIMIT = 64 * 1024;
export const RECORD_FILE_LIMIT = 16 * 1024 * 1024;
export const SMALL_FILE_LIMIT = 1024 * 1024;

/** Entries per map page (leaf or node). 1024 × 32 B = 32 KiB pages. */
export const MAP_PAGE_ENTRIES = 1024;

/** The map entry and page id that mean "all zeros". SHA-256 never yields 32 zero bytes in practice. */
export const ZERO_ID = Buffer.alloc(ID_SIZE);

/** LevelDB key prefixes. */
export const KEY_PREFIX_META = 0x00;
export const KEY_PREFIX_BLOB = 0x01;
export const KEY_PREFIX_BACKUP = 0x02;

/** Index entry value size. */
export const INDEX_ENTRY_SIZE = 30;

/** Repository layout, relative to the repository root. */
export const LAYOUT = {
  config: 'config',
  packs: 'packs',
  backups: 'backups',
  index: 'index',
  tmp: 'tmp',
  lock: 'lock',
  readers: 'readers',
  keys: 'keys',
  writers: 'writers',
  protected: 'protected',
  quarantine: 'quarantine',
  reserve: 'reserve',
} as const;

/**
 * The space reserve (space-reserve.ts): what a command that frees space needs on a full disk to take the
 * lock and open the index (LevelDB writes a new manifest, log and at most one table of its old log, whose
 * size is bounded by its 4 MiB write buffer), with room to spare.
 */
export const RESERVE_SIZE = 8 * 1024 * 1024;

/** gc rewrites a pack whose live bytes are under this fraction of its frames' bytes (default). */
export const GC_DEFAULT_REWRITE_BELOW = 0.5;
