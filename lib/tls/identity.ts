// Who is at the other end of a TLS connection, as its certificate says. A Lockstep certificate
// names its holder in the subject: CN is the name (a node's name for an agent) and O the role,
// the way Kubernetes names its nodes (O=system:nodes). The role decides what the holder may do
// (access-policy.ts); the name binds an agent to the node it speaks for.
import type { PeerCertificate, TLSSocket } from 'node:tls';
import { LockstepError } from '../errors';

/** `client`: a workload's NBD client on the TCP export; it may call nothing. */
export const ROLES = ['agent', 'operator', 'admin', 'mediator', 'client'] as const;
export type Role = (typeof ROLES)[number];

export interface Identity {
  role: Role;
  name: string;
}

const ORG_PREFIX = 'lockstep:';

/** The subject a certificate for `id` carries, in the form @peculiar/x509 takes. */
export function subjectOf(id: Identity): string {
  return `CN=${id.name}, O=${ORG_PREFIX}${id.role}`;
}

/** "agent node-a", for messages and logs. */
export function describeIdentity(id: Identity | undefined): string {
  return id ? `${id.role} ${id.name}` : 'an unauthenticated client';
}

/** Names must survive the subject's syntax and appear in messages unquoted. */
export function validateIdentityName(name: string): string {
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$/.test(name))
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `invalid certificate name ${JSON.stringify(name)}: use letters, digits, '.', '_' and '-'`,
    );
  return name;
}

/**
 * The identity a verified peer certificate carries, or undefined for one that is not a
 * Lockstep certificate (no recognised role): such a peer may do nothing.
 */
export function identityOfPeer(cert: PeerCertificate | undefined | null): Identity | undefined {
  const subject = cert?.subject;
  if (!subject) return undefined;
  const name = first(subject.CN);
  const org = first(subject.O);
  if (!name || !org?.startsWith(ORG_PREFIX)) return undefined;
  const role = org.slice(ORG_PREFIX.length);
  return (ROLES as readonly string[]).includes(role) ? { role: role as Role, name } : undefined;
}

/** The same, from a certificate's subject as Node's X509Certificate prints it ("CN=a\nO=b"). */
export function identityOfSubject(subject: string): Identity | undefined {
  const fields: Record<string, string> = {};
  for (const line of subject.split('\n')) {
    const eq = line.indexOf('=');
    if (eq > 0) fields[line.slice(0, eq)] ??= line.slice(eq + 1);
  }
  return identityOfPeer({ subject: fields } as unknown as PeerCertificate);
}

// Node gives a repeated attribute as an array.
function first(v: string | string[] | undefined): string | undefined {
  return Array.isArray(v) ? v[0] : v;
}

/**
 * The verified identity of the client of a server-side TLS socket made by hand (not by a
 * tls.Server, which would do this itself): Node checks the client's certificate against the
 * CA but leaves the verdict to whoever made the socket. A string says why it is refused.
 */
export function verifiedClient(socket: TLSSocket): Identity | string {
  const verifyError = (
    socket as unknown as { _handle?: { verifyError?(): Error | null } }
  )._handle?.verifyError?.();
  if (verifyError)
    return `its certificate is not accepted (${(verifyError as NodeJS.ErrnoException).code ?? verifyError.message})`;
  const cert = socket.getPeerCertificate();
  if (!cert || Object.keys(cert).length === 0) return 'it presented no certificate';
  return identityOfPeer(cert) ?? 'its certificate names no Lockstep role';
}
