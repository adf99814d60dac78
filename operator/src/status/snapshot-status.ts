// A ReplicatedSnapshot's status, summarized from what the primary's agent reports: the stable
// ids a CSI snapshot layer reads (snapshotID, volume and snapshot handles, creationTime,
// readyToUse, restore size), the state of every copy, the verification result, the
// Ready/Replicated/Verified conditions, and the Event a change deserves. Pure: the reconciler
// writes.
import type { SnapshotInfo, Verification } from '../../../lib/agent-client';
import type {
  CopyVerificationState,
  ReplicatedSnapshot,
  ReplicatedSnapshotStatus,
  SnapshotCopyStatus,
  SnapshotVolumeStatus,
  VerificationResult,
} from '../api/types';
import type { Side } from '../resolve/relationship-plan';
import type { SnapshotSource } from '../resolve/snapshot-source';
import { mergeConditions, type DesiredCondition } from './conditions';
import type { EventType } from './event-recorder';

/** Why something has not happened (yet): a condition reason and a message. */
export interface Why {
  reason: string;
  message: string;
}

export interface SnapshotEvent {
  type: EventType;
  reason: string;
  message: string;
}

/** Exports are named VOLUME@SNAPSHOT on the agents. */
const HANDLE_SEPARATOR = '@';

/**
 * The snapshot's name on every copy: from the object's uid, so it is stable across operator
 * restarts, unique in the cluster, and never reused by a later object of the same name.
 * Matches the agents' snapshot names (lowercase, digits, '-', at most 63 characters).
 */
export function snapshotId(snap: ReplicatedSnapshot): string {
  const uid = snap.metadata.uid;
  if (!uid) throw new Error(`ReplicatedSnapshot ${snap.metadata.name} has no uid`);
  return `rs-${uid.toLowerCase()}`;
}

export function snapshotHandle(volumeHandle: string, id: string): string {
  return `${volumeHandle}${HANDLE_SEPARATOR}${id}`;
}

/**
 * The status of a snapshot not taken yet. With `source` it records the intent (the id, the
 * volumes and the copies, all Pending) before the agents are asked, so a deletion always knows
 * where to look, whatever happens between the take and the next status write.
 */
export function pendingStatus(
  snap: ReplicatedSnapshot,
  source: SnapshotSource | undefined,
  why: Why,
  now: Date,
): ReplicatedSnapshotStatus {
  const id = snapshotId(snap);
  const base: ReplicatedSnapshotStatus = source
    ? {
        ...identity(snap, source, id),
        volumes: source.volumes.map((v) => ({
          ...volumeIdentity(v, id),
          copies: source.sides.map((s) => ({ node: s.node, state: 'Pending' as const })),
        })),
      }
    : { ...snap.status, snapshotID: id };
  const status: ReplicatedSnapshotStatus = {
    ...base,
    observedGeneration: snap.metadata.generation ?? 0,
    phase: 'Pending',
    readyToUse: false,
  };
  return withConditions(snap, status, why, undefined, now);
}

/** The status once the primary took the snapshot: `taken` holds each volume's, in order. */
export function takenStatus(
  snap: ReplicatedSnapshot,
  source: SnapshotSource,
  taken: { snapshots: readonly SnapshotInfo[]; holdMs: number },
  now: Date,
): ReplicatedSnapshotStatus {
  const id = snapshotId(snap);
  const byVolume = new Map(taken.snapshots.map((s) => [s.volume, s]));
  const volumes = source.volumes.map((v): SnapshotVolumeStatus => {
    const s = byVolume.get(v.agentName);
    return { ...volumeIdentity(v, id), copies: copiesOf(s, source) };
  });
  const cut = Math.min(...taken.snapshots.map((s) => Number(s.createdAtMs)).filter((t) => t > 0));
  const complete = source.sides.filter((side) =>
    volumes.every((v) => v.copies.some((c) => c.node === side.node && c.state === 'Taken')),
  );
  // Usable once the primary holds every volume's snapshot: restore, clone and export work.
  const ready = volumes.every((v) =>
    v.copies.some((c) => c.node === source.primary.node && c.state === 'Taken'),
  );
  const status: ReplicatedSnapshotStatus = {
    ...identity(snap, source, id),
    observedGeneration: snap.metadata.generation ?? 0,
    phase: complete.length === source.sides.length ? 'Ready' : 'Degraded',
    readyToUse: ready,
    holdMs: Math.round(taken.holdMs * 1000) / 1000,
    copiesTaken: `${complete.length}/${source.sides.length}`,
    volumes,
  };
  if (Number.isFinite(cut)) status.creationTime = new Date(cut).toISOString();
  const notReady = ready
    ? undefined
    : { reason: 'PrimaryCopyMissing', message: `the primary ${source.primary.node} lacks it` };
  return withConditions(snap, status, notReady, undefined, now);
}

