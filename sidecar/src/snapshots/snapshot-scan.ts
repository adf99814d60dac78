// A snapshot, as a copy pass reads it (replication/resync.ts ScanData): establishing a replica
// sends a snapshot of the volume, then what changed between two snapshots, while the volume
// itself keeps changing. Where a snapshot may hold data, the volume's allocation map says: an
// extent is marked before its first write and never unmarked, so whatever held data when the
// snapshot was taken is still marked now (the map only over-approximates, which costs a read).
import type { ScanData } from '../replication/resync';
import type { FileBlockDevice } from '../store/file-device';
import type { SnapshotCatalog } from './snapshot-catalog';

export function snapshotScanData(
  snapshots: SnapshotCatalog,
  name: string,
  device: FileBlockDevice,
): ScanData {
  return {
    allocation: device.allocation,
    readForScan: (offset, target) => snapshots.read(name, offset, target),
    alignedBuffer: () => device.alignedBuffer(),
    releaseAlignedBuffer: (buf) => device.releaseAlignedBuffer(buf),
  };
}
