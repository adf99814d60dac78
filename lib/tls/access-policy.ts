// What each identity may call: the one owner of that rule. The control API is for the operator
// and administrators; the replication service and the data lanes are for agents, each speaking
// only for its own node (`checkCall` adds the per-request rules a service gives); the mediator
// answers agents, the operator and administrators. On a plaintext (--insecure) server there is
// no identity and nothing is checked: that is what --insecure means.
import type * as grpc from '@grpc/grpc-js';
import { LockstepError } from '../errors';
import type { Logger } from '../logger';
import { toServiceError } from '../grpc-errors';
import { describeIdentity, type Identity, type Role } from './identity';
import { callerOf, type Transport } from './transport';

export type Service = 'control' | 'replication' | 'mediator' | 'data-lane';

export const MAY_CALL: Record<Service, readonly Role[]> = {
  control: ['operator', 'admin'],
  replication: ['agent'],
  'data-lane': ['agent'],
  mediator: ['agent', 'operator', 'admin'],
};

export interface Refusal {
  service: Service;
  /** The method, or what was attempted. */
  what: string;
  caller: Identity | undefined;
  reason: string;
}

/** Logs and counts a refusal (each process wires its logger and metric in). */
export type RefusalSink = (r: Refusal) => void;

export function logRefusal(log: Logger, r: Refusal): void {
  log.warn(
    { service: r.service, what: r.what, caller: describeIdentity(r.caller), reason: r.reason },
    'refused',
  );
}

/** A request-level rule for a caller already allowed the service: a reason to refuse, or none. */
export type CallCheck = (method: string, caller: Identity, request: unknown) => string | undefined;

export function refusalError(r: Refusal): LockstepError {
  return new LockstepError(
    'LOCKSTEP_ERR_PERMISSION_DENIED',
    `${describeIdentity(r.caller)} may not ${r.what} (${r.service}): ${r.reason}`,
  );
}

/** Why `caller` may not use `service` at all, or undefined if it may. */
export function serviceRefusal(service: Service, caller: Identity | undefined): string | undefined {
  if (!caller) return 'its certificate names no Lockstep role';
  const roles = MAY_CALL[service];
  if (roles.includes(caller.role)) return undefined;
  return `only ${roles.map((r) => `${r}s`).join(' and ')} may`;
}

/** Wraps every (unary) method of a gRPC service implementation with the policy. */
export function guardService(
  service: Service,
  impl: grpc.UntypedServiceImplementation,
  transport: Transport,
  refused: RefusalSink,
  checkCall?: CallCheck,
): grpc.UntypedServiceImplementation {
  if (!transport.secure) return impl;
  const out: grpc.UntypedServiceImplementation = {};
  for (const [method, handler] of Object.entries(impl)) {
    const unary = handler as grpc.handleUnaryCall<unknown, unknown>;
    out[method] = ((call, callback) => {
      const caller = callerOf(call);
      const reason = serviceRefusal(service, caller) ?? checkCall?.(method, caller!, call.request);
      if (reason === undefined) return unary(call, callback);
      const refusal: Refusal = { service, what: `call ${method}`, caller, reason };
      refused(refusal);
      callback(toServiceError(refusalError(refusal)));
    }) satisfies grpc.handleUnaryCall<unknown, unknown>;
  }
  return out;
}
