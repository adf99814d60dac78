// --request-certificate, for the agent and the mediator: the component asks the operator for
// its certificate (with its pod's token), writes it to --tls-dir (or a private temporary
// directory) and renews it before it expires. Loaded only when used: the Kubernetes client
// adds ~0.15 s to start-up.
import type * as KubeModule from '../lib/kube';
import type { Logger } from '../lib/logger';
import type * as RequesterModule from '../lib/tls/certificate-requester';
import type { TransportFlags } from '../lib/tls/transport';
import { issuedTlsDir } from './transport-flags';

export interface RequestFlags extends TransportFlags {
  kubeconfig?: string;
  namespace: string;
}

/** Obtains the first certificate; the requester it returns renews it until stopped. */
export async function requestCertificate(
  opts: RequestFlags,
  identity: RequesterModule.CertificateRequesterOptions['identity'],
  log: Logger,
): Promise<{ tlsDir: string; requester: RequesterModule.CertificateRequester }> {
  /* eslint-disable @typescript-eslint/no-require-imports */
  const { loadKubeConfig } = require('../lib/kube') as typeof KubeModule;
  const { CertificateRequester } =
    require('../lib/tls/certificate-requester') as typeof RequesterModule;
  /* eslint-enable @typescript-eslint/no-require-imports */
  const tlsDir = issuedTlsDir(opts, '--request-certificate', identity.role);
  const requester = new CertificateRequester({
    kc: loadKubeConfig(opts.kubeconfig),
    identity,
    namespace: opts.namespace,
    dir: tlsDir,
    log: log.child({ subsystem: 'certificates' }),
  });
  requester.start((await requester.obtain()).notAfter);
  return { tlsDir, requester };
}
