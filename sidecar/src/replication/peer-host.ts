// What a PeerLink needs from the volume it replicates: identity for the handshake, what the
// resync it runs needs (ResyncSource: the local copy, the peers' tracking, regions held off live
// writes), and callbacks for state changes. The replicated volume (engine/) implements it;
// nothing here knows the engine.
import type { Logger } from '../../../lib/logger';
import type { SnapshotCatalog } from '../snapshots/snapshot-catalog';
import type { MediatorConfig, ReplicationMode } from '../store/volume-metadata';
import type { Generations } from './generations';
import type { PeerLink } from './peer-link';
import type { PeerState } from './replication-status';
import type { ResyncSource } from './resync';

export interface PeerHost extends ResyncSource {
  readonly volumeName: string;
  readonly uuid: string;
  /** Told to the peer in the handshake. */
  readonly mode: ReplicationMode;
  readonly localNode: string;
  readonly localAddress: string;
  /** The epoch every handshake, hello and op carries (the fencing token). */
  readonly epoch: number;
  /** The relationship's mediator, told to the peer in the handshake; undefined without one. */
  readonly mediator: MediatorConfig | undefined;
  readonly log: Logger;
  /** The volume's directory: the peers' bitmaps, an establishment's saved plan. */
  readonly dir: string;
  /** Its snapshots: a resync with no bitmap to trust starts from the newest the peer shares. */
  readonly snapshots: SnapshotCatalog;
  generations(): Generations;
  /** The relationship's nodes as this primary knows them, told to every peer (SetMembers). */
  relationshipNodes(): string[];
  /** Holds new writes once those in flight are done; resolves with the release. */
  holdWrites(): Promise<() => void>;
  bitmapUuid(peer: string): string | null;
  /** The peer holds everything up to our current generation. */
  onPeerCaughtUp(link: PeerLink): Promise<void>;
  onPeerState(link: PeerLink, from: PeerState, to: PeerState): void;
  /** A peer has seen a newer epoch: this copy was replaced and must stop being a primary. */
  replaced(reason: string): void;
}
