// What a PeerLink needs from the volume it replicates: identity, the local copy to read from,
// the region locks it shares with live writes, the peer's dirty bitmap, and callbacks for
// state changes. The replicated volume (engine/) implements it.
import type { Logger } from '../../../lib/logger';
import type { RegionLocks } from '../engine/region-locks';
import type { FileBlockDevice } from '../store/file-device';
import type { ReplicationMode } from '../store/volume-metadata';
import type { VolumeTracking } from '../tracking/volume-tracking';
import type { Generations } from './generations';
import type { PeerLink, PeerState } from './peer-link';

export interface PeerHost {
  readonly volumeName: string;
  readonly uuid: string;
  readonly sizeBytes: number;
  readonly regionSize: number;
  readonly mode: ReplicationMode;
  readonly maxResyncBytesPerSecond: number;
  readonly localNode: string;
  readonly localAddress: string;
  /** The local copy, read directly (not through the splitter) by resync. */
  readonly local: FileBlockDevice;
  readonly locks: RegionLocks;
  readonly tracking: VolumeTracking;
  readonly log: Logger;
  generations(): Generations;
  /**
   * Settles once the ops on regions [first, last] still on their way to the peers (async
   * writes already acknowledged locally) have been answered; undefined if there is none.
   */
  peerOpsAhead(first: number, last: number): Promise<void> | undefined;
  bitmapUuid(peer: string): string | null;
  /** The peer holds everything up to our current generation. */
  onPeerCaughtUp(link: PeerLink): Promise<void>;
  onPeerState(link: PeerLink, from: PeerState, to: PeerState): void;
}
