// --tls-dir and --insecure, the same on every command: TLS unless plaintext is asked for.
import type { Command } from 'commander';
import { Option } from 'commander';
import { mkdtempSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import pino from 'pino';
import { LockstepError } from '../lib/errors';
import { ServerUnreachable } from '../lib/grpc-errors';
import { explainUnreachable } from '../lib/tls/handshake-diagnosis';
import type { Role } from '../lib/tls/identity';
import { openTransport, type Transport, type TransportFlags } from '../lib/tls/transport';
import type { Logger } from '../lib/logger';

export function addTransportOptions(cmd: Command): Command {
  return cmd
    .addOption(
      new Option(
        '--tls-dir <dir>',
        'ca.crt, tls.crt and tls.key for mutual TLS (made by `lockstep certs`; reloaded when they change)',
      ).env('LOCKSTEP_TLS_DIR'),
    )
    .option('--insecure', 'plaintext, no authentication: for local experiments only', false);
}

/** A long-running component's transport: it must hold a certificate for `holder`. */
export function daemonTransport(
  opts: TransportFlags,
  log: Logger,
  holder: { role: Role; name?: string },
): Promise<Transport> {
  return openTransport(opts, log, holder);
}

/**
 * A client command's transport, from its own or its parent's flags. Clients say nothing about
 * --insecure (the server they reach logs it); a certificate's role is for the server to judge.
 * Its reload timer does not hold a short-lived command's process open.
 */
export function clientTransport(cmd: Command): Promise<Transport> {
  return openTransport(cmd.optsWithGlobals<TransportFlags>(), pino({ level: 'silent' }));
}

/**
 * Runs a client command's calls on its transport. gRPC tells a refused TLS handshake only as
 * "failed to connect": whichever server the command could not reach (an agent, the mediator)
 * is asked why over plain TLS, under the address and role its client dialled.
 */
export async function withClientTransport<T>(
  cmd: Command,
  fn: (transport: Transport) => Promise<T>,
): Promise<T> {
  const transport = await clientTransport(cmd);
  try {
    return await fn(transport);
  } catch (err) {
    if (!(err instanceof ServerUnreachable)) throw err;
    throw await explainUnreachable(err, err.target, err.kind, transport);
  }
}

/**
 * Where a component writes certificates it is given rather than handed in files
 * (--manage-certificates, --request-certificate): --tls-dir, or a private temporary directory.
 */
export function issuedTlsDir(opts: TransportFlags, flag: string, component: string): string {
  if (opts.insecure)
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `${flag} and --insecure contradict each other`,
    );
  return opts.tlsDir ?? mkdtempSync(path.join(os.tmpdir(), `lockstep-${component}-tls-`));
}
