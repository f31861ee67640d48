/**
 * Each s3:// repository of the server's config that has an `s3` block (config.ts) gets its store, region,
 * addressing, ACL and keys from that block, registered for its location (repo-format/v3/location.ts) before
 * any job or catalogue request opens it: one server can own repositories on two stores with two users' keys,
 * and nothing of them comes from the server's environment. The keys are read from the credentials file once,
 * at start (a file that changes takes effect at the next start), in the AWS shared credentials format the
 * CLI reads (s3-credentials.ts); a file other users can read is warned about, as by the CLI.
 */
import { resolveCredentials } from '../../repo-format/storage/s3-credentials.js';
import { registerS3Settings } from '../../repo-format/v3/location.js';
import type { ServerConfig } from './config.js';

export async function applyS3Settings(config: ServerConfig, onLog: (message: string) => void): Promise<void> {
  for (const repo of config.repositories.values()) {
    const s3 = repo.s3;
    if (s3 === undefined) continue;
    // Only the named file and section: AWS_CONFIG_FILE pointed at nothing, no AWS_* variable, no ~/.aws.
    const env = { AWS_SHARED_CREDENTIALS_FILE: s3.credentialsFile, AWS_PROFILE: s3.profile, AWS_CONFIG_FILE: '/dev/null', HOME: '/nonexistent' };
    const resolved = await resolveCredentials(env, `repositories.${repo.name} (${repo.location})`);
    for (const warning of resolved.warnings) onLog(warning);
    registerS3Settings(repo.location, { endpoint: s3.endpoint, region: s3.region, pathStyle: s3.pathStyle, cannedAcl: s3.acl, caFile: s3.caFile, credentials: resolved.credentials, env: {} });
  }
}
