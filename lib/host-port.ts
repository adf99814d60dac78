// HOST:PORT parsing shared by the agent's flags and the addresses peers advertise.
import { LockstepError } from './errors';

/** Splits HOST:PORT (IPv6 hosts in brackets); `what` names the flag or field in the error. */
export function splitHostPort(value: string, what: string): [string, number] {
  const i = value.lastIndexOf(':');
  const port = Number(value.slice(i + 1));
  if (i <= 0 || !Number.isInteger(port) || port < 0 || port > 65535) {
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `${what} must be HOST:PORT, got ${JSON.stringify(value)}`,
    );
  }
  return [value.slice(0, i).replace(/^\[|\]$/g, ''), port];
}