/** Each side's copy of one volume's snapshot, the primary first; unreported copies Missing. */
function copiesOf(s: SnapshotInfo | undefined, source: SnapshotSource): SnapshotCopyStatus[] {
  if (!s) {
    return source.sides.map((side) => ({
      node: side.node,
      state: 'Missing',
      reason: 'the primary did not report this volume',
    }));
  }
  return source.sides.map((side): SnapshotCopyStatus => {
    const c = s.copies.find((x) => matches(x, side));
    // A volume that replicates to nobody reports no copies: its own is the one it took.
    if (!c) {
      return side === source.primary
        ? { node: side.node, state: 'Taken' }
        : { node: side.node, state: 'Missing', reason: 'not a replica of the primary' };
    }
    return c.state === 'Taken'
      ? { node: side.node, state: 'Taken' }
      : { node: side.node, state: 'Missing', reason: c.reason || 'the copy did not take it' };
  });
}

/** The status with the copies' verification from the primary's answer for each volume. */
export function verifiedStatus(
  snap: ReplicatedSnapshot,
  taken: ReplicatedSnapshotStatus,
  results: readonly Verification[],
  source: Pick<SnapshotSource, 'primary' | 'sides'>,
  now: Date,
): ReplicatedSnapshotStatus {
  const byVolume = new Map(results.map((r) => [r.volume, r]));
  const problems: string[] = [];
  let differing = 0;
  let differs = false;
  let incomplete = false;
  const volumes = (taken.volumes ?? []).map((v): SnapshotVolumeStatus => {
    const r = byVolume.get(v.volumeHandle);
    const copies = v.copies.map((c): SnapshotCopyStatus => {
      // The primary's copy is what the others are compared with.
      if (c.node === source.primary.node) return withoutVerification(c);
      const side = source.sides.find((x) => x.node === c.node) ?? {
        node: c.node,
        endpoint: '',
        ready: false,
      };
      const cv = r?.copies.find((x) => matches(x, side));
      const state: CopyVerificationState = (cv?.state as CopyVerificationState) ?? 'Missing';
      const regions = cv?.differingOffsets.length ?? 0;
      if (state === 'Differs') {
        differs = true;
        differing += regions;
        problems.push(`${v.name} on ${c.node}: ${regions} region(s) differ`);
      } else if (state !== 'Identical') {
        incomplete = true;
        problems.push(`${v.name} on ${c.node}: ${cv?.reason || 'not compared'}`);
      }
      return {
        ...withoutVerification(c),
        verification: state,
        ...(state === 'Differs' ? { differingRegions: regions } : {}),
      };
    });
    return { ...v, copies };
  });
  const result: VerificationResult = differs ? 'Differs' : incomplete ? 'Incomplete' : 'Identical';
  const status: ReplicatedSnapshotStatus = {
    ...taken,
    volumes,
    verification: {
      generation: snap.metadata.generation ?? 0,
      result,
      completionTime: now.toISOString(),
      regionSize: Math.max(0, ...results.map((r) => Number(r.regionSize))),
      differingRegions: differing,
      message:
        problems.join('; ') ||
        `every copy identical (${volumes.length} volume(s) on ${volumes[0]?.copies.length ?? 0} copies)`,
    },
  };
  return withConditions(snap, status, undefined, undefined, now);
}

/**
 * The status of a taken snapshot at the current generation: with `why`, the reason its
 * verification cannot run yet.
 */
export function restated(
  snap: ReplicatedSnapshot,
  taken: ReplicatedSnapshotStatus,
  why: Why | undefined,
  now: Date,
): ReplicatedSnapshotStatus {
  return withConditions(
    snap,
    { ...taken, observedGeneration: snap.metadata.generation ?? 0 },
    undefined,
    why,
    now,
  );
}

/** Whether spec.verify asks for a verification this generation has not had. */
export function needsVerification(snap: ReplicatedSnapshot): boolean {
  const v = snap.status?.verification;
  return !!snap.spec.verify && !!snap.status?.readyToUse && v?.generation !== generationOf(snap);
}

