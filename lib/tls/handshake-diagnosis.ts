// Why a TLS connection to a server fails, in words. gRPC reports a refused handshake only as
// "failed to connect"; one plain TLS handshake with the same certificate brings back the
// alert the server sent (expired, no certificate), its hanging up on our certificate, or what
// we found wrong with its.
import tls from 'node:tls';
import { LockstepError, isLockstepError } from '../errors';
import { splitHostPort } from '../host-port';
import type { Role } from './identity';
import { serverCheck, type Transport } from './transport';

/** How long after our side of the handshake a refusal (an alert) may take to arrive. */
const ALERT_WAIT_MS = 300;

const EXPLAINED: Array<[RegExp, string]> = [
  [/unknown ca/i, 'it does not trust your certificate: it was issued by another CA than its own'],
  [/certificate expired/i, 'it refused your certificate as expired: issue a new one'],
  [/certificate required/i, 'it requires a client certificate: pass --tls-dir'],
  [/bad certificate|certificate unknown/i, 'it refused your certificate'],
  [
    /self.signed|unable to (get|verify)|UNABLE_TO/i,
    'its certificate is not from the CA in your --tls-dir',
  ],
  [
    /wrong version number|packet length too long|unexpected eof/i,
    'it does not speak TLS (an --insecure server?)',
  ],
];

/** The TLS reason `target` refuses us, or undefined if a handshake goes through (or no TCP). */
export function diagnoseHandshake(
  target: string,
  transport: Transport,
  roles: readonly Role[],
): Promise<string | undefined> {
  if (!transport.secure) return Promise.resolve(undefined);
  const [host, port] = splitHostPort(target, 'address');
  return new Promise((resolve) => {
    let done = false;
    const finish = (why: string | undefined) => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      socket.destroy();
      resolve(why);
    };
    const socket = tls.connect({
      host,
      port,
      secureContext: transport.dir.secureContext,
      checkServerIdentity: serverCheck(roles),
      ALPNProtocols: ['h2'],
    });
    const timer = setTimeout(() => finish(undefined), 5_000);
    let secured = false;
    // In TLS 1.3 a refused client certificate shows only when the next record is read: as an
    // alert, or (a Node server that judges the certificate itself) as the connection closed.
    socket.once('secureConnect', () => {
      secured = true;
      socket.resume();
      setTimeout(() => finish(undefined), ALERT_WAIT_MS);
    });
    const closedOnUs = () =>
      finish(
        'TLS handshake refused: it closed the connection as soon as it saw your certificate: ' +
          'it does not accept it (issued by another CA?)',
      );
    socket.once('close', () => (secured ? closedOnUs() : finish(undefined)));
    socket.once('error', (err: NodeJS.ErrnoException) => {
      if (secured && err.code === 'ECONNRESET') return closedOnUs();
      if (err.code === 'ECONNREFUSED' || err.code === 'EHOSTUNREACH') return finish(undefined);
      const hit = EXPLAINED.find(([re]) => re.test(err.message));
      finish(
        hit
          ? `TLS handshake refused: ${hit[1]} (${err.message})`
          : `TLS handshake failed: ${err.message}`,
      );
    });
  });
}

/**
 * `err`, or, if it says the server cannot be reached and a TLS handshake with it is refused,
 * an error that says why (gRPC itself reports only "failed to connect").
 */
export async function explainUnreachable(
  err: unknown,
  target: string,
  kind: Role,
  transport: Transport,
): Promise<unknown> {
  if (!isLockstepError(err, 'LOCKSTEP_ERR_UNAVAILABLE')) return err;
  const why = await diagnoseHandshake(target, transport, [kind]).catch(() => undefined);
  return why
    ? new LockstepError('LOCKSTEP_ERR_UNAVAILABLE', `the ${kind} at ${target} refuses us: ${why}`)
    : err;
}
