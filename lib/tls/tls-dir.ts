// A component's TLS directory (`--tls-dir`): ca.crt, tls.crt and tls.key, as a Kubernetes TLS
// Secret mounts them plus the CA. Read and checked at start (a wrong file is a clear error
// there, not a failed handshake later) and read again every few seconds: a rotated certificate
// is taken up by new connections while the ones open keep going. A half-written rotation (a new
// certificate beside the old key) is not taken up until it is whole.
import type * as grpc from '@grpc/grpc-js';
import { X509Certificate, createPrivateKey } from 'node:crypto';
import { promises as fs } from 'node:fs';
import path from 'node:path';
import tls from 'node:tls';
import { writeFileAtomic } from '../atomic-file';
import { LockstepError, errorMessage } from '../errors';
import type { Logger } from '../logger';
import { describeIdentity, identityOfSubject, type Identity } from './identity';

/**
 * The files of a TLS directory: a Kubernetes TLS Secret's layout plus its CA. They are read and
 * written here, not in certificate-authority.ts, so that an agent that only uses its directory
 * does not load @peculiar/x509 (~6 MiB resident).
 */
export const TLS_FILES = { ca: 'ca.crt', cert: 'tls.crt', key: 'tls.key' } as const;

export async function readPem(dir: string, file: string, what: string): Promise<string> {
  try {
    return await fs.readFile(path.join(dir, file), 'utf8');
  } catch (err) {
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `cannot read ${file} in ${what} ${dir}: ${(err as NodeJS.ErrnoException).code ?? errorMessage(err)}`,
    );
  }
}

/** Writes ca.crt, tls.crt and tls.key; each file is replaced whole (readers poll them). */
export async function writeTlsDir(
  dir: string,
  caPem: string,
  issued: { certPem: string; keyPem: string },
): Promise<void> {
  await fs.mkdir(dir, { recursive: true, mode: 0o700 });
  await writeFileAtomic(path.join(dir, TLS_FILES.ca), caPem, 0o644);
  await writeFileAtomic(path.join(dir, TLS_FILES.key), issued.keyPem, 0o600);
  await writeFileAtomic(path.join(dir, TLS_FILES.cert), issued.certPem, 0o644);
}

type CaListener = grpc.experimental.CaCertificateUpdateListener;
type IdentityListener = grpc.experimental.IdentityCertificateUpdateListener;

export interface TlsMaterial {
  ca: string;
  cert: string;
  key: string;
}

export interface TlsDirOptions {
  /** How often the files are read again (default 2 s). */
  refreshMs?: number;
  log?: Logger;
}

export class TlsDir implements grpc.experimental.CertificateProvider {
  private timer: NodeJS.Timeout | undefined;
  private context: tls.SecureContext;
  private readonly caListeners = new Set<CaListener>();
  private readonly identityListeners = new Set<IdentityListener>();
  private readonly changeListeners = new Set<(m: TlsMaterial) => void>();
  /** The last contents refused, so a bad rotation is logged once, not every poll. */
  private refused = '';

  private constructor(
    readonly dir: string,
    private material: TlsMaterial,
    /** Who this component is, from its own certificate. */
    public identity: Identity,
    public notAfter: Date,
    private readonly opts: TlsDirOptions,
  ) {
    this.context = tls.createSecureContext(contextOptions(material));
    this.timer = setInterval(() => void this.refresh(), opts.refreshMs ?? 2_000);
    this.timer.unref();
  }

  /** Reads and checks the directory; throws a LockstepError saying what is wrong with it. */
  static async open(dir: string, opts: TlsDirOptions = {}): Promise<TlsDir> {
    const material = await readMaterial(dir);
    const { identity, notAfter } = checkMaterial(dir, material);
    return new TlsDir(dir, material, identity, notAfter, opts);
  }

  /** The PEM files as last taken up. */
  get current(): TlsMaterial {
    return this.material;
  }

  /** A context for outgoing TLS connections (the data lanes), current as of now. */
  get secureContext(): tls.SecureContext {
    return this.context;
  }

  /** Called with the new files after each rotation that was taken up. */
  onChange(listener: (m: TlsMaterial) => void): () => void {
    this.changeListeners.add(listener);
    return () => this.changeListeners.delete(listener);
  }

  close(): void {
    clearInterval(this.timer);
    this.timer = undefined;
  }

