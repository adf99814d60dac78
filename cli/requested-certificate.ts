// --request-certificate, for the agent and the mediator: the component asks the operator for
// its certificate (with its pod's token), writes it to --tls-dir (or a private temporary
// directory) and renews it before it expires.
import type { KubeClient } from '../lib/kube-rest/client';
import type { Logger } from '../lib/logger';
import {
  CertificateRequester,
  type CertificateRequesterOptions,
} from '../lib/tls/certificate-requester';
import type { TransportFlags } from '../lib/tls/transport';
import { issuedTlsDir } from './transport-flags';

export interface RequestFlags extends TransportFlags {
  namespace: string;
}

/** Obtains the first certificate; the requester it returns renews it until stopped. */
export async function requestCertificate(
  kube: KubeClient,
  opts: RequestFlags,
  identity: CertificateRequesterOptions['identity'],
  log: Logger,
): Promise<{ tlsDir: string; requester: CertificateRequester }> {
  const tlsDir = issuedTlsDir(opts, '--request-certificate', identity.role);
  const requester = new CertificateRequester({
    kube,
    identity,
    namespace: opts.namespace,
    dir: tlsDir,
    log: log.child({ subsystem: 'certificates' }),
  });
  requester.start((await requester.obtain()).notAfter);
  return { tlsDir, requester };
}
