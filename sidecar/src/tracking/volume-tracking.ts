// What a primary knows about its peers' copies: one dirty bitmap per peer (persisted lazily)
// and the activity log (persisted before a write touches a cold extent). At open, whatever the
// previous run's log held is folded into every peer's bitmap: those regions may hold writes a
// peer never saw, because the primary died with them in flight.
import path from 'node:path';
import { errorMessage } from '../../../lib/errors';
import type { Logger } from '../../../lib/logger';
import { ActivityLog } from './activity-log';
import {
  DirtyBitmap,
  loadDirtyBitmap,
  saveDirtyBitmap,
  type ReadonlyDirtyBitmap,
} from './dirty-bitmap';

const SAVE_INTERVAL_MS = 1000;

interface PeerBitmap {
  bitmap: DirtyBitmap;
  file: string;
  changed: boolean;
  /** The file was missing or unreadable: its bits cannot be trusted, a checksum resync is due. */
  untrusted: boolean;
}

export interface TrackingOptions {
  dir: string;
  volumeUuid: string;
  volumeSize: number;
  regionSize: number;
  peers: string[];
  /** Peers whose bitmap UUID is set: they are known to have missed writes. */
  peersBehind: string[];
  log: Logger;
}

export function bitmapFile(dir: string, peer: string): string {
  return path.join(dir, `bitmap-${peer.replace(/[^A-Za-z0-9.-]/g, '_')}.bin`);
}

/**
 * A copy being promoted starts tracking its peers now, with nothing missed yet: an empty bitmap
 * each, on disk before the promotion is, so the first resync of the old primary sends what was
 * written since (and what the old primary says it held alone), not a checksum scan of it all.
 * A bitmap already there (a former primary's, still valid) is kept.
 */
export async function startTracking(
  copy: Pick<TrackingOptions, 'dir' | 'volumeUuid' | 'volumeSize' | 'regionSize'>,
  peers: string[],
): Promise<void> {
  const { dir, volumeUuid, volumeSize, regionSize } = copy;
  for (const peer of peers) {
    const file = bitmapFile(dir, peer);
    const kept = await loadDirtyBitmap(file, { volumeUuid, volumeSize, regionSize }).then(
      () => true,
      () => false,
    );
    if (!kept)
      await saveDirtyBitmap(
        file,
        { volumeUuid, peer, volumeSize, regionSize },
        new DirtyBitmap(volumeSize, regionSize),
      );
  }
}

export class VolumeTracking {
  private readonly bitmaps = new Map<string, PeerBitmap>();
  private timer: NodeJS.Timeout | undefined;
  private saving: Promise<void> = Promise.resolve();
  activityLog!: ActivityLog;

  private constructor(private readonly opts: TrackingOptions) {}

  static async open(opts: TrackingOptions): Promise<VolumeTracking> {
    const t = new VolumeTracking(opts);
    for (const peer of opts.peers) await t.loadPeer(peer, opts.peersBehind.includes(peer));
    const alFile = path.join(opts.dir, 'activity.log');
    const alOpts = {
      volumeUuid: opts.volumeUuid,
      volumeSize: opts.volumeSize,
      beforeEvict: () => t.save(),
    };
    const recovered = await ActivityLog.recover(alFile, alOpts);
    if (recovered === 'all' || recovered.length > 0) {
      opts.log.warn(
        { extents: recovered === 'all' ? 'all (log unreadable)' : recovered.length },
        'activity log from an unclean stop: those regions are resynced to every peer',
      );
      for (const p of t.bitmaps.values()) {
        if (recovered === 'all') p.bitmap.setAll();
        else for (const r of recovered) p.bitmap.markRange(r.offset, r.length);
        p.changed = true;
      }
    }
    await t.save();
    t.activityLog = await ActivityLog.start(alFile, alOpts);
    t.timer = setInterval(() => void t.save().catch(() => undefined), SAVE_INTERVAL_MS);
    t.timer.unref();
    return t;
  }

