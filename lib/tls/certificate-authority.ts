// The Lockstep CA: makes the CA and issues the certificates every component presents (ECDSA
// P-256, both server and client use, the holder's identity in the subject). The same code
// serves `lockstep certs` outside Kubernetes and the operator inside it.
import 'reflect-metadata'; // @peculiar/x509's dependency injection needs it loaded first
import * as x509 from '@peculiar/x509';
import { X509Certificate, createPrivateKey, randomBytes, webcrypto } from 'node:crypto';
import { existsSync, promises as fs } from 'node:fs';
import path from 'node:path';
import { writeFileAtomic } from '../atomic-file';
import { LockstepError, errorMessage } from '../errors';
import { subjectOf, type Identity } from './identity';
import { TLS_FILES, readPem } from './tls-dir';

x509.cryptoProvider.set(webcrypto as unknown as Parameters<typeof x509.cryptoProvider.set>[0]);

type CryptoKey = webcrypto.CryptoKey;

const ALGORITHM = { name: 'ECDSA', namedCurve: 'P-256', hash: 'SHA-256' };
/** Tolerates clocks a little behind the issuer's. */
const BACKDATE_MS = 5 * 60_000;

export interface Authority {
  certPem: string;
  keyPem: string;
}

export interface IssuedCertificate {
  certPem: string;
  keyPem: string;
  notAfter: Date;
}

/** The CA's own directory: its certificate and, private to whoever issues, its key. */
export const CA_FILES = { cert: 'ca.crt', key: 'ca.key' } as const;

export async function createAuthority(
  name = 'Lockstep CA',
  validMs = 10 * 365 * 86_400_000,
): Promise<Authority> {
  const keys = await newKeys();
  const now = Date.now();
  const cert = await x509.X509CertificateGenerator.createSelfSigned({
    serialNumber: serial(),
    name: `CN=${name}, O=lockstep`,
    notBefore: new Date(now - BACKDATE_MS),
    notAfter: new Date(now + validMs),
    signingAlgorithm: ALGORITHM,
    keys,
    extensions: [
      new x509.BasicConstraintsExtension(true, 0, true),
      new x509.KeyUsagesExtension(
        x509.KeyUsageFlags.keyCertSign | x509.KeyUsageFlags.cRLSign,
        true,
      ),
      await x509.SubjectKeyIdentifierExtension.create(keys.publicKey),
    ],
  });
  return { certPem: cert.toString('pem'), keyPem: await pkcs8(keys.privateKey) };
}

export interface IssueOptions {
  validMs: number;
  /** Subject alternative names, for clients that check a host name (qemu, nbdcopy). */
  dnsNames?: string[];
  ips?: string[];
}

export async function issueCertificate(
  ca: Authority,
  id: Identity,
  opts: IssueOptions,
): Promise<IssuedCertificate> {
  const keys = await newKeys();
  const signed = await signPublicKey(ca, id, keys.publicKey, opts);
  return { ...signed, keyPem: await pkcs8(keys.privateKey) };
}

/**
 * A certificate for `id` over a key its holder made and keeps (a certificate signing request's
 * key). The subject is the issuer's decision, not the requester's.
 */
export async function signPublicKey(
  ca: Authority,
  id: Identity,
  publicKey: x509.PublicKey | CryptoKey,
  opts: IssueOptions,
): Promise<{ certPem: string; notAfter: Date }> {
  const caCert = new x509.X509Certificate(ca.certPem);
  const caKey = await importKey(ca.keyPem);
  const now = Date.now();
  const notAfter = new Date(Math.min(now + opts.validMs, caCert.notAfter.getTime()));
  const names = [
    ...(opts.dnsNames ?? []).map((value) => ({ type: 'dns' as const, value })),
    ...(opts.ips ?? []).map((value) => ({ type: 'ip' as const, value })),
  ];
  const cert = await x509.X509CertificateGenerator.create({
    serialNumber: serial(),
    subject: subjectOf(id),
    issuer: caCert.subject,
    notBefore: new Date(now - BACKDATE_MS),
    notAfter,
    signingAlgorithm: ALGORITHM,
    publicKey,
    signingKey: caKey,
    extensions: [
      new x509.BasicConstraintsExtension(false, undefined, true),
      new x509.KeyUsagesExtension(x509.KeyUsageFlags.digitalSignature, true),
      new x509.ExtendedKeyUsageExtension([
        x509.ExtendedKeyUsage.serverAuth,
        x509.ExtendedKeyUsage.clientAuth,
      ]),
      ...(names.length > 0 ? [new x509.SubjectAlternativeNameExtension(names)] : []),
      await x509.AuthorityKeyIdentifierExtension.create(caCert),
    ],
  });
  return { certPem: cert.toString('pem'), notAfter };
}

