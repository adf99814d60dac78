// Two copies that took the same replicated snapshot were identical at its cut (it is taken
// only on peers in sync, at one write-order point). Whatever they differ in since is among the
// blocks either of them overwrote after it, and each copy's snapshot logs hold exactly those:
// copy-before-write saved every first overwrite (durably, before the write), crash or not. So
// when no bitmap can be trusted, a resync sends those regions rather than comparing checksums
// of the whole volume. This file finds the newest snapshot two copies share and lists the
// regions a copy changed since it.
import { DirtyBitmap } from '../tracking/dirty-bitmap';
import type { SnapshotCatalog, SnapshotInfo } from './snapshot-catalog';

/** Uids of the copy's snapshots, newest first: what a peer may share with it. */
export function snapshotUids(snapshots: SnapshotCatalog): string[] {
  return snapshots
    .list()
    .map((s) => s.uid)
    .reverse();
}

/** The newest of `uids` (newest first) this copy holds too. */
export function newestCommon(snapshots: SnapshotCatalog, uids: string[]): SnapshotInfo | undefined {
  const held = new Map(snapshots.list().map((s) => [s.uid, s]));
  for (const uid of uids) {
    const s = held.get(uid);
    if (s) return s;
  }
  return undefined;
}

/** The regions (of `regionSize`) this copy changed since snapshot `name`. */
export function changedRegions(
  snapshots: SnapshotCatalog,
  name: string,
  volumeSize: number,
  regionSize: number,
): DirtyBitmap {
  const bitmap = new DirtyBitmap(volumeSize, regionSize);
  snapshots.changedBlocks(name).markBytes(bitmap);
  return bitmap;
}
