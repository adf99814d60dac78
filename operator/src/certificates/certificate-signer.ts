// The signers `lockstep.dev/agent` and `lockstep.dev/mediator`, as kube-controller-manager
// signs for its own signers: the leader approves or denies each request made to them
// (request-policy.ts decides) and puts
// the certificate into the approved ones' status. Requests that were answered are deleted an
// hour later, as the csrcleaner does for the built-in signers.
import * as k8s from '@kubernetes/client-node';
import type * as x509 from '@peculiar/x509';
import { errorMessage } from '../../../lib/errors';
import { isNotFound } from '../../../lib/kube';
import type { Logger } from '../../../lib/logger';
import { readCertificateRequest, signPublicKey } from '../../../lib/tls/certificate-authority';
import { describeIdentity } from '../../../lib/tls/identity';
import type { SupervisedInformer } from '../informers/supervised-informer';
import type { ControllerMetrics } from '../metrics';
import type { ReconcileResult } from '../workqueue/controller-loop';
import { SIGNERS, judgeRequest, requestingPod, type Verdict } from './request-policy';
import type { ClusterAuthority } from './cluster-authority';

export interface SignerDeps {
  requests: SupervisedInformer<k8s.V1CertificateSigningRequest>;
  authority: ClusterAuthority;
  kc: k8s.KubeConfig;
  namespace: string;
  metrics: ControllerMetrics;
  log: Logger;
}

/** How long an answered request is kept (the csrcleaner's figure for approved ones). */
export const ANSWERED_KEPT_MS = 3_600_000;

type Csr = k8s.V1CertificateSigningRequest;
/** A verdict; a grant carries the key the request proved it holds. */
type Examined =
  | Extract<Verdict, { grant: false }>
  | (Extract<Verdict, { grant: true }> & { publicKey: x509.PublicKey });

const condition = (csr: Csr, type: string) =>
  csr.status?.conditions?.find((c) => c.type === type && c.status === 'True');

export class CertificateSigner {
  private readonly certificates: k8s.CertificatesV1Api;
  private readonly core: k8s.CoreV1Api;

  constructor(private readonly deps: SignerDeps) {
    this.certificates = deps.kc.makeApiClient(k8s.CertificatesV1Api);
    this.core = deps.kc.makeApiClient(k8s.CoreV1Api);
  }

  static isOurs(csr: Csr): boolean {
    return SIGNERS.includes(csr.spec?.signerName);
  }

  async reconcile(name: string): Promise<ReconcileResult> {
    const csr = this.deps.requests.get(name);
    if (!csr || !CertificateSigner.isOurs(csr)) return;
    const answered =
      csr.status?.certificate || condition(csr, 'Denied') || condition(csr, 'Failed');
    if (answered) return this.collect(csr);
    if (!condition(csr, 'Approved')) return this.judge(csr);
    return this.sign(csr);
  }

  private async judge(csr: Csr): Promise<ReconcileResult> {
    const verdict = await this.examine(csr);
    if (!verdict.grant) {
      this.deps.log.warn(
        { request: csr.metadata?.name, reason: verdict.reason },
        'certificate request denied',
      );
      return this.answer(csr, 'Denied', 'NotEntitled', verdict.reason);
    }
    return this.answer(csr, 'Approved', 'Entitled', verdict.because);
  }

  private async sign(csr: Csr): Promise<ReconcileResult> {
    const { authority, log, metrics } = this.deps;
    // Judged again: the facts behind the approval (the pod, its node) are read fresh.
    const verdict = await this.examine(csr);
    if (!verdict.grant) return this.answer(csr, 'Failed', 'NotEntitled', verdict.reason);
    const ca = await authority.current();
    const { certPem, notAfter } = await signPublicKey(ca, verdict.identity, verdict.publicKey, {
      validMs: authority.lifetimeMs,
      dnsNames: verdict.dnsNames,
      ips: verdict.ips,
    });
    await this.certificates.replaceCertificateSigningRequestStatus({
      name: csr.metadata?.name ?? '',
      body: {
        ...withKind(csr),
        status: { ...csr.status, certificate: Buffer.from(certPem).toString('base64') },
      },
    });
    metrics.certificatesIssued.inc({ result: 'issued' });
    log.info(
      { request: csr.metadata?.name, holder: describeIdentity(verdict.identity), notAfter },
      'certificate issued',
    );
  }

  /** The request's verdict, from its PKCS#10 and the pod that made it, read now. */
  private async examine(csr: Csr): Promise<Examined> {
    let request: Awaited<ReturnType<typeof readCertificateRequest>>;
    try {
      request = await readCertificateRequest(decode(csr.spec.request));
    } catch (err) {
      return { grant: false, reason: errorMessage(err) };
    }
    const podName = requestingPod(csr);
    const verdict = judgeRequest({
      csr,
      requestedSubject: request.subject,
      pod: podName ? await this.pod(podName) : undefined,
      namespace: this.deps.namespace,
    });
    return verdict.grant ? { ...verdict, publicKey: request.publicKey } : verdict;
  }

  private async answer(
    csr: Csr,
    type: 'Approved' | 'Denied' | 'Failed',
    reason: string,
    message: string,
  ): Promise<ReconcileResult> {
    const now = new Date();
    const body: Csr = {
      ...withKind(csr),
      status: {
        ...csr.status,
        conditions: [
          ...(csr.status?.conditions ?? []),
          { type, status: 'True', reason, message, lastUpdateTime: now, lastTransitionTime: now },
        ],
      },
    };
    const name = csr.metadata?.name ?? '';
    if (type === 'Failed')
      await this.certificates.replaceCertificateSigningRequestStatus({ name, body });
    else await this.certificates.replaceCertificateSigningRequestApproval({ name, body });
    if (type !== 'Approved')
      this.deps.metrics.certificatesIssued.inc({ result: type.toLowerCase() });
  }

  private async collect(csr: Csr): Promise<ReconcileResult> {
    const created = csr.metadata?.creationTimestamp?.getTime() ?? Date.now();
    const left = created + ANSWERED_KEPT_MS - Date.now();
    if (left > 0) return { requeueAfterMs: left };
    try {
      await this.certificates.deleteCertificateSigningRequest({ name: csr.metadata?.name ?? '' });
    } catch (err) {
      if (!isNotFound(err)) throw err;
    }
  }

  private async pod(name: string): Promise<k8s.V1Pod | undefined> {
    try {
      return await this.core.readNamespacedPod({ name, namespace: this.deps.namespace });
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
  }
}

function decode(b64: string): string {
  return Buffer.from(b64, 'base64').toString();
}

function withKind(csr: Csr): Csr {
  return { ...csr, apiVersion: 'certificates.k8s.io/v1', kind: 'CertificateSigningRequest' };
}
