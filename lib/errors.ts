// Errors that scripts and tests can match on: every error Lockstep raises on purpose carries a
// stable `code`, and its message says what happened and what to do next.

export type ErrorCode =
  | 'LOCKSTEP_ERR_INVALID_ARGUMENT'
  | 'LOCKSTEP_ERR_VOLUME_NOT_FOUND'
  | 'LOCKSTEP_ERR_VOLUME_EXISTS'
  | 'LOCKSTEP_ERR_VOLUME_IN_USE'
  | 'LOCKSTEP_ERR_VOLUME_FAILED'
  | 'LOCKSTEP_ERR_SNAPSHOT_NOT_FOUND'
  | 'LOCKSTEP_ERR_SNAPSHOT_EXISTS'
  | 'LOCKSTEP_ERR_SNAPSHOT_IN_USE'
  | 'LOCKSTEP_ERR_GROUP_NOT_FOUND'
  | 'LOCKSTEP_ERR_GROUP_EXISTS'
  | 'LOCKSTEP_ERR_METADATA_CORRUPT'
  | 'LOCKSTEP_ERR_DATA_FILE_MISMATCH'
  | 'LOCKSTEP_ERR_DATA_DIR_LOCKED'
  | 'LOCKSTEP_ERR_READ_ONLY'
  | 'LOCKSTEP_ERR_OUT_OF_RANGE'
  | 'LOCKSTEP_ERR_NO_SPACE'
  | 'LOCKSTEP_ERR_IO'
  | 'LOCKSTEP_ERR_NOT_ALLOWED'
  /** The caller's certificate does not allow what it asked (see lib/tls/access-policy.ts). */
  | 'LOCKSTEP_ERR_PERMISSION_DENIED'
  /** A request carried an epoch older than the copy's: its sender was replaced (fenced). */
  | 'LOCKSTEP_ERR_STALE_EPOCH'
  /** The Kubernetes API server refused a request (lib/kube-rest: the error has its status). */
  | 'LOCKSTEP_ERR_KUBE_API'
  | 'LOCKSTEP_ERR_UNAVAILABLE';

export class LockstepError extends Error {
  constructor(
    readonly code: ErrorCode,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'LockstepError';
  }
}

export function isLockstepError(err: unknown, code?: ErrorCode): err is LockstepError {
  return err instanceof LockstepError && (code === undefined || err.code === code);
}

/** The message of anything thrown, for logs and replies. */
export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
