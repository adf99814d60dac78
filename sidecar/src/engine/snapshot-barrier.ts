// Snapshots of one or more volumes at one write-order point, on this copy and on every peer copy
// in sync. This is the only code that decides where a cut falls relative to writes:
//
//   hold      new writes wait, the ones in flight finish (answered by every copy), each member
//             cuts here and on its in-sync peers (one round trip), writes resume. Bounded: if
//             the members do not drain in time, nothing is cut and the writes are released.
//   no hold   nothing waits to start: from the first cut until the last, writes run but their
//             answers are held, so no write after a cut can be acknowledged — and so depended
//             on — before every member has cut. A member that replicates is still held for its
//             own cut, since its peers must cut after exactly the same writes.
//
// Each member's log is prepared (created, durable) before anything is held, so a hold covers
// only the cuts themselves.
import { randomUUID } from 'node:crypto';
import { LockstepError, errorMessage } from '../../../lib/errors';
import type { PeerLink } from '../replication/peer-link';
import type { SnapshotInfo } from '../snapshots/snapshot-catalog';
import type { SavedLog } from '../snapshots/saved-log';
import { refuseReserved } from '../snapshots/resync-protection';
import type { ReplicatedVolume } from './replicated-volume';

export type CopyState = 'Taken' | 'Missing';

export interface SnapshotCopy {
  address: string;
  node: string;
  state: CopyState;
  reason: string;
}

export interface MemberSnapshot extends SnapshotInfo {
  volume: string;
  copies: SnapshotCopy[];
}

export interface BarrierOptions {
  hold: boolean;
  /** With hold: give up if the members are not drained within this time. */
  holdTimeoutMs: number;
}

interface Prepared {
  rv: ReplicatedVolume;
  log: SavedLog;
  uid: string;
}

export async function snapshotAtOnePoint(
  members: ReplicatedVolume[],
  name: string,
  label: string,
  opts: BarrierOptions,
): Promise<{ snapshots: MemberSnapshot[]; holdMs: number }> {
  const prepared = await prepareAll(members, name, label);
  const started = performance.now();
  let snapshots: MemberSnapshot[];
  if (opts.hold) {
    const releases = await holdPrepared(prepared, opts.holdTimeoutMs);
    try {
      snapshots = await Promise.all(prepared.map((p) => cutMember(p, name, label)));
    } finally {
      for (const release of releases) release();
    }
  } else {
    const opens = members.map((rv) => rv.gateAcks());
    try {
      // Writes that started before the gates may be answered at any time: they finish first.
      await Promise.all(members.map((rv) => rv.drained()));
      snapshots = [];
      for (const p of prepared) {
        if (p.rv.snapshotPeers().ready.length === 0) {
          snapshots.push(await cutMember(p, name, label));
          continue;
        }
        const release = await p.rv.holdWrites();
        try {
          snapshots.push(await cutMember(p, name, label));
        } finally {
          release();
        }
      }
    } finally {
      for (const open of opens) open();
    }
  }
  return { snapshots, holdMs: performance.now() - started };
}

/**
 * The switchover of a move: with every member's writes held (the ones in flight answered by
 * every copy), `to` must be in sync with each; then the clients are cut off (the held writes
 * will never be answered here), each member is cut here and on its in-sync peers — the point
 * the replicas left behind resync from — and demoted. No write falls between the cuts and the
 * demotions.
 */
export async function handOver(
  members: ReplicatedVolume[],
  name: string,
  label: string,
  opts: { to: string; holdTimeoutMs: number; cutClients: (rv: ReplicatedVolume) => void },
): Promise<{ snapshots: MemberSnapshot[]; holdMs: number; stepsMs: Record<string, number> }> {
  const prepared = await prepareAll(members, name, label);
  const started = performance.now();
  const stepsMs: Record<string, number> = {};
  let at = started;
  const step = (name: string) => {
    const now = performance.now();
    stepsMs[name] = now - at;
    at = now;
  };
  const releases = await holdPrepared(prepared, opts.holdTimeoutMs);
  try {
    step('drain');
    // No flush: `to` holds every acknowledged write as any in-sync copy does, and those a
    // client flushed are durable there already (a FLUSH is answered once every copy synced).
    try {
      for (const rv of members) rv.refuseUnlessCaughtUp(opts.to);
    } catch (err) {
      for (const p of prepared) await p.rv.snapshots.discard(p.log);
      throw err;
    }
    for (const rv of members) opts.cutClients(rv);
    const snapshots = await Promise.all(prepared.map((p) => cutMember(p, name, label)));
    step('cut');
    for (const rv of members) await rv.demoteHeld();
    step('demote');
    return { snapshots, holdMs: performance.now() - started, stepsMs };
  } finally {
    for (const release of releases) release();
  }
}

