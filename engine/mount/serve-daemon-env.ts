/** The environment variable through which mount.ts hands the passphrase's bytes (base64) to its background server. */
export const MOUNT_PASSPHRASE_VARIABLE = 'ENGINE_MOUNT_PASSPHRASE_BASE64';
