// What `kubectl lockstep status` and `pvc` show of a relationship: its phase, primary, each
// copy's state with the progress and ETA of what it is catching up, lag and dirty bytes; the
// same fields, unformatted, for -o json.
import type { CopyStatus, SyncRelationship } from '../../operator/src/api/types';
import { formatSize } from '../../lib/size';
import { formatEta } from '../progress-display';

export interface RelationshipView {
  namespace: string;
  name: string;
  group: string;
  mode: string;
  phase: string;
  primary: string;
  copies: CopyStatus[];
  dirtyBytes: number;
  lastInSyncTime: string;
  exports: { volume: string; uri: string }[];
  progress?: { doneBytes: number; totalBytes: number; etaSeconds: number };
}

export function viewOf(r: SyncRelationship): RelationshipView {
  const s = r.status ?? {};
  const progress = s.move ?? s.baseline ?? progressOfCopies(s.copies ?? []);
  return {
    namespace: r.metadata.namespace ?? '',
    name: r.metadata.name,
    group: r.spec.consistencyGroup,
    mode: r.spec.mode ?? 'Sync',
    phase: s.phase ?? 'Pending',
    primary: s.primaryNode ?? '',
    copies: s.copies ?? [],
    dirtyBytes: s.dirtyBytes ?? 0,
    lastInSyncTime: s.lastInSyncTime ?? '',
    exports: s.failover?.exports ?? [],
    ...(progress
      ? {
          progress: {
            doneBytes: progress.doneBytes,
            totalBytes: progress.totalBytes,
            etaSeconds: progress.etaSeconds,
          },
        }
      : {}),
  };
}

function progressOfCopies(copies: CopyStatus[]): RelationshipView['progress'] {
  const catching = copies.filter((c) => c.totalBytes);
  if (!catching.length) return undefined;
  const etas = catching.map((c) => c.etaSeconds ?? -1);
  return {
    doneBytes: catching.reduce((n, c) => n + (c.doneBytes ?? 0), 0),
    totalBytes: catching.reduce((n, c) => n + (c.totalBytes ?? 0), 0),
    etaSeconds: etas.includes(-1) ? -1 : Math.max(...etas),
  };
}

/** "node-b InSync", "node-c Resyncing 45% ETA 1m20s". */
export function formatCopy(c: CopyStatus): string {
  const progress =
    c.totalBytes && c.totalBytes > 0
      ? ` ${Math.floor((100 * (c.doneBytes ?? 0)) / c.totalBytes)}% ETA ${formatEta(c.etaSeconds ?? -1)}`
      : '';
  return `${c.node} ${c.state}${progress}`;
}

/** How long ago an ISO time was, as "3m ago"; "never" when empty. */
export function ago(iso: string, now = Date.now()): string {
  if (!iso) return 'never';
  return `${formatEta(Math.max(0, (now - Date.parse(iso)) / 1000))} ago`;
}

export function statusRow(v: RelationshipView, withNamespace: boolean): string[] {
  return [
    ...(withNamespace ? [v.namespace] : []),
    v.name,
    v.mode,
    v.phase,
    v.primary || '-',
    v.copies.map(formatCopy).join(', ') || '-',
    formatSize(v.dirtyBytes),
    v.phase === 'InSync' ? 'now' : ago(v.lastInSyncTime),
  ];
}

export const STATUS_HEADERS = [
  'NAME',
  'MODE',
  'PHASE',
  'PRIMARY',
  'COPIES',
  'DIRTY',
  'LAST IN SYNC',
];