/** Each member's log, prepared (durable) here and on its in-sync peers before any hold. */
async function prepareAll(
  members: ReplicatedVolume[],
  name: string,
  label: string,
): Promise<Prepared[]> {
  for (const rv of members) refuseReserved(rv.volumeName, { name }, false);
  const prepared: Prepared[] = [];
  try {
    for (const rv of members) {
      const uid = randomUUID();
      // The peers prepare theirs meanwhile; one that could not just takes it whole in the hold.
      const [log] = await Promise.all([
        rv.snapshots.prepare(name, label, uid),
        ...rv
          .snapshotPeers()
          .ready.map((link) => link.prepareSnapshot(name, label, uid).catch(() => undefined)),
      ]);
      prepared.push({ rv, uid, log });
    }
  } catch (err) {
    for (const p of prepared) await p.rv.snapshots.discard(p.log);
    throw err;
  }
  return prepared;
}

/** Holds the members' writes; if they do not drain in time, the prepared logs are discarded. */
function holdPrepared(prepared: Prepared[], timeoutMs: number): Promise<(() => void)[]> {
  return holdAll(
    prepared.map((p) => p.rv),
    timeoutMs,
  ).catch(async (err: unknown) => {
    for (const p of prepared) await p.rv.snapshots.discard(p.log);
    throw err;
  });
}

/** Holds every member's writes; on timeout releases those already held and throws. */
async function holdAll(members: ReplicatedVolume[], timeoutMs: number): Promise<(() => void)[]> {
  const holds = members.map((rv) => rv.holdWrites());
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () =>
        reject(
          new LockstepError(
            'LOCKSTEP_ERR_UNAVAILABLE',
            `writes in flight did not drain within ${timeoutMs} ms; nothing was cut, writes released`,
          ),
        ),
      timeoutMs,
    );
  });
  try {
    return await Promise.race([Promise.all(holds), timeout]);
  } catch (err) {
    for (const h of holds)
      void h.then(
        (release) => release(),
        () => undefined,
      );
    throw err;
  } finally {
    clearTimeout(timer);
  }
}

/** Cuts one member here and on its in-sync peers (its writes are held or answered-gated). */
async function cutMember(p: Prepared, name: string, label: string): Promise<MemberSnapshot> {
  const { rv } = p;
  const { ready, lacking } = rv.snapshotPeers();
  const [local, ...remote] = await Promise.allSettled([
    rv.snapshots.cut(p.log),
    ...ready.map((link) => link.takeSnapshot(name, label, p.uid)),
  ]);
  if (local.status === 'rejected') {
    // This copy has no snapshot: neither may the peers that took one.
    await Promise.allSettled(ready.map((link) => link.dropSnapshot(name)));
    throw local.reason;
  }
  const copies: SnapshotCopy[] = [
    { address: rv.localAddress, node: rv.localNode, state: 'Taken', reason: '' },
    ...ready.map((link, i) => copyOf(link, remote[i])),
    ...lacking.map(({ link, reason }) => ({
      address: link.address,
      node: link.node,
      state: 'Missing' as const,
      reason,
    })),
  ];
  return { ...local.value, volume: rv.volumeName, copies };
}

function copyOf(link: PeerLink, result: PromiseSettledResult<void>): SnapshotCopy {
  return result.status === 'fulfilled'
    ? { address: link.address, node: link.node, state: 'Taken', reason: '' }
    : {
        address: link.address,
        node: link.node,
        state: 'Missing',
        reason: errorMessage(result.reason),
      };
}