  private async refresh(): Promise<void> {
    let next: TlsMaterial;
    try {
      next = await readMaterial(this.dir);
    } catch {
      return; // mid-swap (a Secret's symlinks) or gone for a moment: the next poll sees it
    }
    if (
      next.ca === this.material.ca &&
      next.cert === this.material.cert &&
      next.key === this.material.key
    )
      return;
    const seen = next.ca + next.cert + next.key;
    try {
      const { identity, notAfter } = checkMaterial(this.dir, next);
      if (identity.role !== this.identity.role || identity.name !== this.identity.name)
        throw new Error(
          `the new certificate is for ${describeIdentity(identity)}, this process is ${describeIdentity(this.identity)}`,
        );
      this.context = tls.createSecureContext(contextOptions(next));
      this.material = next;
      this.notAfter = notAfter;
      this.refused = '';
    } catch (err) {
      if (this.refused !== seen)
        this.opts.log?.warn(
          { dir: this.dir, err: errorMessage(err) },
          'new TLS files not taken up; the old ones stay in use',
        );
      this.refused = seen;
      return;
    }
    this.opts.log?.info(
      { dir: this.dir, notAfter: this.notAfter.toISOString() },
      'TLS certificate rotated',
    );
    for (const l of this.caListeners) l({ caCertificate: Buffer.from(next.ca) });
    for (const l of this.identityListeners) l(identityUpdate(next));
    for (const l of this.changeListeners) l(next);
  }

  // ---- grpc-js CertificateProvider: gRPC servers and channels follow rotations through it ----

  // grpc-js registers its own watcher only after adding these listeners: an answer given at
  // once would reach nobody, so the current files follow on the next tick.
  addCaCertificateListener(listener: CaListener): void {
    this.caListeners.add(listener);
    process.nextTick(() => listener({ caCertificate: Buffer.from(this.material.ca) }));
  }

  removeCaCertificateListener(listener: CaListener): void {
    this.caListeners.delete(listener);
  }

  addIdentityCertificateListener(listener: IdentityListener): void {
    this.identityListeners.add(listener);
    process.nextTick(() => listener(identityUpdate(this.material)));
  }

  removeIdentityCertificateListener(listener: IdentityListener): void {
    this.identityListeners.delete(listener);
  }
}

/**
 * TLS 1.3 only: every component is ours, and 1.3 has no weak suites to rule out. AES-128-GCM
 * first: as safe here as AES-256 and cheaper on every replicated byte (measured ~10 % faster).
 */
export function contextOptions(m: TlsMaterial): tls.SecureContextOptions {
  return {
    ca: m.ca,
    cert: m.cert,
    key: m.key,
    minVersion: 'TLSv1.3',
    ciphers: 'TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256',
  };
}

function identityUpdate(m: TlsMaterial) {
  return { certificate: Buffer.from(m.cert), privateKey: Buffer.from(m.key) };
}

const PEM_CERTIFICATE = /-----BEGIN CERTIFICATE-----[\s\S]+?-----END CERTIFICATE-----/g;

async function readMaterial(dir: string): Promise<TlsMaterial> {
  const read = await Promise.allSettled(
    [TLS_FILES.ca, TLS_FILES.cert, TLS_FILES.key].map((f) => readPem(dir, f, 'the TLS directory')),
  );
  // With several files missing, the error names the first of them, whichever read failed first.
  const [ca, cert, key] = read.map((r) => {
    if (r.status === 'rejected') throw r.reason;
    return r.value;
  });
  return { ca, cert, key };
}

/** Throws unless the files are a Lockstep certificate, its key, and the CA that signed it. */
function checkMaterial(dir: string, m: TlsMaterial): { identity: Identity; notAfter: Date } {
  const bad = (why: string) =>
    new LockstepError('LOCKSTEP_ERR_INVALID_ARGUMENT', `TLS directory ${dir}: ${why}`);
  let cert: X509Certificate;
  let cas: X509Certificate[];
  try {
    cert = new X509Certificate(m.cert);
    // A bundle during a CA rotation: the old CA and the new one.
    cas = (m.ca.match(PEM_CERTIFICATE) ?? []).map((pem) => new X509Certificate(pem));
    if (cas.length === 0) throw new Error(`no certificate in ${TLS_FILES.ca}`);
  } catch (err) {
    throw bad(
      `${TLS_FILES.cert} or ${TLS_FILES.ca} is not a PEM certificate (${errorMessage(err)})`,
    );
  }
  try {
    if (!cert.checkPrivateKey(createPrivateKey(m.key)))
      throw new Error('it belongs to another certificate');
  } catch (err) {
    throw bad(`${TLS_FILES.key} is not the key of ${TLS_FILES.cert} (${errorMessage(err)})`);
  }
  if (!cas.some((ca) => cert.checkIssued(ca) && cert.verify(ca.publicKey)))
    throw bad(`${TLS_FILES.cert} was not issued by a CA in ${TLS_FILES.ca}`);
  const notAfter = new Date(cert.validTo);
  if (notAfter.getTime() <= Date.now())
    throw bad(`${TLS_FILES.cert} expired at ${notAfter.toISOString()}; issue a new one`);
  const identity = identityOfSubject(cert.subject);
  if (!identity)
    throw bad(
      `${TLS_FILES.cert} (subject ${cert.subject.replace(/\n/g, ', ')}) names no Lockstep role; ` +
        'issue it with `lockstep certs issue`',
    );
  return { identity, notAfter };
}
