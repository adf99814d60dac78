// The replication state every layer shares: a peer's state as the primary sees it, and the
// status view the control API, metrics and the operator read. One module, so that the engine,
// the links and the agent's services agree on these types without importing each other.
import type { ReplicationMode, Role } from '../store/volume-metadata';

export const PEER_STATES = [
  'Connecting',
  'Baselining',
  'Resyncing',
  'InSync',
  'OutOfSync',
  'Disconnected',
  'SplitBrain',
  'PeerIsPrimary',
  'PeerIsNewer',
] as const;
export type PeerState = (typeof PEER_STATES)[number];

/**
 * States in which live writes are sent to the peer (catching up or in sync). A peer being
 * established (Baselining) takes snapshots and diffs over the lanes, not live writes.
 */
export const STREAMING_STATES: ReadonlySet<PeerState> = new Set(['Resyncing', 'InSync']);

export interface ResyncProgress {
  /**
   * baseline, incremental: establishing a replica, a snapshot then diffs between snapshots, not
   * live (replication/establishment.ts); cutover: the resync that ends it, live; bitmap: what
   * the peer missed; full: regions whose checksums differ; snapshot: what either copy changed
   * since the newest snapshot both hold.
   */
  kind: 'baseline' | 'incremental' | 'cutover' | 'bitmap' | 'full' | 'snapshot';
  doneBytes: number;
  totalBytes: number;
  startedAt: number;
}

export interface PeerStatus {
  address: string;
  node: string;
  state: PeerState;
  /** Why the peer is not in sync (the last failure or refusal); empty when it is. */
  reason: string;
  dirtyBytes: number;
  resyncBytesSent: number;
  liveBytesSent: number;
  resync?: { kind: string; doneBytes: number; totalBytes: number; etaSeconds: number };
  lastInSyncAt: number;
  /** The peer's last consistent snapshot while it is not in sync (see PeerLink.consistent). */
  consistentSnapshot: string;
  consistentSnapshotAtMs: number;
  /** Times the link failed since the agent started: once per connection attempt at most. */
  linkFailures: number;
}

/**
 * Where a copy stands with the mediator: a primary's standing (epoch-authority.ts), a
 * secondary's failover watch (failover.ts), or neither.
 */
export const PROTECTION_STATES = [
  'unprotected',
  'confirming',
  'holding',
  'seeking',
  'fenced',
  'manual',
  'primary-present',
  'waiting',
  'not-eligible',
  'mediator-unreachable',
  'took-over',
] as const;
export type ProtectionState = (typeof PROTECTION_STATES)[number];

/** Where a copy stands with the mediator (see SplitBrainProtection in agent.proto). */
export interface ProtectionStatus {
  /** Empty: split brain protection is off. */
  mediator: string;
  group: string;
  failover: string;
  epoch: number;
  acceptsWrites: boolean;
  state: ProtectionState;
  /** The last call to the mediator was answered (true without a mediator). */
  mediatorReachable: boolean;
  detail: string;
  inSync: string[];
  /** A secondary: ms without a streaming primary (0 while one streams). */
  primaryAbsentMs: number;
  graceMs: number;
  suspendLimitMs: number;
  /** When this copy was last promoted with --force (ms since the Unix epoch; 0: never). */
  forcedPromotionAtMs: number;
}

export interface ReplicationStatus {
  role: Role;
  mode: ReplicationMode | '';
  regionSize: number;
  maxResyncBytesPerSecond: number;
  generation: string;
  /** Secondary: a primary is streaming to this copy right now. */
  primaryConnected: boolean;
  /**
   * Secondary: the snapshot it took before a resync began overwriting it, kept until the resync
   * ends; promoting the copy meanwhile rolls it back to it. Empty when none.
   */
  resyncSnapshot: string;
  /** Secondary: bytes of writes (live and catch-up) taken from primaries since it became one. */
  receivedBytes: number;
  /** The peers it replicates to while primary, as configured (a demoted copy keeps the list). */
  peerAddresses: string[];
  peers: PeerStatus[];
  protection: ProtectionStatus;
}
