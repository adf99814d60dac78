// A component's certificate in a cluster whose operator manages them (an agent's, for its node;
// the mediator's): the component makes its key (which never leaves its pod), asks for a
// certificate through a Kubernetes CertificateSigningRequest made with its pod's own token, and
// writes what the operator signs into its --tls-dir, with the CA bundle. It asks again when two
// thirds of the certificate's life are gone; its TlsDir takes the new files up without dropping
// a connection.
import { X509Certificate, createPrivateKey } from 'node:crypto';
import { LockstepError, errorMessage } from '../errors';
import type { KubeClient, ObjectMeta } from '../kube-rest/client';
import type { Logger } from '../logger';
import { createCertificateRequestApart } from './certificate-request-process';
import { writeTlsDir } from './tls-dir';
import type { Identity } from './identity';
import {
  AGENT_SIGNER,
  CA_BUNDLE_CONFIGMAP,
  CA_BUNDLE_KEY,
  MEDIATOR_SIGNER,
  renewalDelay,
} from './in-cluster';

export interface CertificateRequesterOptions {
  kube: KubeClient;
  /** An agent (named after its node) or the mediator. */
  identity: Identity & { role: 'agent' | 'mediator' };
  /** The operator's namespace, where the CA bundle is published. */
  namespace: string;
  /** The --tls-dir the certificate is written to. */
  dir: string;
  log: Logger;
  /** How often a pending request is looked at. */
  pollMs?: number;
}

/** A certificates.k8s.io/v1 CertificateSigningRequest, the fields the requester uses. */
interface CertificateSigningRequest {
  apiVersion: 'certificates.k8s.io/v1';
  kind: 'CertificateSigningRequest';
  metadata: ObjectMeta;
  spec: { request: string; signerName: string; usages: string[] };
  status?: {
    /** PEM, base64-encoded, once signed. */
    certificate?: string;
    conditions?: { type: string; status: string; reason?: string; message?: string }[];
  };
}

interface ConfigMap {
  data?: Record<string, string>;
}

const CSR_PATH = '/apis/certificates.k8s.io/v1/certificatesigningrequests';
const RETRY_MS = 10_000;
const WAITING_LOG_MS = 15_000;

export class CertificateRequester {
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;

  constructor(private readonly opts: CertificateRequesterOptions) {}

  /**
   * Asks for a certificate and writes it to the directory; resolves when it is there. A request
   * the operator denies is an error saying why; one nobody answers is waited for (the operator
   * may be starting), with a log line now and then.
   */
  async obtain(): Promise<{ notAfter: Date }> {
    const { identity, log } = this.opts;
    const { requestPem, keyPem } = await createCertificateRequestApart(identity);
    const created = await this.opts.kube.create<CertificateSigningRequest>(CSR_PATH, {
      apiVersion: 'certificates.k8s.io/v1',
      kind: 'CertificateSigningRequest',
      metadata: { generateName: `lockstep-${identity.role}-${identity.name}-` },
      spec: {
        request: Buffer.from(requestPem).toString('base64'),
        signerName: identity.role === 'mediator' ? MEDIATOR_SIGNER : AGENT_SIGNER,
        usages: ['digital signature', 'server auth', 'client auth'],
      },
    });
    const name = created.metadata.name ?? '';
    log.info({ request: name }, 'asked the operator for a certificate');
    const certPem = await this.issued(name);
    const cert = new X509Certificate(certPem);
    if (!cert.checkPrivateKey(createPrivateKey(keyPem)))
      throw new LockstepError(
        'LOCKSTEP_ERR_INVALID_ARGUMENT',
        `certificate request ${name} was answered with a certificate for another key`,
      );
    await writeTlsDir(this.opts.dir, await this.caBundle(), { certPem, keyPem });
    const notAfter = new Date(cert.validTo);
    log.info({ request: name, notAfter }, 'certificate issued');
    return { notAfter };
  }

  /** Renews the certificate from now on, before it expires. */
  start(notAfter: Date): void {
    this.schedule(renewalDelay(notAfter));
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
  }

  private schedule(ms: number): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => void this.renew(), ms);
    this.timer.unref();
  }

  private async renew(): Promise<void> {
    try {
      const { notAfter } = await this.obtain();
      this.schedule(renewalDelay(notAfter));
    } catch (err) {
      this.opts.log.warn({ err: errorMessage(err) }, 'certificate renewal failed; retrying');
      this.schedule(RETRY_MS);
    }
  }

  private async issued(name: string): Promise<string> {
    const pollMs = this.opts.pollMs ?? 500;
    let lastLog = Date.now();
    for (;;) {
      if (this.stopped)
        throw new LockstepError(
          'LOCKSTEP_ERR_UNAVAILABLE',
          'stopped while waiting for a certificate',
        );
      const csr = await this.opts.kube.get<CertificateSigningRequest>(
        `${CSR_PATH}/${encodeURIComponent(name)}`,
      );
      const refused = csr.status?.conditions?.find(
        (c) => (c.type === 'Denied' || c.type === 'Failed') && c.status === 'True',
      );
      if (refused)
        throw new LockstepError(
          'LOCKSTEP_ERR_PERMISSION_DENIED',
          `certificate request ${name} ${refused.type.toLowerCase()}: ${refused.message ?? refused.reason ?? 'no reason given'}`,
        );
      if (csr.status?.certificate) return Buffer.from(csr.status.certificate, 'base64').toString();
      if (Date.now() - lastLog >= WAITING_LOG_MS) {
        lastLog = Date.now();
        this.opts.log.warn(
          { request: name },
          'still waiting for the operator to sign the certificate request (is it running with --manage-certificates?)',
        );
      }
      await new Promise((r) => setTimeout(r, pollMs));
    }
  }

  private async caBundle(): Promise<string> {
    const { namespace } = this.opts;
    try {
      const cm = await this.opts.kube.get<ConfigMap>(
        `/api/v1/namespaces/${encodeURIComponent(namespace)}/configmaps/${CA_BUNDLE_CONFIGMAP}`,
      );
      const pem = cm.data?.[CA_BUNDLE_KEY];
      if (pem) return pem;
    } catch (err) {
      throw new LockstepError(
        'LOCKSTEP_ERR_UNAVAILABLE',
        `cannot read the CA bundle (ConfigMap ${namespace}/${CA_BUNDLE_CONFIGMAP}): ${errorMessage(err)}`,
      );
    }
    throw new LockstepError(
      'LOCKSTEP_ERR_UNAVAILABLE',
      `ConfigMap ${namespace}/${CA_BUNDLE_CONFIGMAP} has no ${CA_BUNDLE_KEY}`,
    );
  }
}
