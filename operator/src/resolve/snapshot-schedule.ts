// A SyncRelationship's snapshot schedules: which ReplicatedSnapshot is due now, which are past
// retention, and when to look again. Pure. A schedule's time is cut into slots of its interval,
// aligned to the Unix epoch (so 60 minutes is on the hour, UTC); each slot gets one snapshot,
// named after the slot, so creating it twice is harmless and a missed slot is not made up.
import type { ReplicatedSnapshot, SnapshotSchedule, SyncRelationship } from '../api/types';

/** Marks the ReplicatedSnapshots a schedule made: `<relationship>/<label>`. */
export const SCHEDULE_ANNOTATION = 'lockstep.dev/schedule';

export interface ScheduleStep {
  /** The snapshot to create for the current slot, if it has none yet. */
  create?: ReplicatedSnapshot;
  /** Names of snapshots past retention. */
  prune: string[];
  /** When the next slot starts. */
  nextAt: Date;
}

export function scheduleKey(rel: SyncRelationship, schedule: SnapshotSchedule): string {
  return `${rel.metadata.name}/${schedule.label}`;
}

/** The snapshots `schedule` of `rel` made, among `all` (the namespace's). */
export function scheduledBy(
  rel: SyncRelationship,
  schedule: SnapshotSchedule,
  all: readonly ReplicatedSnapshot[],
): ReplicatedSnapshot[] {
  const key = scheduleKey(rel, schedule);
  return all.filter((s) => s.metadata.annotations?.[SCHEDULE_ANNOTATION] === key);
}

export function scheduleStep(
  rel: SyncRelationship,
  schedule: SnapshotSchedule,
  mine: readonly ReplicatedSnapshot[],
  now: Date,
): ScheduleStep {
  const interval = schedule.intervalMinutes * 60_000;
  const slot = Math.floor(now.getTime() / interval) * interval;
  const name = slotName(rel, schedule, slot);
  const live = mine.filter((s) => !s.metadata.deletionTimestamp);
  const covered = live.some((s) => s.metadata.name === name || created(s) >= slot);
  const step: ScheduleStep = {
    prune: prune(live, schedule.keep),
    nextAt: new Date(slot + interval),
  };
  if (!covered) {
    step.create = {
      apiVersion: 'lockstep.dev/v1alpha1',
      kind: 'ReplicatedSnapshot',
      metadata: {
        name,
        namespace: rel.metadata.namespace,
        annotations: { [SCHEDULE_ANNOTATION]: scheduleKey(rel, schedule) },
      },
      spec: {
        source: { consistencyGroup: rel.spec.consistencyGroup },
        label: schedule.label,
        verify: !!schedule.verify,
      },
    };
  }
  return step;
}

/**
 * Newest first, the first `keep` ready snapshots stay, and so does anything newer than the
 * oldest of them (still being taken); everything older goes. Snapshots that never become
 * ready do not push good ones out.
 */
function prune(snapshots: readonly ReplicatedSnapshot[], keep: number): string[] {
  const newestFirst = [...snapshots].sort(
    (a, b) => created(b) - created(a) || b.metadata.name.localeCompare(a.metadata.name),
  );
  let ready = 0;
  const out: string[] = [];
  for (const s of newestFirst) {
    if (ready >= keep) out.push(s.metadata.name);
    else if (s.status?.readyToUse) ready++;
  }
  return out;
}

/** `<relationship>-<label>-<yyyymmdd-hhmm>`: a valid object name for any label. */
function slotName(rel: SyncRelationship, schedule: SnapshotSchedule, slot: number): string {
  const stamp = new Date(slot).toISOString(); // 2026-03-01T12:00:00.000Z
  const when = `${stamp.slice(0, 10).replaceAll('-', '')}-${stamp.slice(11, 16).replace(':', '')}`;
  const label = schedule.label.replace(/[._]/g, '-');
  return `${rel.metadata.name}-${label}-${when}`;
}

/** Timestamps arrive as strings from watches and as Dates from lists: compare instants. */
function created(s: ReplicatedSnapshot): number {
  return new Date(s.metadata.creationTimestamp ?? 0).getTime();
}
