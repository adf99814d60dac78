// The cluster's Lockstep CA when the operator manages certificates: a kubernetes.io/tls Secret
// in the operator's namespace, made on first start unless the user (or cert-manager) put one
// there, and a ConfigMap with its public certificate that every component trusts. The Secret
// is read again whenever something is signed, so a CA replaced in the Secret is used from the
// next certificate on. Its `ca.crt`, when present, is the bundle published (old and new CA
// during a CA rotation); otherwise the CA's own certificate is.
import { X509Certificate, createPrivateKey } from 'node:crypto';
import * as k8s from '@kubernetes/client-node';
import { LockstepError, errorMessage } from '../../../lib/errors';
import { apiErrorMessage, isAlreadyExists, isNotFound } from '../../../lib/kube';
import type { Logger } from '../../../lib/logger';
import {
  createAuthority,
  issueCertificate,
  type Authority,
} from '../../../lib/tls/certificate-authority';
import { writeTlsDir } from '../../../lib/tls/tls-dir';
import type { Identity } from '../../../lib/tls/identity';
import {
  CA_BUNDLE_CONFIGMAP,
  CA_BUNDLE_KEY,
  CA_SECRET,
  renewalDelay,
} from '../../../lib/tls/in-cluster';

export interface ClusterAuthorityOptions {
  kc: k8s.KubeConfig;
  namespace: string;
  /** How long the certificates it issues are valid. */
  lifetimeMs: number;
  /** The CA's kubernetes.io/tls Secret (default lockstep-ca). */
  secret?: string;
  /**
   * Make the Secret when there is none (the default). Off when the CA comes from elsewhere
   * (cert-manager, or one the user made): then the operator waits for it instead of racing it.
   */
  create?: boolean;
  log: Logger;
}

export interface CurrentAuthority extends Authority {
  /** What components trust: the CA, or the Secret's `ca.crt` bundle. */
  bundlePem: string;
}

const RETRY_MS = 10_000;
const WAIT_FOR_SECRET_MS = 5_000;

export class ClusterAuthority {
  private readonly core: k8s.CoreV1Api;
  private timer: NodeJS.Timeout | undefined;
  private stopped = false;
  private publishedBundle = '';

  private readonly secret: string;

  private constructor(private readonly opts: ClusterAuthorityOptions) {
    this.core = opts.kc.makeApiClient(k8s.CoreV1Api);
    this.secret = opts.secret ?? CA_SECRET;
  }

  get lifetimeMs(): number {
    return this.opts.lifetimeMs;
  }

  /** Makes the CA Secret if there is none, and publishes its bundle. */
  static async open(opts: ClusterAuthorityOptions): Promise<ClusterAuthority> {
    const ca = new ClusterAuthority(opts);
    await ca.current();
    return ca;
  }

  /** The CA as the Secret holds it now; the bundle ConfigMap is brought in line with it. */
  async current(): Promise<CurrentAuthority> {
    const ca = await this.readOrCreate();
    if (ca.bundlePem !== this.publishedBundle) await this.publish(ca.bundlePem);
    return ca;
  }

  /**
   * Issues this process's own certificate into `dir` and renews it there before it expires;
   * the process's TlsDir takes each renewal up.
   */
  async issueOwn(dir: string, id: Identity): Promise<void> {
    const ca = await this.current();
    const issued = await issueCertificate(ca, id, { validMs: this.opts.lifetimeMs });
    await writeTlsDir(dir, ca.bundlePem, issued);
    this.opts.log.info({ identity: id, notAfter: issued.notAfter }, 'own certificate issued');
    this.schedule(renewalDelay(issued.notAfter), dir, id);
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
  }

  private schedule(ms: number, dir: string, id: Identity): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => {
      this.issueOwn(dir, id).catch((err: unknown) => {
        this.opts.log.warn(
          { err: apiErrorMessage(err) },
          'own certificate renewal failed; retrying',
        );
        this.schedule(RETRY_MS, dir, id);
      });
    }, ms);
    this.timer.unref();
  }

  private async readOrCreate(): Promise<CurrentAuthority> {
    const { namespace, log } = this.opts;
    for (;;) {
      try {
        return parseSecret(
          await this.core.readNamespacedSecret({ name: this.secret, namespace }),
          namespace,
        );
      } catch (err) {
        if (!isNotFound(err)) throw err;
      }
      if (this.opts.create !== false) break;
      log.warn(
        { secret: `${namespace}/${this.secret}` },
        'waiting for the CA Secret (it is not made here: --no-create-ca)',
      );
      await new Promise((r) => setTimeout(r, WAIT_FOR_SECRET_MS));
    }
    const made = await createAuthority(`Lockstep CA (${namespace})`);
    try {
      await this.core.createNamespacedSecret({
        namespace,
        body: {
          metadata: { name: this.secret, labels: { 'app.kubernetes.io/name': 'lockstep' } },
          type: 'kubernetes.io/tls',
          data: { 'tls.crt': b64(made.certPem), 'tls.key': b64(made.keyPem) },
        },
      });
      log.info({ secret: `${namespace}/${this.secret}` }, 'created the cluster’s Lockstep CA');
      return { ...made, bundlePem: made.certPem };
    } catch (err) {
      // Another replica made it first: theirs is the CA.
      if (!isAlreadyExists(err)) throw err;
      return parseSecret(
        await this.core.readNamespacedSecret({ name: this.secret, namespace }),
        namespace,
      );
    }
  }

  private async publish(bundlePem: string): Promise<void> {
    const { namespace, log } = this.opts;
    const body = {
      metadata: { name: CA_BUNDLE_CONFIGMAP, labels: { 'app.kubernetes.io/name': 'lockstep' } },
      data: { [CA_BUNDLE_KEY]: bundlePem },
    };
    try {
      await this.core.replaceNamespacedConfigMap({ name: CA_BUNDLE_CONFIGMAP, namespace, body });
    } catch (err) {
      if (!isNotFound(err)) throw err;
      await this.core.createNamespacedConfigMap({ namespace, body }).catch((e: unknown) => {
        if (!isAlreadyExists(e)) throw e;
      });
    }
    this.publishedBundle = bundlePem;
    log.info({ configMap: `${namespace}/${CA_BUNDLE_CONFIGMAP}` }, 'published the CA bundle');
  }
}

function b64(s: string): string {
  return Buffer.from(s).toString('base64');
}

/** The CA in a Secret, checked: a Secret that holds no usable CA is an error that says so. */
export function parseSecret(secret: k8s.V1Secret, namespace: string): CurrentAuthority {
  const field = (k: string) => {
    const v = secret.data?.[k];
    return v ? Buffer.from(v, 'base64').toString() : undefined;
  };
  const certPem = field('tls.crt');
  const keyPem = field('tls.key');
  const where = `Secret ${namespace}/${secret.metadata?.name ?? CA_SECRET}`;
  try {
    if (!certPem || !keyPem) throw new Error('it needs tls.crt and tls.key');
    const cert = new X509Certificate(certPem);
    if (!cert.ca) throw new Error('tls.crt is not a CA certificate');
    if (!cert.checkPrivateKey(createPrivateKey(keyPem)))
      throw new Error('tls.key is not the key of tls.crt');
    if (Date.parse(cert.validTo) <= Date.now())
      throw new Error(`the CA expired on ${cert.validTo}`);
    const bundlePem = field(CA_BUNDLE_KEY) ?? certPem;
    return { certPem, keyPem, bundlePem };
  } catch (err) {
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `${where} holds no usable CA: ${errorMessage(err)}. Delete it to have the operator make one, or put a CA there (kubernetes.io/tls)`,
    );
  }
}
