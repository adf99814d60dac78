// A relationship's mediator settings as they arrive over the wire (ctl replicate, a primary's
// handshake), checked and completed with the defaults, in the one form the engine keeps.
import { LockstepError } from '../../../lib/errors';
import { splitHostPort } from '../../../lib/host-port';
import type { MediatorSettings__Output } from '../../../proto/gen/lockstep/v1/MediatorSettings';
import {
  FAILOVER_POLICIES,
  type FailoverPolicy,
  type MediatorConfig,
} from '../store/volume-metadata';

/**
 * A replica takes over after this long without a primary. With the replica's own detection
 * (its lanes idle for 4 keepalives, ~4 s) it asks well after the primary notices the same loss
 * (its peer timeout, 3 s by default) and asks at once: so a link cut keeps the primary.
 */
export const DEFAULT_GRACE_MS = 5_000;
/** A primary that lost a peer holds writes this long for the mediator before failing them. */
export const DEFAULT_SUSPEND_LIMIT_MS = 30_000;

/** Undefined without a mediator address; `group` defaults to `defaultGroup`. */
export function mediatorSettings(
  m: MediatorSettings__Output | null | undefined,
  defaultGroup: string,
): MediatorConfig | undefined {
  if (!m?.address) return undefined;
  splitHostPort(m.address, '--mediator');
  const failover = (m.failover || 'automatic') as FailoverPolicy;
  if (!FAILOVER_POLICIES.includes(failover)) {
    throw new LockstepError(
      'LOCKSTEP_ERR_INVALID_ARGUMENT',
      `unknown failover policy ${JSON.stringify(m.failover)} (automatic or manual)`,
    );
  }
  return {
    address: m.address,
    group: m.group || defaultGroup,
    failover,
    graceMs: m.graceMs || DEFAULT_GRACE_MS,
    suspendLimitMs: m.suspendLimitMs || DEFAULT_SUSPEND_LIMIT_MS,
  };
}
