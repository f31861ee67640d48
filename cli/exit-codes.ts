import type { ErrorCode } from '../repo-format/errors.js';

/** Documented in SPEC.md, "Exit codes". Stable: scripts depend on them. */
export const EXIT = {
  ok: 0,
  failed: 1,
  usage: 2,
  locked: 3,
  integrity: 4,
  notARepository: 5,
  passphrase: 6,
  interrupted: 130,
} as const;

export function exitCodeFor(code: ErrorCode | undefined): number {
  switch (code) {
    case 'ENGINE_INVALID_ARGUMENT':
      return EXIT.usage;
    case 'ENGINE_REPOSITORY_LOCKED':
      return EXIT.locked;
    case 'ENGINE_CORRUPT_FRAME':
    case 'ENGINE_CORRUPT_PACK':
    case 'ENGINE_CORRUPT_METADATA':
    case 'ENGINE_MISSING_BLOB':
      return EXIT.integrity;
    case 'ENGINE_NOT_A_REPOSITORY':
    case 'ENGINE_FORMAT_TOO_NEW':
      return EXIT.notARepository;
    case 'ENGINE_INTERRUPTED':
      return EXIT.interrupted;
    case 'ENGINE_WRONG_PASSPHRASE':
    case 'ENGINE_PASSPHRASE_REQUIRED':
    case 'ENGINE_NOT_ENCRYPTED':
      return EXIT.passphrase;
    default:
      return EXIT.failed;
  }
}
