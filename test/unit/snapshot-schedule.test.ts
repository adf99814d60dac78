// Snapshot schedules: one ReplicatedSnapshot per slot of the interval (aligned to the clock),
// named after the slot; retention keeps the newest `keep` ready ones and anything newer.
import type { ReplicatedSnapshot, SnapshotSchedule } from '../../operator/src/api/types';
import {
  SCHEDULE_ANNOTATION,
  scheduleStep,
  scheduledBy,
} from '../../operator/src/resolve/snapshot-schedule';
import { syncRelationship } from './relationship-fixture';

const rel = syncRelationship();
const hourly: SnapshotSchedule = { label: 'hourly_db', intervalMinutes: 60, keep: 2 };
const at = (iso: string) => new Date(iso);

function made(
  name: string,
  created: string,
  ready = true,
  key = 'r/hourly_db',
): ReplicatedSnapshot {
  return {
    metadata: {
      name,
      namespace: 'ns',
      creationTimestamp: at(created),
      annotations: { [SCHEDULE_ANNOTATION]: key },
    },
    spec: { source: { consistencyGroup: 'g' }, label: 'hourly_db' },
    status: { readyToUse: ready },
  };
}

describe('a snapshot schedule', () => {
  it('creates the current slot’s snapshot, named after the slot, and wakes at the next', () => {
    const step = scheduleStep(rel, hourly, [], at('2026-03-01T12:34:56Z'));
    expect(step.create).toEqual({
      apiVersion: 'lockstep.dev/v1alpha1',
      kind: 'ReplicatedSnapshot',
      metadata: {
        name: 'r-hourly-db-20260301-1200',
        namespace: 'ns',
        annotations: { [SCHEDULE_ANNOTATION]: 'r/hourly_db' },
      },
      spec: { source: { consistencyGroup: 'g' }, label: 'hourly_db', verify: false },
    });
    expect(step.nextAt).toEqual(at('2026-03-01T13:00:00Z'));
    expect(step.prune).toEqual([]);
  });

  it('creates nothing while the slot has its snapshot, and does not make up missed slots', () => {
    const now = at('2026-03-01T12:59:00Z');
    expect(scheduleStep(rel, hourly, [made('x', '2026-03-01T12:00:01Z')], now).create).toBe(
      undefined,
    );
    // Taken under the slot's name before the clock crossed into it (a slow clock elsewhere).
    const early = made('r-hourly-db-20260301-1200', '2026-03-01T11:59:59Z');
    expect(scheduleStep(rel, hourly, [early], now).create).toBe(undefined);
    const stale = [made('old', '2026-03-01T07:00:00Z')];
    expect(scheduleStep(rel, hourly, stale, now).create?.metadata.name).toBe(
      'r-hourly-db-20260301-1200',
    );
  });

  it('keeps the newest `keep` ready snapshots and anything newer, deleting the rest', () => {
    const now = at('2026-03-01T12:30:00Z');
    const snaps = [
      made('h08', '2026-03-01T08:00:00Z'),
      made('h12', '2026-03-01T12:00:00Z', false), // being taken
      made('h09', '2026-03-01T09:00:00Z', false), // never became ready
      made('h10', '2026-03-01T10:00:00Z'),
      made('h11', '2026-03-01T11:00:00Z'),
    ];
    expect(scheduleStep(rel, hourly, snaps, now).prune.sort()).toEqual(['h08', 'h09']);
  });

  it('leaves snapshots being deleted and other schedules’ alone', () => {
    const gone = made('h10', '2026-03-01T10:00:00Z');
    gone.metadata.deletionTimestamp = at('2026-03-01T12:00:00Z');
    const mine = scheduledBy(rel, hourly, [
      gone,
      made('other', '2026-03-01T11:00:00Z', true, 'r/daily'),
      made('h11', '2026-03-01T11:00:00Z'),
    ]);
    expect(mine.map((s) => s.metadata.name)).toEqual(['h10', 'h11']);
    const step = scheduleStep(rel, { ...hourly, keep: 1 }, mine, at('2026-03-01T11:30:00Z'));
    expect(step.prune).toEqual([]);
    expect(step.create).toBeUndefined();
  });
});
