// A volume's replication status as the control API and metrics show it, read off the engine's
// current state: per peer its link's state and progress, and what its bitmap says is missing.
import type { PeerLink } from '../replication/peer-link';
import type {
  PeerStatus,
  ProtectionStatus,
  ReplicationStatus,
} from '../replication/replication-status';
import type { VolumeMetadata } from '../store/volume-metadata';
import type { VolumeTracking } from '../tracking/volume-tracking';

export interface StatusSource {
  meta: VolumeMetadata;
  regionSize: number;
  primaryConnected: boolean;
  links: readonly PeerLink[];
  /** The peers' tracking; present whenever `links` is not empty. */
  tracking: VolumeTracking | undefined;
  /** The snapshot protecting this copy while a resync catches it up; empty if none does. */
  resyncSnapshot: string;
  receivedBytes: number;
  protection: ProtectionStatus;
}

function resyncOf(link: PeerLink): PeerStatus['resync'] {
  const r = link.resync;
  if (!r) return undefined;
  const elapsed = (Date.now() - r.startedAt) / 1000;
  const rate = elapsed > 0 ? r.doneBytes / elapsed : 0;
  const left = Math.max(0, r.totalBytes - r.doneBytes);
  return {
    kind: r.kind,
    doneBytes: r.doneBytes,
    totalBytes: r.totalBytes,
    etaSeconds: rate > 0 ? Math.ceil(left / rate) : -1,
  };
}

export function replicationStatus(s: StatusSource): ReplicationStatus {
  return {
    role: s.meta.role,
    mode: s.meta.replication?.mode ?? '',
    regionSize: s.regionSize,
    maxResyncBytesPerSecond: s.meta.replication?.maxResyncBytesPerSecond ?? 0,
    generation: s.meta.generation.current,
    primaryConnected: s.primaryConnected,
    resyncSnapshot: s.resyncSnapshot,
    receivedBytes: s.receivedBytes,
    peerAddresses: (s.meta.replication?.peers ?? []).map((p) => p.address),
    protection: s.protection,
    peers: s.links.map((l) => ({
      address: l.address,
      node: l.node,
      state: l.state,
      reason: l.reason,
      dirtyBytes: s.tracking?.bitmap(l.address).dirtyBytes() ?? 0,
      resyncBytesSent: l.resyncBytesSent,
      liveBytesSent: l.liveBytesSent,
      resync: resyncOf(l),
      lastInSyncAt: l.lastInSyncAt,
      consistentSnapshot: l.consistent?.name ?? '',
      consistentSnapshotAtMs: l.consistent?.createdAtMs ?? 0,
      linkFailures: l.failures,
    })),
  };
}
