// What a copy tracked while it was a primary (its peers' bitmaps, its activity log), seen from
// the copy it is now: a secondary reports it in the handshake, so that a new primary resyncs
// those regions too, and drops it once a new primary's generation supersedes it.
import { readdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { ActivityLog } from './activity-log';
import { DirtyBitmap, loadDirtyBitmap } from './dirty-bitmap';

export interface CopyIdentity {
  dir: string;
  volumeUuid: string;
  volumeSize: number;
}

const isTrackingFile = (name: string) => name.startsWith('bitmap-') || name === 'activity.log';

/**
 * Regions where this copy may hold data a new primary lacks: what it wrote as a primary that
 * its peers never acknowledged (its saved bitmaps) and what was in flight when it last crashed
 * as a primary (its activity log). Empty if there are none.
 */
export async function regionsHeldAlone(copy: CopyIdentity, regionSize: number): Promise<Buffer> {
  const { dir, volumeUuid, volumeSize } = copy;
  const out = new DirtyBitmap(volumeSize, regionSize);
  const files = await readdir(dir).catch(() => [] as string[]);
  for (const f of files.filter((n) => n.startsWith('bitmap-'))) {
    try {
      const { bitmap } = await loadDirtyBitmap(path.join(dir, f), {
        volumeUuid,
        volumeSize,
        regionSize,
      });
      out.merge(bitmap);
    } catch {
      out.setAll();
    }
  }
  const recovered = await ActivityLog.recover(path.join(dir, 'activity.log'), {
    volumeUuid,
    volumeSize,
    beforeEvict: () => Promise.resolve(),
  });
  if (recovered === 'all') out.setAll();
  else for (const r of recovered) out.markRange(r.offset, r.length);
  return out.dirtyRegions > 0 ? out.toBuffer() : Buffer.alloc(0);
}

/** A new primary's data supersedes whatever this copy tracked as a former primary. */
export async function forgetPrimaryTracking(dir: string): Promise<void> {
  for (const f of await readdir(dir)) {
    if (isTrackingFile(f)) await rm(path.join(dir, f), { force: true });
  }
}