/** A PKCS#10 request for `id` over a new key: the key never leaves whoever asks. */
export async function createCertificateRequest(
  id: Identity,
): Promise<{ requestPem: string; keyPem: string }> {
  const keys = await newKeys();
  const request = await x509.Pkcs10CertificateRequestGenerator.create({
    name: subjectOf(id),
    keys,
    signingAlgorithm: ALGORITHM,
  });
  return { requestPem: request.toString('pem'), keyPem: await pkcs8(keys.privateKey) };
}

/**
 * What a PKCS#10 request asks for: the subject it names and the key it proves it holds. A
 * request that is not one, or whose signature does not match its key, throws.
 */
export async function readCertificateRequest(
  pem: string,
): Promise<{ subject: string; publicKey: x509.PublicKey }> {
  let request: x509.Pkcs10CertificateRequest;
  try {
    request = new x509.Pkcs10CertificateRequest(pem);
  } catch (err) {
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `not a PKCS#10 certificate request (${errorMessage(err)})`,
    );
  }
  if (!(await request.verify()))
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      'the certificate request is not signed by the key it carries',
    );
  return { subject: request.subject, publicKey: request.publicKey };
}

export async function writeAuthorityDir(dir: string, ca: Authority): Promise<void> {
  await fs.mkdir(dir, { recursive: true, mode: 0o700 });
  await writeFileAtomic(path.join(dir, CA_FILES.key), ca.keyPem, 0o600);
  await writeFileAtomic(path.join(dir, CA_FILES.cert), ca.certPem, 0o644);
}

/**
 * The CA in `dir`: `lockstep certs init`'s ca.crt and ca.key, or a kubernetes.io/tls Secret's
 * tls.crt and tls.key (the cluster CA the operator keeps, saved with kubectl).
 */
export async function readAuthorityDir(dir: string): Promise<Authority> {
  const secretLayout =
    !existsSync(path.join(dir, CA_FILES.key)) && existsSync(path.join(dir, TLS_FILES.key));
  const files = secretLayout ? [TLS_FILES.cert, TLS_FILES.key] : [CA_FILES.cert, CA_FILES.key];
  // One after the other: a directory missing both files is reported by its certificate, always.
  const certPem = await readPem(dir, files[0], 'the CA directory');
  const keyPem = await readPem(dir, files[1], 'the CA directory');
  try {
    if (!new X509Certificate(certPem).checkPrivateKey(createPrivateKey(keyPem)))
      throw new Error('the key is not the certificate’s');
  } catch (err) {
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `${dir} does not hold a usable CA (${errorMessage(err)}); make one with \`lockstep certs init ${dir}\``,
    );
  }
  return { certPem, keyPem };
}

/**
 * The same certificate under the names GnuTLS clients look for in a directory (qemu's
 * tls-creds-x509 dir=, libnbd's tls-certificates=): an NBD client's directory serves both.
 */
export async function writeGnutlsClientFiles(
  dir: string,
  caPem: string,
  issued: Pick<IssuedCertificate, 'certPem' | 'keyPem'>,
): Promise<void> {
  await writeFileAtomic(path.join(dir, 'ca-cert.pem'), caPem, 0o644);
  await writeFileAtomic(path.join(dir, 'client-key.pem'), issued.keyPem, 0o600);
  await writeFileAtomic(path.join(dir, 'client-cert.pem'), issued.certPem, 0o644);
}

async function newKeys(): Promise<webcrypto.CryptoKeyPair> {
  return await webcrypto.subtle.generateKey(ALGORITHM, true, ['sign', 'verify']);
}

async function pkcs8(key: CryptoKey): Promise<string> {
  return x509.PemConverter.encode(await webcrypto.subtle.exportKey('pkcs8', key), 'PRIVATE KEY');
}

async function importKey(pem: string): Promise<CryptoKey> {
  return await webcrypto.subtle.importKey(
    'pkcs8',
    x509.PemConverter.decode(pem)[0],
    ALGORITHM,
    false,
    ['sign'],
  );
}

/** Positive 128-bit serials: unique without a counter to keep. */
function serial(): string {
  const b = randomBytes(16);
  b[0] &= 0x7f;
  return b.toString('hex');
}
