/**
 * One line for a TLS failure, whoever met it (the oVirt client, imageio, the NBD client and server). Node's
 * messages run over several lines (a hostname mismatch lists the certificate's names, a self-signed one
 * adds advice about Node's own flags that a user of the engine cannot act on); the user needs what went
 * wrong and the code to search for.
 */

const REASONS: Record<string, string> = {
  DEPTH_ZERO_SELF_SIGNED_CERT: 'the peer certificate is self-signed and not the trusted CA',
  SELF_SIGNED_CERT_IN_CHAIN: 'the peer certificate chains to a CA that is not trusted',
  UNABLE_TO_VERIFY_LEAF_SIGNATURE: 'the peer certificate is not signed by a trusted CA',
  UNABLE_TO_GET_ISSUER_CERT_LOCALLY: 'the peer certificate is not signed by a trusted CA',
  UNABLE_TO_GET_ISSUER_CERT: 'the peer certificate is not signed by a trusted CA',
  CERT_HAS_EXPIRED: 'the peer certificate has expired',
  CERT_NOT_YET_VALID: 'the peer certificate is not valid yet',
  CERT_REVOKED: 'the peer certificate is revoked',
  ERR_TLS_CERT_ALTNAME_INVALID: 'the peer certificate is for another host name',
  ERR_SSL_WRONG_VERSION_NUMBER: 'the peer does not speak TLS there',
  ERR_SSL_TLSV1_ALERT_UNKNOWN_CA: 'the peer does not trust our certificate',
  ERR_SSL_SSLV3_ALERT_BAD_CERTIFICATE: 'the peer refused our certificate',
  ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED: 'the peer requires a client certificate',
  ERR_SSL_PEER_DID_NOT_RETURN_A_CERTIFICATE: 'the peer presented no certificate',
  'ERR_SSL_SSL/TLS_ALERT_HANDSHAKE_FAILURE': 'the peer refused the handshake (an unknown PSK identity or key, or a certificate it does not accept)',
  ERR_SSL_SSLV3_ALERT_HANDSHAKE_FAILURE: 'no common TLS parameters (or a PSK the peer does not know)',
  ERR_SSL_NO_SHARED_CIPHER: 'no common cipher suite (or a PSK identity that is not known)',
  ERR_SSL_TLSV1_ALERT_DECRYPT_ERROR: 'the pre-shared keys differ',
  ERR_SSL_BINDER_DOES_NOT_VERIFY: 'the pre-shared keys differ',
  ERR_SSL_DECRYPTION_FAILED_OR_BAD_RECORD_MAC: 'the pre-shared keys differ',
  ERR_TLS_HANDSHAKE_TIMEOUT: 'the TLS handshake timed out',
  ERR_SSL_NO_SUITABLE_SIGNATURE_ALGORITHM: 'the peer offered no credentials this end accepts (an unknown PSK identity, or no certificate)',
};

/** OpenSSL's own format, "40ADA709…:error:0A0000C7:SSL routines:function:reason:file:line": the reason. */
function opensslReason(message: string): string | undefined {
  return /^[0-9A-F]+:error:[0-9A-F]+:[^:]+:[^:]+:([^:]+):/.exec(message)?.[1];
}

/** The error's first line, without Node's advice, and a plain-words reason for the codes users meet. */
export function describeTlsError(error: Error): string {
  const code = (error as NodeJS.ErrnoException).code;
  const first = (opensslReason(error.message) ?? error.message.split('\n')[0] ?? '')
    .replace(/; if the root CA is installed locally.*$/, '')
    .replace(/^Client network socket disconnected before secure TLS connection was established$/, 'the peer closed the connection during the TLS handshake')
    .replace(/:\s*$/, '')
    .trim();
  const reason = code !== undefined ? REASONS[code] : undefined;
  const detail = code !== undefined && !first.includes(code) ? `${first}, ${code}` : first;
  return reason ? `${reason} (${detail})` : detail;
}
