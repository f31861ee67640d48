/**
 * What the oVirt tests share when they run the CLI against the simulator (test/ovirt-sim/): the environment
 * and the shape of the backup JSON they read.
 */

/**
 * Credentials from the environment; conflicts retried quickly (the simulator's 409s do not clear up with
 * time); plain http said explicitly, as a user must (--insecure-http, here through the environment): the
 * simulator serves https only when a test starts it with TLS.
 */
export const SIM_ENV = { ENGINE_OVIRT_USER: 'admin@internal', ENGINE_OVIRT_PASSWORD: 'secret', ENGINE_OVIRT_CONFLICT_DELAY_MS: '20', ENGINE_OVIRT_INSECURE_HTTP: '1' };

/** A disk of `engine backup --ovirt … --json`. */
export interface OvirtDiskJson {
  name: string;
  mode: string;
  modeReason: string | null;
  parent: string | null;
  checkpoint: string | null;
  bytesRead: number;
}

/** `engine backup --ovirt … --json`, as far as the oVirt tests read it. */
export interface OvirtBackupJson {
  id: string;
  type: string;
  disks: OvirtDiskJson[];
}