  private async loadPeer(peer: string, behind: boolean): Promise<void> {
    const { volumeUuid, volumeSize, regionSize } = this.opts;
    const file = bitmapFile(this.opts.dir, peer);
    try {
      const { bitmap } = await loadDirtyBitmap(file, { volumeUuid, volumeSize, regionSize });
      this.bitmaps.set(peer, { bitmap, file, changed: false, untrusted: false });
    } catch (err) {
      // A peer that was in sync needs no bitmap; one that was behind and lost its bitmap needs
      // every region compared (checksum resync).
      const bitmap = new DirtyBitmap(volumeSize, regionSize);
      const untrusted = behind;
      if (untrusted) bitmap.setAll();
      const missing = (err as { cause?: NodeJS.ErrnoException }).cause?.code === 'ENOENT';
      if (untrusted || !missing) {
        this.opts.log.warn(
          { peer, file, err: errorMessage(err), checksumResync: untrusted },
          'dirty bitmap unusable',
        );
      }
      this.bitmaps.set(peer, { bitmap, file, changed: true, untrusted });
    }
  }

  /** The peer's bitmap, to read: every change goes through this class, which persists it. */
  bitmap(peer: string): ReadonlyDirtyBitmap {
    return this.bitmaps.get(peer)!.bitmap;
  }

  isUntrusted(peer: string): boolean {
    return this.bitmaps.get(peer)?.untrusted ?? false;
  }

  trust(peer: string): void {
    const p = this.bitmaps.get(peer);
    if (p) p.untrusted = false;
  }

  markDirty(peer: string, offset: number, length: number): void {
    const p = this.bitmaps.get(peer)!;
    if (p.bitmap.markRange(offset, length) > 0) p.changed = true;
  }

  /** Every region: the peer holds nothing of ours yet (a baseline). */
  markAll(peer: string): void {
    const p = this.bitmaps.get(peer)!;
    p.bitmap.setAll();
    p.changed = true;
  }

  /** Adds the regions of a serialized bitmap of the same geometry (a peer's `differs`). */
  merge(peer: string, words: Buffer): void {
    const p = this.bitmaps.get(peer)!;
    const { volumeSize, regionSize } = this.opts;
    p.bitmap.merge(DirtyBitmap.fromBuffer(volumeSize, regionSize, words));
    p.changed = true;
  }

  /**
   * Replaces the peer's bits with the union of serialized bitmaps: a plan known to cover every
   * difference (what either copy changed since a snapshot they share), not what was tracked.
   */
  replace(peer: string, sets: Buffer[]): void {
    const p = this.bitmaps.get(peer)!;
    const { volumeSize, regionSize } = this.opts;
    p.bitmap.clearAll();
    for (const words of sets) p.bitmap.merge(DirtyBitmap.fromBuffer(volumeSize, regionSize, words));
    p.changed = true;
  }

  /** Clears regions [first, last]; returns how many were dirty. */
  clearRange(peer: string, first: number, last: number): number {
    const p = this.bitmaps.get(peer)!;
    const cleared = p.bitmap.clearRange(first, last);
    if (cleared > 0) p.changed = true;
    return cleared;
  }

  /** Persists every bitmap that changed since the last save. */
  save(): Promise<void> {
    const run = async () => {
      for (const [peer, p] of this.bitmaps) {
        if (!p.changed) continue;
        p.changed = false;
        const header = {
          volumeUuid: this.opts.volumeUuid,
          peer,
          volumeSize: this.opts.volumeSize,
          regionSize: this.opts.regionSize,
        };
        try {
          await saveDirtyBitmap(p.file, header, p.bitmap);
        } catch (err) {
          p.changed = true;
          throw err;
        }
      }
    };
    // Saves run one at a time, each seeing the latest bits. A failed save fails its caller
    // only: the chain itself must never hold a rejection nobody waits for (a full disk would
    // otherwise crash the agent with an unhandled rejection).
    const next = this.saving.then(run);
    this.saving = next.catch(() => undefined);
    return next;
  }

  /** Clean stop: bitmaps saved, then an empty activity log (nothing is in flight). */
  async close(): Promise<void> {
    clearInterval(this.timer);
    await this.save();
    await this.activityLog.markClean();
  }
}
