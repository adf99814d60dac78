// What a PeerLink, and the resync it runs, need from the volume they replicate: identity for
// the handshake, the local copy to read from, a way to copy regions with live writes held off,
// the peers' tracking (whose bitmaps only VolumeTracking writes), and callbacks for state
// changes. The replicated volume (engine/) implements it; nothing here knows the engine.
import type { Logger } from '../../../lib/logger';
import type { FileBlockDevice } from '../store/file-device';
import type { ReplicationMode } from '../store/volume-metadata';
import type { VolumeTracking } from '../tracking/volume-tracking';
import type { Generations } from './generations';
import type { PeerLink } from './peer-link';
import type { PeerState } from './replication-status';

export interface PeerHost {
  readonly volumeName: string;
  readonly uuid: string;
  readonly sizeBytes: number;
  readonly regionSize: number;
  /** Told to the peer in the handshake. */
  readonly mode: ReplicationMode;
  readonly maxResyncBytesPerSecond: number;
  readonly localNode: string;
  readonly localAddress: string;
  /** The local copy, read directly (not through the splitter) by resync. */
  readonly local: FileBlockDevice;
  readonly tracking: VolumeTracking;
  readonly log: Logger;
  generations(): Generations;
  /**
   * Runs `work` with regions [first, last] held against live writes, after the ops on them
   * still on their way to the peers: a resync copy made inside reaches the peer after them.
   */
  withRegionsLocked<T>(first: number, last: number, work: () => Promise<T>): Promise<T>;
  bitmapUuid(peer: string): string | null;
  /** The peer holds everything up to our current generation. */
  onPeerCaughtUp(link: PeerLink): Promise<void>;
  onPeerState(link: PeerLink, from: PeerState, to: PeerState): void;
}
