// LockstepError <-> gRPC status. The stable error code travels in trailing metadata so that a
// client (ctl, the operator) can rebuild the same LockstepError the server raised.
import * as grpc from '@grpc/grpc-js';
import { LockstepError, errorMessage, type ErrorCode } from './errors';
import type { Role } from './tls/identity';

const CODE_KEY = 'lockstep-error-code';

const statusOf: Partial<Record<ErrorCode, grpc.status>> = {
  LOCKSTEP_ERR_INVALID_ARGUMENT: grpc.status.INVALID_ARGUMENT,
  LOCKSTEP_ERR_VOLUME_NOT_FOUND: grpc.status.NOT_FOUND,
  LOCKSTEP_ERR_VOLUME_EXISTS: grpc.status.ALREADY_EXISTS,
  LOCKSTEP_ERR_VOLUME_IN_USE: grpc.status.FAILED_PRECONDITION,
  LOCKSTEP_ERR_VOLUME_FAILED: grpc.status.FAILED_PRECONDITION,
  LOCKSTEP_ERR_SNAPSHOT_NOT_FOUND: grpc.status.NOT_FOUND,
  LOCKSTEP_ERR_SNAPSHOT_EXISTS: grpc.status.ALREADY_EXISTS,
  LOCKSTEP_ERR_SNAPSHOT_IN_USE: grpc.status.FAILED_PRECONDITION,
  LOCKSTEP_ERR_GROUP_NOT_FOUND: grpc.status.NOT_FOUND,
  LOCKSTEP_ERR_GROUP_EXISTS: grpc.status.ALREADY_EXISTS,
  LOCKSTEP_ERR_READ_ONLY: grpc.status.FAILED_PRECONDITION,
  LOCKSTEP_ERR_NOT_ALLOWED: grpc.status.FAILED_PRECONDITION,
  LOCKSTEP_ERR_PERMISSION_DENIED: grpc.status.PERMISSION_DENIED,
  LOCKSTEP_ERR_STALE_EPOCH: grpc.status.FAILED_PRECONDITION,
  LOCKSTEP_ERR_NO_SPACE: grpc.status.RESOURCE_EXHAUSTED,
  LOCKSTEP_ERR_UNAVAILABLE: grpc.status.UNAVAILABLE,
};

export function toServiceError(err: unknown): Partial<grpc.ServiceError> {
  const metadata = new grpc.Metadata();
  if (err instanceof LockstepError) {
    metadata.set(CODE_KEY, err.code);
    return { code: statusOf[err.code] ?? grpc.status.INTERNAL, details: err.message, metadata };
  }
  return { code: grpc.status.INTERNAL, details: errorMessage(err), metadata };
}

/** Which server a client calls, for the message when it cannot be reached. */
export interface ServerRef {
  target: string;
  /** e.g. 'agent', and the flag that names its address, e.g. '--agent'. */
  kind: Role;
  flag: string;
}

export type Callback<Res> = (err: grpc.ServiceError | null, res?: Res) => void;

/**
 * Keepalive for the control clients: a server that went away is noticed within 15 s. And a
 * reconnect backoff capped at 2 s: grpc-js's default grows to 120 s, and a channel backing off
 * fails every call at once without trying, so an agent down for 45 s stayed unreachable for
 * the operator's long-lived channel 18 s after it served again (a split brain went unseen).
 */
export const CLIENT_CHANNEL_OPTIONS = {
  'grpc.keepalive_time_ms': 10_000,
  'grpc.keepalive_timeout_ms': 5_000,
  'grpc.initial_reconnect_backoff_ms': 200,
  'grpc.max_reconnect_backoff_ms': 2_000,
};

/** A unary call with a deadline; a failure comes back as the LockstepError the server raised. */
export function unaryCall<Res>(
  server: ServerRef,
  timeoutMs: number,
  invoke: (options: grpc.CallOptions, cb: Callback<Res>) => unknown,
): Promise<Res> {
  return new Promise((resolve, reject) => {
    invoke({ deadline: Date.now() + timeoutMs }, (err, res) =>
      err ? reject(fromServiceError(err, server)) : resolve(res!),
    );
  });
}

/** The LockstepError a gRPC failure carries, if the server raised one. */
export function carriedError(err: unknown): LockstepError | undefined {
  const se = err as Partial<grpc.ServiceError>;
  const code = se.metadata?.get(CODE_KEY)[0];
  if (typeof code === 'string' && code.startsWith('LOCKSTEP_ERR_'))
    return new LockstepError(code as ErrorCode, se.details ?? errorMessage(err));
  return undefined;
}

/** A server that did not answer, and which one (to look into why, e.g. a TLS refusal). */
export class ServerUnreachable extends LockstepError {
  constructor(
    readonly target: string,
    /** The role its certificate must carry: a handshake made to see why checks the same. */
    readonly kind: Role,
    message: string,
  ) {
    super('LOCKSTEP_ERR_UNAVAILABLE', message);
  }
}

function fromServiceError(err: unknown, server: ServerRef): Error {
  const se = err as Partial<grpc.ServiceError>;
  if (typeof se.code !== 'number') return err instanceof Error ? err : new Error(String(err));
  const carried = carriedError(err);
  if (carried) return carried;
  if (se.code === grpc.status.UNAVAILABLE || se.code === grpc.status.DEADLINE_EXCEEDED) {
    return new ServerUnreachable(
      server.target,
      server.kind,
      `cannot reach the ${server.kind} at ${server.target} (${se.details ?? 'unavailable'}); is it running and is ${server.flag} right?`,
    );
  }
  return new Error(se.details ?? errorMessage(err));
}

/** Adapts an async function to a grpc-js unary handler that reports LockstepErrors faithfully. */
export function unary<Req, Res>(
  fn: (request: Req) => Promise<Res> | Res,
): grpc.handleUnaryCall<Req, Res> {
  return (call, callback) => {
    Promise.resolve()
      .then(() => fn(call.request))
      .then(
        (res) => callback(null, res),
        (err: unknown) => callback(toServiceError(err)),
      );
  };
}
