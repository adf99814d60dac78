// How a process's connections are secured: mutual TLS against the Lockstep CA (the default),
// or plaintext because someone asked for it with --insecure. Every server and client a process
// makes takes its credentials from here, so there is one place that says what "secure" means.
import * as grpc from '@grpc/grpc-js';
import type { PeerCertificate } from 'node:tls';
import { LockstepError } from '../errors';
import type { Logger } from '../logger';
import { describeIdentity, identityOfPeer, type Identity, type Role } from './identity';
import { TlsDir } from './tls-dir';

export type Transport = { secure: false } | { secure: true; dir: TlsDir };

export const PLAINTEXT: Transport = { secure: false };

export interface TransportFlags {
  tlsDir?: string;
  insecure?: boolean;
}

/**
 * The transport the flags ask for. `holder` is what this process must be (an agent must hold
 * an agent certificate for its own node): anything else is refused at start.
 */
export async function openTransport(
  flags: TransportFlags,
  log: Logger,
  holder?: { role: Role | readonly Role[]; name?: string },
): Promise<Transport> {
  if (flags.insecure && flags.tlsDir)
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      '--insecure and --tls-dir contradict each other: give one',
    );
  if (flags.insecure) {
    log.warn(
      'running without TLS (--insecure): anyone who can reach this process can call it and read its traffic',
    );
    return PLAINTEXT;
  }
  if (!flags.tlsDir)
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      'no --tls-dir given (or LOCKSTEP_TLS_DIR): Lockstep speaks mutual TLS by default. Make ' +
        'certificates with `lockstep certs init` and `lockstep certs issue`, or pass --insecure ' +
        'to run without TLS on purpose',
    );
  const dir = await TlsDir.open(flags.tlsDir, { log });
  if (holder) {
    const roles = ([] as Role[]).concat(holder.role as Role);
    const id = dir.identity;
    if (!roles.includes(id.role) || (holder.name !== undefined && id.name !== holder.name)) {
      dir.close();
      throw new LockstepError(
        'LOCKSTEP_ERR_INVALID_ARGUMENT',
        `the certificate in ${flags.tlsDir} is for ${describeIdentity(id)}; this process needs ` +
          `one for ${roles.join(' or ')}${holder.name !== undefined ? ` ${holder.name}` : ''}`,
      );
    }
  }
  return { secure: true, dir };
}

export function serverCredentials(t: Transport): grpc.ServerCredentials {
  return t.secure
    ? grpc.experimental.createCertificateProviderServerCredentials(t.dir, t.dir, true)
    : grpc.ServerCredentials.createInsecure();
}

/** Credentials for a channel to a server that must present a certificate of one of `roles`. */
export function channelCredentials(t: Transport, roles: readonly Role[]): grpc.ChannelCredentials {
  if (!t.secure) return grpc.credentials.createInsecure();
  return grpc.experimental.createCertificateProviderChannelCredentials(t.dir, t.dir, {
    checkServerIdentity: serverCheck(roles),
  });
}

/**
 * Channel options to go with those credentials. Servers are dialled by address and proved by
 * the role in their certificate, not by a host name: the name sent is a fixed one (an IP
 * address may not be sent as a server name).
 */
export function channelOptions(t: Transport): grpc.ChannelOptions {
  return t.secure ? { 'grpc.ssl_target_name_override': 'lockstep' } : {};
}

/** A `checkServerIdentity` that accepts a Lockstep certificate of one of `roles`. */
export function serverCheck(roles: readonly Role[]) {
  return (_host: string, cert: PeerCertificate): Error | undefined => {
    const id = identityOfPeer(cert);
    if (id && roles.includes(id.role)) return undefined;
    return new Error(
      `the server presents a certificate for ${id ? describeIdentity(id) : 'no Lockstep role'}, ` +
        `not for ${roles.join(' or ')}`,
    );
  };
}

/** Who made a gRPC call: undefined on a plaintext server. */
export function callerOf(call: grpc.ServerUnaryCall<unknown, unknown>): Identity | undefined {
  return identityOfPeer(call.getAuthContext()?.sslPeerCertificate);
}

/** One line for status output. */
export function describeTransport(t: Transport): string {
  if (!t.secure) return 'plaintext (--insecure): no authentication, no encryption';
  return `mutual TLS as ${describeIdentity(t.dir.identity)}, certificate valid until ${t.dir.notAfter.toISOString()}`;
}
