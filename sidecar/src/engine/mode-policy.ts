// The replication modes, each the one owner of its rules: whether a write may start (admission),
// which lanes its ops take to a peer, what a peer's miss does to the write, and when the client
// is answered (completion). The splitter asks; nothing else branches on the mode.
//
//   mode         admission              route     a peer misses a write     client answered
//   sync         always                 spread    write succeeds            every streaming copy
//   strict-sync  every peer streaming   spread    write fails (EIO)         every streaming copy
//                (or being established)
//   async        always                 ordered   write succeeds            local copy, within a
//                                                                          bounded backlog
//
// A missed write is marked in the peer's bitmap in every mode (the splitter does that), so a
// resync sends it later.
import { LockstepError } from '../../../lib/errors';
import type { Route } from '../replication/peer-link';
import type { PeerState } from '../replication/replication-status';
import type { ReplicationMode } from '../store/volume-metadata';

/** What a policy sees of a peer. */
export interface PeerView {
  readonly address: string;
  readonly state: PeerState;
  /** Live writes go to it now. */
  readonly streaming: boolean;
}

/** Writes answered on the local copy whose ops are still on their way to the peers. */
export interface Backlog {
  writes: number;
  bytes: number;
}

export type Completion =
  /** Answer once the local copy and every streaming peer have the write. */
  | 'all-copies'
  /** Answer once the local copy has it; the peers' ops follow in order. */
  | 'local-copy';

export interface ModePolicy {
  readonly mode: ReplicationMode;
  /** The lanes a live op (write, zero, flush) takes to a peer. */
  readonly route: Route;
  /** Undefined if a write or flush may start with these peers; else the error it fails with. */
  admit(peers: readonly PeerView[]): LockstepError | undefined;
  /** A peer missed a write or flush: the error the client gets, or undefined if it succeeds. */
  missed(peer: PeerView): LockstepError | undefined;
  /** When a write of `length` bytes is answered, given what is already on its way. */
  completion(backlog: Backlog, length: number): Completion;
}

/**
 * Async mode bounds what is acknowledged locally but not yet by every peer, in writes and in
 * bytes: the bytes bound is the data a lost primary can take with it; the count bound keeps
 * tiny writes from piling up unbounded bookkeeping. Beyond either, writes wait for the peers.
 */
export const ASYNC_MAX_BACKLOG = 512;
export const ASYNC_MAX_BACKLOG_BYTES = 64 * 1024 * 1024;

function strictRefusal(peer: PeerView): LockstepError {
  return new LockstepError(
    'LOCKSTEP_ERR_IO',
    `strict-sync: peer ${peer.address} is ${peer.state}, so the write is refused rather than acknowledged on fewer copies`,
  );
}

const sync: ModePolicy = {
  mode: 'sync',
  route: 'spread',
  admit: () => undefined,
  missed: () => undefined,
  completion: () => 'all-copies',
};

/**
 * A replica being established is no copy yet (it takes snapshots and diffs, not live writes):
 * strict-sync neither waits for it nor fails a write it misses, as it never did for a baseline.
 */
const establishing = (peer: PeerView) => peer.state === 'Baselining';

const strictSync: ModePolicy = {
  mode: 'strict-sync',
  route: 'spread',
  admit(peers) {
    const down = peers.find((p) => !p.streaming && !establishing(p));
    return down && strictRefusal(down);
  },
  missed: (peer) => (establishing(peer) ? undefined : strictRefusal(peer)),
  completion: () => 'all-copies',
};

const async: ModePolicy = {
  mode: 'async',
  // Acknowledged before the peer has them, async writes must reach it in the order they were
  // made, or a failover could find a later write without an earlier one it depends on.
  route: 'ordered',
  admit: () => undefined,
  missed: () => undefined,
  completion: (backlog, length) =>
    backlog.writes < ASYNC_MAX_BACKLOG && backlog.bytes + length <= ASYNC_MAX_BACKLOG_BYTES
      ? 'local-copy'
      : 'all-copies',
};

export function policyFor(mode: ReplicationMode): ModePolicy {
  switch (mode) {
    case 'sync':
      return sync;
    case 'strict-sync':
      return strictSync;
    case 'async':
      return async;
    default: {
      const unknown: never = mode;
      throw new LockstepError('LOCKSTEP_ERR_INVALID_ARGUMENT', `unknown mode ${String(unknown)}`);
    }
  }
}