/** The Events for what changed between two statuses, in the order they happened. */
export function snapshotEvents(
  previous: ReplicatedSnapshotStatus | undefined,
  next: ReplicatedSnapshotStatus,
): SnapshotEvent[] {
  const out: SnapshotEvent[] = [];
  const wasReady = condition(previous, 'Ready');
  const ready = condition(next, 'Ready');
  if (next.readyToUse && !previous?.readyToUse) {
    const at = `${next.snapshotID} of ${next.volumes?.length ?? 0} volume(s) at ${next.creationTime ?? '?'}`;
    const replicated = condition(next, 'Replicated');
    out.push(
      next.phase === 'Ready'
        ? { type: 'Normal', reason: 'SnapshotTaken', message: `${at} on every copy` }
        : {
            type: 'Warning',
            reason: 'CopiesMissing',
            message: `${at}, copies ${next.copiesTaken ?? '?'}: ${replicated?.message ?? ''}`,
          },
    );
  } else if (
    ready?.status === 'False' &&
    ready.reason !== 'WaitingForReplication' &&
    (wasReady?.reason !== ready.reason || wasReady.status !== 'False')
  ) {
    out.push({ type: 'Warning', reason: ready.reason, message: ready.message });
  }
  const v = next.verification;
  if (v && v.generation !== previous?.verification?.generation) {
    out.push({
      type: v.result === 'Identical' ? 'Normal' : 'Warning',
      reason: v.result === 'Identical' ? 'Verified' : `Verification${v.result}`,
      message: v.message,
    });
  }
  return out;
}

// ---- building blocks ------------------------------------------------------------------------

function identity(
  snap: ReplicatedSnapshot,
  source: SnapshotSource,
  id: string,
): ReplicatedSnapshotStatus {
  return {
    ...snap.status,
    snapshotID: id,
    consistencyGroup: source.group,
    primaryNode: source.primary.node,
    restoreSizeBytes: source.volumes.reduce((n, v) => n + v.sizeBytes, 0),
  };
}

function volumeIdentity(
  v: SnapshotSource['volumes'][number],
  id: string,
): Omit<SnapshotVolumeStatus, 'copies'> {
  return {
    name: v.name,
    persistentVolumeClaimName: v.pvc,
    volumeHandle: v.agentName,
    snapshotHandle: snapshotHandle(v.agentName, id),
    sizeBytes: v.sizeBytes,
  };
}

function matches(copy: { node: string; address: string }, side: Side): boolean {
  return copy.node ? copy.node === side.node : copy.address === side.endpoint;
}

function withoutVerification(c: SnapshotCopyStatus): SnapshotCopyStatus {
  const rest = { ...c };
  delete rest.verification;
  delete rest.differingRegions;
  return rest;
}

const generationOf = (snap: ReplicatedSnapshot): number => snap.metadata.generation ?? 0;

function condition(s: ReplicatedSnapshotStatus | undefined, type: string) {
  return s?.conditions?.find((c) => c.type === type);
}

/** Ready, Replicated and Verified, from the status' own fields and what holds them back. */
function withConditions(
  snap: ReplicatedSnapshot,
  status: ReplicatedSnapshotStatus,
  notReady: Why | undefined,
  verifyWait: Why | undefined,
  now: Date,
): ReplicatedSnapshotStatus {
  // Named, not spread: a Why may be a Blocked error, whose message is not enumerable.
  const cond = (type: string, s: 'True' | 'False' | 'Unknown', why: Why): DesiredCondition => ({
    type,
    status: s,
    reason: why.reason,
    message: why.message,
  });
  const missing = (status.volumes ?? []).flatMap((v) =>
    v.copies
      .filter((c) => c.state === 'Missing')
      .map((c) => `${v.name} on ${c.node}: ${c.reason ?? 'missing'}`),
  );
  const taken = !!status.readyToUse;
  const v = status.verification;
  const desired: DesiredCondition[] = [
    taken
      ? cond('Ready', 'True', {
          reason: 'SnapshotTaken',
          message: `cut at ${status.creationTime ?? '?'} on ${status.primaryNode ?? '?'}, copies ${status.copiesTaken ?? '?'}`,
        })
      : cond('Ready', 'False', notReady ?? { reason: 'Pending', message: 'not taken yet' }),
    !taken
      ? cond('Replicated', 'Unknown', { reason: 'NotTaken', message: 'not taken yet' })
      : missing.length
        ? cond('Replicated', 'False', { reason: 'CopiesMissing', message: missing.join('; ') })
        : cond('Replicated', 'True', {
            reason: 'AllCopiesTaken',
            message: 'every copy of every volume took it at the same point',
          }),
    v
      ? cond('Verified', v.result === 'Identical' ? 'True' : 'False', {
          reason: v.result,
          message: v.message,
        })
      : !snap.spec.verify
        ? cond('Verified', 'Unknown', { reason: 'NotRequested', message: 'spec.verify is off' })
        : cond(
            'Verified',
            'Unknown',
            verifyWait ?? {
              reason: taken ? 'Verifying' : 'NotTaken',
              message: taken ? 'comparing the copies' : 'not taken yet',
            },
          ),
  ];
  return {
    ...status,
    conditions: mergeConditions(snap.status?.conditions, desired, generationOf(snap), now),
  };
}
