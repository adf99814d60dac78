// The activity log: the extents of a primary volume in which writes may be in flight. An
// extent enters the log durably before the first write touches it, and leaves only when no
// write is in flight there and the dirty bitmaps have been persisted. After a crash, every
// extent in the log is treated as dirty toward every peer, so a restarted primary resyncs
// those extents only — never the whole volume.
//
// Hot extents stay in the log, so steady-state writes cost nothing here; a write to a cold
// extent waits for one log commit (shared by every write that needs one at the same time).
import { createHash } from 'node:crypto';
import { promises as fs } from 'node:fs';
import { LockstepError, errorMessage } from '../../../lib/errors';
import { writeFileAtomic } from '../../../lib/atomic-file';

export const DEFAULT_EXTENT_SIZE = 4 * 1024 * 1024;
export const DEFAULT_CAPACITY = 1024;

interface Extent {
  refs: number;
  lastUse: number;
  durable: boolean;
}

interface Waiter {
  first: number;
  last: number;
  resolve: () => void;
  reject: (err: unknown) => void;
}

interface LogFile {
  format: 1;
  volumeUuid: string;
  extentSize: number;
  extents: number[];
  checksum: string;
}

export interface ActivityLogOptions {
  volumeUuid: string;
  volumeSize: number;
  extentSize?: number;
  capacity?: number;
  /** Persists the dirty bitmaps; called before extents leave the log. */
  beforeEvict: () => Promise<void>;
}

/** Byte ranges that may hold writes the peers never saw; 'all' if the log itself is unreadable. */
export type Recovered = Array<{ offset: number; length: number }> | 'all';

function checksum(body: Omit<LogFile, 'checksum'>): string {
  return createHash('sha256').update(JSON.stringify(body)).digest('hex');
}

export class ActivityLog {
  private readonly extents = new Map<number, Extent>();
  private readonly waiters: Waiter[] = [];
  private tick = 0;
  private committing = false;
  readonly extentSize: number;
  readonly capacity: number;

  private constructor(
    private readonly file: string,
    private readonly opts: ActivityLogOptions,
  ) {
    this.extentSize = opts.extentSize ?? DEFAULT_EXTENT_SIZE;
    this.capacity = opts.capacity ?? DEFAULT_CAPACITY;
  }

  /** Reads what a previous run left in the log (without changing it). */
  static async recover(file: string, opts: ActivityLogOptions): Promise<Recovered> {
    let text: string;
    try {
      text = await fs.readFile(file, 'utf8');
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
      return 'all';
    }
    try {
      const parsed = JSON.parse(text) as LogFile;
      const { checksum: sum, ...body } = parsed;
      if (parsed.format !== 1 || parsed.volumeUuid !== opts.volumeUuid || sum !== checksum(body))
        return 'all';
      return parsed.extents.map((e) => {
        const offset = e * parsed.extentSize;
        return { offset, length: Math.min(parsed.extentSize, opts.volumeSize - offset) };
      });
    } catch {
      return 'all';
    }
  }

  /** Starts an empty log. The caller has already folded `recover()`'s ranges into its bitmaps. */
  static async start(file: string, opts: ActivityLogOptions): Promise<ActivityLog> {
    const log = new ActivityLog(file, opts);
    await log.persist();
    return log;
  }

  get activeExtents(): number {
    return this.extents.size;
  }

  /**
   * Puts the extents of [offset, offset+length) in the log. Returns undefined when they already
   * are (the common case: no promise), else a promise that resolves once the log is durable.
   * Every call must be paired with `release` of the same range.
   */
  ensure(offset: number, length: number): Promise<void> | undefined {
    const first = Math.floor(offset / this.extentSize);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / this.extentSize);
    let allDurable = true;
    for (let e = first; e <= last; e++) {
      let x = this.extents.get(e);
      if (!x) this.extents.set(e, (x = { refs: 0, lastUse: 0, durable: false }));
      x.refs++;
      x.lastUse = ++this.tick;
      if (!x.durable) allDurable = false;
    }
    if (allDurable) return undefined;
    return new Promise((resolve, reject) => {
      this.waiters.push({ first, last, resolve, reject });
      void this.commit();
    });
  }

  release(offset: number, length: number): void {
    const first = Math.floor(offset / this.extentSize);
    const last = Math.floor((offset + Math.max(length, 1) - 1) / this.extentSize);
    let freed = false;
    for (let e = first; e <= last; e++) {
      const x = this.extents.get(e);
      if (x && --x.refs === 0) freed = true;
    }
    // A commit may be waiting for an extent to become evictable.
    if (freed && this.waiters.length > 0) void this.commit();
  }

  private async commit(): Promise<void> {
    if (this.committing) return;
    this.committing = true;
    try {
      while (this.waiters.length > 0) {
        const victims = this.victims();
        if (victims === undefined) return; // every extent busy: a release will call us again
        if (victims.length > 0) {
          // Writes in an evicted extent are then recorded only by the bitmaps: save them first.
          await this.opts.beforeEvict();
          for (const e of victims) if (this.extents.get(e)?.refs === 0) this.extents.delete(e);
        }
        const batch = [...this.extents.values()].filter((x) => !x.durable);
        await this.persist();
        for (const x of batch) x.durable = true;
        for (let i = 0; i < this.waiters.length;) {
          const w = this.waiters[i];
          if (this.covered(w.first, w.last)) {
            this.waiters.splice(i, 1);
            w.resolve();
          } else i++;
        }
      }
    } catch (err) {
      const failure = new LockstepError(
        'LOCKSTEP_ERR_IO',
        `activity log ${this.file} could not be written: ${errorMessage(err)}`,
        {
          cause: err,
        },
      );
      for (const w of this.waiters.splice(0)) w.reject(failure);
    } finally {
      this.committing = false;
    }
  }

  private covered(first: number, last: number): boolean {
    for (let e = first; e <= last; e++) if (!this.extents.get(e)?.durable) return false;
    return true;
  }

  /** The least recently used idle extents to drop so the log fits; undefined if it cannot yet. */
  private victims(): number[] | undefined {
    const excess = this.extents.size - this.capacity;
    if (excess <= 0) return [];
    const idle = [...this.extents.entries()]
      .filter(([, x]) => x.refs === 0 && x.durable)
      .sort((a, b) => a[1].lastUse - b[1].lastUse);
    if (idle.length < excess) return undefined;
    return idle.slice(0, excess).map(([e]) => e);
  }

  private async persist(): Promise<void> {
    const body = {
      format: 1 as const,
      volumeUuid: this.opts.volumeUuid,
      extentSize: this.extentSize,
      extents: [...this.extents.keys()].sort((a, b) => a - b),
    };
    await writeFileAtomic(this.file, JSON.stringify({ ...body, checksum: checksum(body) }));
  }

  /** On a clean shutdown, after the bitmaps are saved: nothing is in flight any more. */
  async markClean(): Promise<void> {
    this.extents.clear();
    await this.persist();
  }
}
