// A secondary that a resync catches up is overwritten in the order the primary's scan copies
// regions, not the order the workload wrote them: until the resync ends it holds a mix that no
// primary ever held. So before the first such write the copy takes a snapshot of what it holds
// (its last complete state of the primary) and keeps it until the primary says the copy has
// caught up; a copy promoted before that is first rolled back to it. DRBD leaves this to a
// before-resync-target handler script; here it is built in. A copy being established
// (replication/establishment.ts) is protected the same way from its first commit on: each
// commit is a snapshot of the primary's that it now holds whole.
//
// This file owns the policy: when a copy is protected, which snapshot protects it, and when
// that snapshot goes. The secondary's session applies it; promotion rolls back through it.
import { LockstepError } from '../../../lib/errors';
import { ESTABLISH_PREFIX } from '../replication/establishment';
import { ZERO_GENERATION } from '../replication/generations';
import type { SnapshotCatalog, SnapshotInfo } from './snapshot-catalog';

/** The protecting snapshot's name: reserved, no user snapshot may take it. */
export const RESYNC_SNAPSHOT = 'before-resync';
const LABEL = 'resync-protection';

function protections(snapshots: SnapshotCatalog): SnapshotInfo[] {
  return snapshots.list().filter((s) => s.label === LABEL);
}

/** The snapshot protecting this copy while a resync catches it up, if one does. */
export function resyncProtection(snapshots: SnapshotCatalog): SnapshotInfo | undefined {
  return protections(snapshots).at(-1);
}

/**
 * Called when a primary opens a session, before any of its writes can land. A copy on the
 * primary's generation misses at most the writes in flight when the link broke, and a copy
 * that was never complete has nothing to keep; any other is about to be resynced, and is
 * protected (once: a resync broken off and begun again keeps the snapshot of the last
 * complete state, not one of the mix).
 */
export async function protectBeforeResync(
  snapshots: SnapshotCatalog,
  own: string,
  primary: string,
): Promise<SnapshotInfo | undefined> {
  if (own === ZERO_GENERATION || own === primary) return undefined;
  return resyncProtection(snapshots) ?? (await snapshots.create(RESYNC_SNAPSHOT, LABEL));
}

/** The primary says the copy has caught up: the mix is over, the snapshot goes. */
export async function releaseProtection(snapshots: SnapshotCatalog): Promise<void> {
  for (const s of protections(snapshots)) await snapshots.delete(s.name);
}

/**
 * A round of establishment reached this copy whole: made durable, it becomes the copy's last
 * complete state (with the primary's uid: the two copies share it), replacing the previous.
 */
export async function commitEstablished(
  snapshots: SnapshotCatalog,
  local: { flush(): Promise<void> },
  name: string,
  uid: string,
): Promise<void> {
  await local.flush();
  const previous = protections(snapshots);
  if (!previous.some((s) => s.uid === uid)) await snapshots.create(name, LABEL, uid);
  for (const s of previous) if (s.uid !== uid) await snapshots.delete(s.name);
}

/**
 * Refuses a user's snapshot named like a protecting or establishment one, or deleting the
 * protecting one.
 */
export function refuseReserved(
  volume: string,
  snapshot: { name: string; label?: string },
  deleting: boolean,
): void {
  const { name } = snapshot;
  if (deleting && snapshot.label === LABEL)
    throw new LockstepError(
      'LOCKSTEP_ERR_SNAPSHOT_IN_USE',
      `snapshot ${volume}@${name} keeps this copy's last complete state while a resync catches ` +
        'it up; it goes when the resync ends (promoting the copy before that rolls back to it)',
    );
  if (!reserved(name)) return;
  if (deleting)
    throw new LockstepError(
      'LOCKSTEP_ERR_SNAPSHOT_IN_USE',
      `snapshot ${volume}@${name} is what a replica being established is sent; it goes when ` +
        'the replica is in sync',
    );
  throw new LockstepError(
    'LOCKSTEP_ERR_INVALID_ARGUMENT',
    `snapshot name ${JSON.stringify(name)} is reserved (${RESYNC_SNAPSHOT}, ${ESTABLISH_PREFIX}*: ` +
      'the snapshots replication takes itself)',
  );
}

function reserved(name: string): boolean {
  return name === RESYNC_SNAPSHOT || name.startsWith(ESTABLISH_PREFIX);
}
