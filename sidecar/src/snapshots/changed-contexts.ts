// The NBD metadata context `lockstep:changed:<snapshot>`: which ranges of the volume changed
// since a snapshot (flag 1), the way QEMU's `qemu:dirty-bitmap:` serves incremental backups.
// A backup tool reads the changed ranges from the volume (or a newer snapshot's export) and
// skips the rest. The answer comes from the saved-data logs: what snapshot k and the newer ones
// saved is exactly what changed since k, so no scan is needed.
import { LockstepError } from '../../../lib/errors';
import type { Extent, MetaContexts } from '../block-device';
import type { SnapshotCatalog } from './snapshot-catalog';
import type { BlockRuns } from './block-runs';
import { BLOCK } from './saved-log';

export const CHANGED_PREFIX = 'lockstep:changed:';
export const CHANGED = 1;
/** Extents answered per call at most: a client pages through the rest. */
const MAX_EXTENTS = 64 * 1024;

export class ChangedContexts implements MetaContexts {
  constructor(
    private readonly inner: MetaContexts,
    private readonly catalog: SnapshotCatalog,
  ) {}

  list(): string[] {
    return [...this.inner.list(), ...this.catalog.list().map((s) => CHANGED_PREFIX + s.name)];
  }

  has(name: string): boolean {
    if (!name.startsWith(CHANGED_PREFIX)) return this.inner.has(name);
    const snapshot = name.slice(CHANGED_PREFIX.length);
    return this.catalog.list().some((s) => s.name === snapshot);
  }

  extents(context: string, offset: number, length: number): Promise<Extent[]> {
    if (!context.startsWith(CHANGED_PREFIX)) return this.inner.extents(context, offset, length);
    const snapshot = context.slice(CHANGED_PREFIX.length);
    if (!this.has(context)) {
      return Promise.reject(
        new LockstepError(
          'LOCKSTEP_ERR_INVALID_ARGUMENT',
          `no snapshot ${snapshot} for ${context}`,
        ),
      );
    }
    return Promise.resolve(changedExtents(this.catalog.changedBlocks(snapshot), offset, length));
  }
}

/** Extents of changed (CHANGED) and unchanged (0) bytes from `offset`, within `length`. */
export function changedExtents(runs: BlockRuns, offset: number, length: number): Extent[] {
  const end = offset + length;
  const out: Extent[] = [];
  let pos = offset;
  let i = runs.firstEndingAfter(Math.floor(offset / BLOCK));
  while (pos < end && out.length < MAX_EXTENTS) {
    if (i >= runs.count || runs.start(i) * BLOCK >= end) {
      out.push({ length: end - pos, flags: 0 });
      break;
    }
    const start = Math.max(pos, runs.start(i) * BLOCK);
    if (start > pos) {
      out.push({ length: start - pos, flags: 0 });
      pos = start;
      continue;
    }
    const stop = Math.min(end, runs.end(i) * BLOCK);
    out.push({ length: stop - pos, flags: CHANGED });
    pos = stop;
    i++;
  }
  return out;
}
